"""PEFT's LoRA and DoRA on Hugging Face models built from small configs (random weights, no downloads):
``branchfold.fold`` of the adapted model equals ``merge_and_unload`` then fold, in op count, linear-op count
and parameter count, and is exact. Nothing in branchfold knows PEFT: the adapters are parallel branches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import count_kind, rel_err
from torch import nn

import branchfold

T = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from adapter_models import BUILD, Hidden, adapted, ids, randomized  # noqa: E402


def linears(gm) -> int:
    return sum("linear" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def adapter_layers(model: nn.Module) -> int:
    return sum(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in model.modules())


@pytest.mark.parametrize("subset", [True, False], ids=["subset", "all-linear"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", sorted(BUILD))
def test_fold_equals_merge_and_unload(name, dora, subset):
    model = adapted(name, dora, subset)
    n_adapters = adapter_layers(model)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    r = branchfold.fold_with_report(Hidden(model).eval(), (ids(),), horizontal="off")
    m = branchfold.fold_with_report(Hidden(merged).eval(), (ids(),), horizontal="off")
    rep = r.report
    assert rep.verified and rep.max_error <= 1e-5
    # every adapter sum is one region (base + A + B at least), and nothing is left for cost
    adapter_sums = [f for f in rep.folded if f.ops.count("linear") >= 3]
    assert len(adapter_sums) == n_adapters > 0
    assert "cost" not in rep.skipped_by_reason()
    assert linears(r.model) == linears(m.model)
    assert rep.after.ops == m.report.after.ops
    assert rep.after.params == m.report.after.params
    assert rep.after.params < rep.before.params
    x = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))  # another batch and length
    with torch.no_grad():
        reference, ours = Hidden(merged)(x), r.model(x)
        assert rel_err(Hidden(model)(x), ours) <= 1e-5
        assert rel_err(reference, ours) <= 1e-5


def test_horizontal_fusion_takes_the_folded_sums():
    """All-linear LoRA on Llama: the adapter sums fold first, then Q/K/V and gate/up fuse as plain linears."""
    model = adapted("llama", dora=False, subset=False)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    r = branchfold.fold_with_report(Hidden(model).eval(), (ids(),), horizontal="on")
    m = branchfold.fold_with_report(Hidden(merged).eval(), (ids(),), horizontal="on")
    assert r.report.verified
    assert r.report.counts_by_kind().get("horizontal") == m.report.counts_by_kind().get("horizontal") > 0
    assert linears(r.model) == linears(m.model)


def onnx_export(model: nn.Module, dynamo: bool, tmp_path, tag: str):
    """The model exported unmerged, loaded into memory (``onnx.load`` inlines the dynamo exporter's
    external data)."""
    import warnings

    onnx = pytest.importorskip("onnx")
    path = tmp_path / f"{tag}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(model).eval(), (ids(),), str(path), dynamo=dynamo, input_names=["ids"],
                          **({} if dynamo else {"opset_version": 17}))  # fmt: skip
    return onnx.load(str(path))


def matmuls(proto) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in proto.graph.node)


@pytest.mark.parametrize(
    ("name", "dora", "dynamo"),
    [("bert", False, False), ("llama", False, True), ("llama", True, True), ("llama", True, False)],
    ids=["bert-lora-legacy", "llama-lora-dynamo", "llama-dora-dynamo", "llama-dora-legacy"],
)
def test_onnx_export_of_the_adapted_model_folds_to_the_merged_exports_matmuls(name, dora, dynamo, tmp_path):
    import onnx_ir as ir

    model = adapted(name, dora, subset=True)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    unmerged, reference = onnx_export(model, dynamo, tmp_path, "adapted"), onnx_export(merged, dynamo, tmp_path, "merged")
    assert matmuls(unmerged) > matmuls(reference)
    r = branchfold.fold_with_report(unmerged)
    assert r.report.verified and r.report.max_error <= 1e-5
    folded = r.model if hasattr(r.model, "graph") and hasattr(r.model.graph, "node") else ir.to_proto(r.model)
    assert matmuls(folded) == matmuls(reference)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_lora_on_conv2d_folds_into_the_base_conv():
    """PEFT's conv LoRA: a KxK ``lora_A`` conv then a 1x1 ``lora_B`` conv, summed into the base KxK."""
    base = randomized(ConvNet()).eval()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "head"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    r = branchfold.fold_with_report(model, (x,))
    assert r.report.verified and r.report.max_error <= 1e-5
    assert count_kind(r.model, "conv") == 2  # one per adapted conv: A and B are gone
    merged = copy.deepcopy(model).merge_and_unload().eval()
    with torch.no_grad():
        assert rel_err(merged(x), r.model(x)) <= 1e-5
    assert r.report.after.params == sum(p.numel() for p in merged.parameters())


def test_several_active_adapters_fold_into_one_linear():
    model = adapted("bert", dora=False, subset=True)
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=BUILD["bert"][1], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    model.eval()
    n_adapters = adapter_layers(model)
    r = branchfold.fold_with_report(Hidden(model).eval(), (ids(),), horizontal="off")
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["default", "second"]).eval()
    m = branchfold.fold_with_report(Hidden(merged).eval(), (ids(),), horizontal="off")
    assert r.report.verified and r.report.max_error <= 1e-5
    assert len([f for f in r.report.folded if f.ops.count("linear") >= 5]) == n_adapters  # base + 2 pairs
    assert linears(r.model) == linears(m.model)
    assert r.report.after.params == m.report.after.params


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return torch.relu(self.lin(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_folded_adapter_weight_is_the_exact_sum_rounded_once(dtype):
    """The fold forms ``W + s·B·A`` in float64 and rounds once: the correctly rounded weight, never further
    from the exact sum than the merge, which adds in the weights' own dtype."""
    base = randomized(OneLinear()).eval()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval().to(dtype)
    layer = model.base_model.model.lin
    w, a, b = (t.detach().double() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                             layer.lora_B["default"].weight))  # fmt: skip
    exact = w + layer.scaling["default"] * (b @ a)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    r = branchfold.fold_with_report(model, (x,))
    (folded,) = [p for n, p in r.model.named_parameters() if n.startswith("branchfold_") and p.dim() == 2]
    merged = copy.deepcopy(model).merge_and_unload().lin.weight
    assert torch.equal(folded, exact.to(dtype))
    fold_err, merge_err = ((t.double() - exact).abs().max() for t in (folded, merged))
    assert fold_err <= merge_err


EMBEDDINGS = {"bert": "word_embeddings", "llama": "embed_tokens"}


def with_embedding_lora(name: str, dora: bool = False) -> nn.Module:
    """LoRA on the word embeddings beside the subset of linears (``lora_embedding_A/B``: a lookup then a matmul;
    DoRA also scales the sum by its weight-only magnitude ratio)."""
    build, targets = BUILD[name]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, use_dora=dora,
                             target_modules=[*targets, EMBEDDINGS[name]])  # fmt: skip
    return peft.get_peft_model(randomized(build()).eval(), config).eval()


def lookups(gm) -> int:
    return sum("embedding" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", sorted(BUILD))
def test_lora_on_the_word_embeddings_folds_into_one_table(name, dora):
    model = with_embedding_lora(name, dora)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    r = branchfold.fold_with_report(Hidden(model).eval(), (ids(),), horizontal="off")
    m = branchfold.fold_with_report(Hidden(merged).eval(), (ids(),), horizontal="off")
    rep = r.report
    assert rep.verified and rep.max_error <= 1e-5
    (table,) = [f for f in rep.folded if f.ops.count("embedding") == 2]
    assert table.ops.count("add") == 1 and table.ops.count("linear") == 1  # the base lookup, A's lookup, B
    assert lookups(r.model) == lookups(m.model) and linears(r.model) == linears(m.model)
    assert (rep.after.ops, rep.after.params) == (m.report.after.ops, m.report.after.params)
    x = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(Hidden(model)(x), r.model(x)) <= 1e-5
        assert rel_err(Hidden(merged)(x), r.model(x)) <= 1e-5


def onnx_file(model: nn.Module, dynamo: bool, tmp_path, tag: str) -> str:
    import warnings

    path = tmp_path / f"{tag}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(model).eval(), (ids(),), str(path), dynamo=dynamo, input_names=["ids"],
                          **({} if dynamo else {"opset_version": 17}))  # fmt: skip
    return str(path)


def op_types(model) -> dict[str, int]:
    import collections

    import onnx_ir as ir

    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return collections.Counter(n.op_type for n in proto.graph.node)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", sorted(BUILD))
def test_onnx_export_with_embedding_lora_folds_to_the_merged_exports_ops(name, dynamo, tmp_path):
    """Both exporters write the adapter as ``Gather`` of A's table, ``MatMul`` by B, ``Mul`` and ``Add``: it
    folds into one ``Gather`` of one table, as the merged export has."""
    onnx = pytest.importorskip("onnx")
    model = with_embedding_lora(name)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    path, reference = onnx_file(model, dynamo, tmp_path, "adapted"), onnx_file(merged, dynamo, tmp_path, "merged")
    folded = str(tmp_path / "folded.onnx")
    r = branchfold.fold_with_report(path, output=folded)  # as the command line writes it
    m = branchfold.fold_with_report(reference)
    assert r.report.verified and r.report.max_error <= 1e-5 and r.report.written
    assert any(f.ops.count("embedding") == 2 for f in r.report.folded)
    before, after, want = op_types(onnx.load(path)), op_types(r.model), op_types(m.model)
    assert before["Gather"] > after["Gather"] == want["Gather"]
    assert after["MatMul"] + after["Gemm"] == want["MatMul"] + want["Gemm"]
    assert r.report.after.params == m.report.after.params
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2)).numpy()  # the exported shape
    assert rel_err(torch.from_numpy(run_onnx(reference, x)), torch.from_numpy(run_onnx(folded, x))) <= 1e-5


def run_onnx(path: str, x):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_a_weighted_combination_of_adapters_folds_like_its_merge(combination):
    """``add_weighted_adapter`` writes a new LoRA pair (stacked ranks for ``cat``, an SVD for ``svd``): one
    more low-rank branch, which folds into the base linear as any other."""
    model = adapted("bert", dora=False, subset=True)
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=BUILD["bert"][1],
                                                init_lora_weights=False))  # fmt: skip
    model.add_weighted_adapter(["default", "second"], [0.6, 0.3], "combo", combination_type=combination)
    model.set_adapter("combo")
    model.eval()
    r = branchfold.fold_with_report(Hidden(model).eval(), (ids(),), horizontal="off")
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["combo"]).eval()
    m = branchfold.fold_with_report(Hidden(merged).eval(), (ids(),), horizontal="off")
    assert r.report.verified and r.report.max_error <= 1e-5
    assert len([f for f in r.report.folded if f.ops.count("linear") >= 3]) == adapter_layers(model)
    assert linears(r.model) == linears(m.model) and r.report.after.params == m.report.after.params
    x = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(Hidden(merged)(x), r.model(x)) <= 1e-5


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_adapters_in_training_mode(dropout):
    """In training mode LoRA's dropout is random: the adapters stay, each with its reason. Without dropout
    (PEFT writes ``nn.Identity``) the forward is the same affine map and folds; the report says the model
    was in training mode either way."""
    build, targets = BUILD["bert"]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, target_modules=targets)
    model = peft.get_peft_model(randomized(build()), config).train()
    r = branchfold.fold_with_report(Hidden(model).train(), (ids(),), horizontal="off")
    rep = r.report
    assert rep.verified and any("training mode" in note for note in rep.notes)
    adapter_sums = [f for f in rep.folded if f.ops.count("linear") >= 3]
    if dropout:
        assert adapter_sums == [] and rep.skipped_by_reason()["training-mode"] >= adapter_layers(model)
        # nothing merged: the base linears, every A and every B stay apart
        assert linears(r.model) == sum(isinstance(m, nn.Linear) for m in model.modules())
    else:
        assert len(adapter_sums) == adapter_layers(model)


class OneEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)

    def forward(self, idx):
        return torch.relu(self.emb(idx))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_folded_embedding_table_is_the_exact_sum_rounded_once(dtype):
    base = randomized(OneEmbedding()).eval()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["emb"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval().to(dtype)
    layer = model.base_model.model.emb
    w, a, b = (t.detach().double() for t in (layer.base_layer.weight, layer.lora_embedding_A["default"],
                                             layer.lora_embedding_B["default"]))  # fmt: skip
    exact = w + layer.scaling["default"] * (a.T @ b.T)
    r = branchfold.fold_with_report(model, (ids(),))
    (table,) = [p for n, p in r.model.named_parameters() if n.startswith("branchfold_")]
    merged = copy.deepcopy(model).merge_and_unload().emb.weight
    assert torch.equal(table, exact.to(dtype))
    fold_err, merge_err = ((t.double() - exact).abs().max() for t in (table, merged))
    assert fold_err <= merge_err
