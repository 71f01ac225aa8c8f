"""Adapters (LoRA, DoRA): branchfold.fold of a PEFT model against PEFT's own ``merge_and_unload``.

Hugging Face models built from small configs with random weights (no downloads), PEFT adapters with
``init_lora_weights=False``, eval mode (one case also adapts the word embeddings: a lookup of A's table
then B, folded into the embedding table). For each case: op and parameter counts of the adapted model, of its
fold, of the merged model and of the merged model folded; latency of the three (eager torch, timed in the
same interleaved rounds); and, for fp32 / fp16 / bf16 copies of the adapted model, the relative error of
its fold and of its merge (then folded the same way, so that both graphs differ only in the adapted weights)
against the adapted model run in float64 (``max |out - ref| / max |ref|``). The fold sums the branches in
float64 and rounds once; the merge adds ``scaling·B·A`` in the weights' dtype.

    .venv/bin/python -m benchmarks.bench_adapters [--quick]
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

import branchfold
from benchmarks.timing import interleaved
from branchfold.passes.verify import relative_error

ROUNDS = 7
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Hidden(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state


def _build(family: str, hidden: int) -> tuple[nn.Module, list[str], str]:
    import transformers as T

    if family == "bert":
        cfg = T.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=4 * hidden, vocab_size=512)  # fmt: skip
        return T.BertModel(cfg), ["query", "value"], "word_embeddings"
    cfg = T.LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=4 * hidden, vocab_size=512)  # fmt: skip
    return T.LlamaModel(cfg), ["q_proj", "v_proj"], "embed_tokens"


def _adapted(family: str, hidden: int, dora: bool, subset: bool, embedding: bool = False) -> nn.Module:
    import peft

    torch.manual_seed(0)
    base, targets, table = _build(family, hidden)
    targets = [*targets, table] if embedding else targets
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.named_parameters():  # random biases and norm scales: nothing exact by accident
            unit = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if unit else 0.0))
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, use_dora=dora, init_lora_weights=False,
                             target_modules=targets if subset else "all-linear")  # fmt: skip
    return peft.get_peft_model(base.eval(), config).eval()


def _linears(gm) -> int:
    return sum("linear" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _case(family: str, hidden: int, dora: bool, subset: bool, tokens: int, embedding: bool = False) -> dict:
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(1))
    model = _adapted(family, hidden, dora, subset, embedding)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    folded = branchfold.fold_with_report(Hidden(model).eval(), (ids,))
    refold = branchfold.fold_with_report(Hidden(merged).eval(), (ids,))
    with torch.no_grad():
        t = interleaved({"adapted": lambda: Hidden(model)(ids), "folded": lambda: folded.model(ids),
                         "merged": lambda: Hidden(merged)(ids), "merged+fold": lambda: refold.model(ids)},
                        rounds=ROUNDS)  # fmt: skip
    row = {
        "case": (f"{family}-h{hidden} {'DoRA' if dora else 'LoRA'} {'q,v' if subset else 'all linears'}"
                 f"{' + embeddings' if embedding else ''}"),  # fmt: skip
        "ops adapted/folded/merged": f"{folded.report.before.ops}/{folded.report.after.ops}/{refold.report.after.ops}",
        "linears folded/merged": f"{_linears(folded.model)}/{_linears(refold.model)}",
        "params adapted/folded/merged": (f"{folded.report.before.params}/{folded.report.after.params}/"
                                         f"{refold.report.after.params}"),  # fmt: skip
        "ms adapted": t["adapted"].median * 1e3,
        "ms folded": t["folded"].median * 1e3,
        "ms merged": t["merged"].median * 1e3,
        "folded/merged": t["folded"].median / t["merged"].median,
        "folded/merged+fold": t["folded"].median / t["merged+fold"].median,
        "fold max error": folded.report.max_error,
    }
    row.update(_errors(model, ids))
    return row


def _errors(model: nn.Module, ids: torch.Tensor) -> dict:
    """Error against the adapted model in float64, of the fold and of the merge then fold, per dtype."""
    with torch.no_grad():
        reference = Hidden(copy.deepcopy(model).double())(ids)
    out = {}
    for name, dtype in DTYPES.items():
        low = copy.deepcopy(model).to(dtype).eval()
        merged = Hidden(copy.deepcopy(low).merge_and_unload()).eval()
        folded = branchfold.fold_with_report(Hidden(low).eval(), (ids,), horizontal="off").model
        merged = branchfold.fold_with_report(merged, (ids,), horizontal="off").model
        with torch.no_grad():
            out[f"err {name} fold"] = relative_error(reference, folded(ids).double())
            out[f"err {name} merge"] = relative_error(reference, merged(ids).double())
    return out


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    cases = [("bert", 128, False, True), ("bert", 128, True, False), ("llama", 128, False, False),
             ("llama", 128, True, True), ("llama", 128, False, True, True)]  # fmt: skip
    if quick:
        cases = [("llama", 32, True, True), ("llama", 32, False, True, True)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [_case(*c[:4], tokens=16 if quick else 64, embedding=c[4] if len(c) > 4 else False) for c in cases]
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for row in run(quick="--quick" in argv):
        print(row)


if __name__ == "__main__":
    main()
