"""The torch.compile backend: folds inference graphs, never goes stale, leaves training alone.

Most tests hand off to the ``"eager"`` backend (Inductor compiles take tens of seconds on CPU); one test
runs the default Inductor hand-off end to end.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import small_bert
from torch import nn

from branchfold.errors import InputError
from branchfold.passes import verify
from branchfold.passes.backend import FoldedGraph, branchfold_backend, invalidate, make_backend
from branchfold.zoo import ZOO, seed_vit


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_vit(branches: int = 4) -> nn.Module:
    return seed_vit(depth=1, branches=branches, dim=32, heads=2, mlp_ratio=2, image_size=8, patch=4).eval()


class Recorder:
    """A backend that runs branchfold (eager hand-off unless told) and keeps what it returned."""

    def __init__(self, **options) -> None:
        self.options = {"backend": "eager", **options}
        self.compiled: list = []

    def __call__(self, gm, example_inputs):
        out = branchfold_backend(gm, example_inputs, options=self.options)
        self.compiled.append(out)
        return out

    @property
    def folded(self) -> FoldedGraph:
        graphs = [c for c in self.compiled if isinstance(c, FoldedGraph)]
        assert graphs, "the backend folded nothing"
        return graphs[-1]


def linear_calls(code: str) -> int:
    return code.count("linear(")


def close(a, b, tol: float = 1e-5) -> bool:
    return verify.relative_error(a, b) <= tol


# ---------------------------------------------------------------------------------------------
# correctness


@pytest.mark.parametrize("name", ["repvgg", "acnet", "dbb", "mobileone", "grouped-mlp"])
def test_zoo_models_fold_and_match_eager(name):
    entry = ZOO[name]
    model = entry.build().eval()
    (x,) = entry.example_input(model, 2)
    rec = Recorder()
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
        ref = model(x)
    assert close(ref, out)
    assert rec.folded.active and len(rec.folded.watch) > 0


def test_seed_vit_folds_to_the_single_path_graph():
    model = small_vit()
    plain = ZOO["seed-vit"].single_path(model).eval()
    x = model.example_input(3)
    rec, rec_plain = Recorder(horizontal="off"), Recorder(horizontal="off")
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
        torch.compile(plain, backend=rec_plain)(x)
    assert close(model(x), out)
    assert close(plain(x), out)
    # 6 linears per block (q, k, v, proj, fc1, fc2) + head, as in the hand-written single path
    assert linear_calls(rec.folded.code) == linear_calls(rec_plain.folded.original.code) == 7
    assert linear_calls(rec.folded.original.code) == 6 * 4 + 1


def test_seed_vit_fuses_q_k_v_like_fold_does():
    """The default ``horizontal="auto"`` also fuses the folded q, k, v into one linear, as ``fold()`` does."""
    model = small_vit()
    x = model.example_input(3)
    rec = Recorder()
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
    assert close(model(x), out)
    assert linear_calls(rec.folded.code) == 5  # q|k|v, proj, fc1, fc2, head


def test_hugging_face_bert_under_the_backend():
    model = small_bert()
    ids = torch.randint(0, 64, (2, 8))
    rec = Recorder()
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(input_ids=ids).last_hidden_state
        ref = model(input_ids=ids).last_hidden_state
    assert close(ref, out)
    # LayerNorm affine -> next linear chains (embeddings LN into q, k, v)
    assert len(rec.folded.watch) > 0


def _hf_vision(name: str):
    transformers = pytest.importorskip("transformers")
    if name == "vit":
        config = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
            patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.ViTModel(config), torch.randn(2, 3, 16, 16)
    if name == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
        return transformers.ResNetModel(config), torch.randn(2, 3, 32, 32)
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
    return transformers.ConvNextModel(config), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", ["vit", "resnet", "convnext"])
def test_hugging_face_vision_models_under_the_backend(name):
    torch.manual_seed(0)
    model, x = _hf_vision(name)
    model.eval()
    for m in model.modules():  # trained-looking norms, so that folding them is visible in the output
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    rec = Recorder()
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(pixel_values=x).last_hidden_state
        ref = model(pixel_values=x).last_hidden_state
    assert close(ref, out)
    assert len(rec.folded.watch) > 0  # conv→BN, LN→linear, LayerScale: something folded in each


def test_inference_mode_folds_too():
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder()
    with torch.inference_mode():
        out = torch.compile(model, backend=rec)(x)
        ref = model(x)
    assert close(ref, out) and rec.folded.active


# ---------------------------------------------------------------------------------------------
# stale weights


def test_in_place_parameter_changes_refold_without_recompiling():
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    block = model.blocks[0]
    with torch.no_grad():
        compiled(x)
    folded = rec.folded

    def mutate_with_optimizer():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).sum().backward()  # eager: grad mode compiles a separate, unfolded graph
        opt.step()
        opt.zero_grad()

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    mutations = [
        lambda: block.attn.q.branches[1].weight.add_(0.05),
        mutate_with_optimizer,
        lambda: model.load_state_dict(saved),
        lambda: setattr(block.mlp.fc2.branches[2].weight, "data", torch.randn_like(block.mlp.fc2.branches[2].weight)),
        lambda: block.norm1.weight.mul_(1.5),  # LayerNorm γ folded into q, k, v
    ]
    for i, mutate in enumerate(mutations):
        with torch.set_grad_enabled(mutate is mutate_with_optimizer):
            mutate()
        with torch.no_grad():
            assert close(model(x), compiled(x)), f"mutation {i} served stale folded weights"
        assert folded.refolds == i + 1
    with torch.no_grad():
        compiled(x)
    assert folded.refolds == len(mutations)  # nothing changed: no refold
    assert len([c for c in rec.compiled if isinstance(c, FoldedGraph)]) == 1  # never recompiled


class WideStack(nn.Module):
    """40 blocks of 4 summed parallel linears: 320 parameters, all folded."""

    def __init__(self, blocks: int = 40, branches: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Linear(dim, dim) for _ in range(branches)) for _ in range(blocks)
        )

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(sum(branch(x) for branch in block))
        return x


def test_a_model_with_hundreds_of_parameters_refolds_after_every_kind_of_update():
    torch.manual_seed(0)
    model = WideStack().eval()
    assert len(list(model.parameters())) > 300
    x = torch.randn(4, 8)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        assert close(model(x), compiled(x))
    folded = rec.folded
    assert len(folded.watch) == 320
    inner_inputs = [n for n in folded.folded_gm.graph.nodes if n.op == "placeholder"]
    assert len(inner_inputs) == 1 + 2 * 40  # x and one folded weight and bias per block: no parameter

    def optimizer_step():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    updates = [
        optimizer_step,
        lambda: model.load_state_dict(saved),
        lambda: model.blocks[37][2].bias.add_(0.5),  # in place under no_grad, deep in the stack
    ]
    for i, update in enumerate(updates):
        with torch.set_grad_enabled(update is optimizer_step):
            update()
        with torch.no_grad():
            assert close(model(x), compiled(x)), f"update {i} served stale folded weights"
        assert folded.refolds == i + 1
    with torch.no_grad():
        compiled(x)
    assert folded.refolds == len(updates)
    assert len([c for c in rec.compiled if isinstance(c, FoldedGraph)]) == 1


class DataSGD(torch.optim.Optimizer):
    """SGD written the old way, through ``p.data``: the version counters never see its updates."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def test_mobileone_with_over_300_watched_parameters_sees_every_weight_change_on_the_next_call():
    entry = ZOO["mobileone"]
    torch.manual_seed(0)
    model = entry.build().eval()
    (x,) = entry.example_input(model, 1)
    rec = Recorder(verify=False)  # each refold is compared with eager below; the check would only add time
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        assert close(model(x), compiled(x))
    folded = rec.folded
    assert len(folded.watch) > 300
    conv_weights = [p for p in model.parameters() if p.dim() == 4]

    def step(optimizer_class):
        def run():
            opt = optimizer_class(model.parameters(), lr=1e-3)
            model(x).square().mean().backward()  # eager: grad mode compiles a separate, unfolded graph
            opt.step()
            opt.zero_grad()

        return run

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    updates = {
        "torch.optim step": step(torch.optim.SGD),
        "optimizer writing p.data": step(DataSGD),  # no version bump: the optimizer step hook sees it
        "load_state_dict": lambda: model.load_state_dict(saved),
        "in place under no_grad": lambda: conv_weights[len(conv_weights) // 2].mul_(1.1),
    }
    for i, (name, update) in enumerate(updates.items()):
        with torch.set_grad_enabled("step" in name or "optimizer" in name):
            update()
        with torch.no_grad():
            assert close(model(x), compiled(x)), f"{name}: stale folded weights served"
        assert folded.refolds == i + 1, name
    with torch.no_grad():
        compiled(x)
    assert folded.refolds == len(updates)  # nothing changed since: no refold
    assert len([c for c in rec.compiled if isinstance(c, FoldedGraph)]) == 1  # never recompiled


def test_an_optimizer_of_another_model_does_not_refold():
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    other = nn.Linear(4, 4)
    with torch.no_grad():
        compiled(x)
    opt = DataSGD(other.parameters())
    other(torch.randn(2, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        compiled(x)
    assert rec.folded.refolds == 0


def test_writes_through_data_are_caught_by_the_sampled_check():
    """``p.data.copy_`` bypasses the version counter; the sampled values see new weights loaded that way."""
    model = small_vit()
    x = model.example_input(2)
    weight = model.blocks[0].mlp.fc1.branches[0].weight
    rec = Recorder(weight_check="sampled")
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        compiled(x)
        weight.data.copy_(torch.randn_like(weight))  # loading new weights through .data
        assert close(model(x), compiled(x))
    assert rec.folded.refolds == 1


def test_writes_through_data_with_the_default_metadata_check_need_values_mode_or_invalidate():
    model = small_vit()
    x = model.example_input(2)
    weight = model.blocks[0].mlp.fc1.branches[0].weight
    by_value = Recorder(weight_check="values")
    compiled = torch.compile(model, backend=by_value)
    with torch.no_grad():
        compiled(x)
        weight.data.copy_(torch.randn_like(weight))
        assert close(model(x), compiled(x))
    assert by_value.folded.refolds == 1

    torch._dynamo.reset()
    rec = Recorder()  # the default check: metadata
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        compiled(x)
        weight.data.mul_(2.0)
        assert rec.folded.refolds == 0 and compiled(x) is not None  # metadata alone cannot see it
        invalidate()
        assert close(model(x), compiled(x))
    assert rec.folded.refolds == 1


def test_an_unknown_weight_check_is_an_error():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(InputError, match="weight_check must be one of metadata, sampled, values"):
        branchfold_backend(gm, [torch.randn(1, 2)], options={"weight_check": "everything"})


def test_replaced_parameter_object_is_noticed():
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        compiled(x)
        fc = model.blocks[0].mlp.fc1.branches[3]
        fc.bias = nn.Parameter(torch.randn_like(fc.bias))
        assert close(model(x), compiled(x))
    assert rec.folded.refolds == 1


def test_weights_that_change_the_folded_graph_recompile():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    model = TwoBranches().eval()
    x = torch.randn(4, 8)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        compiled(x)
        before = rec.folded.code
        model.b.bias.copy_(-model.a.bias)  # the folded bias is now exactly zero: no bias input
        assert close(model(x), compiled(x))
    assert rec.folded.code != before


def test_guard_cost_is_small_and_the_guard_is_exact():
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder()
    with torch.no_grad():
        torch.compile(model, backend=rec)(x)
    folded = rec.folded
    args = [None] * (max(i for i, *_ in folded.watch) + 1)
    for i, tensor, *_ in folded.watch:
        args[i] = tensor
    assert folded.fresh(args)
    first = folded.watch[0][0]
    args[first] = args[first].detach().clone()
    assert not folded.fresh(args)


# ---------------------------------------------------------------------------------------------
# training and grad mode


def test_training_mode_outputs_and_gradients_equal_eager():
    entry = ZOO["repvgg"]
    model = entry.build().train()
    reference = entry.build().train()
    reference.load_state_dict(model.state_dict())
    (x,) = entry.example_input(model, 2)
    rec = Recorder()
    out = torch.compile(model, backend=rec)(x)
    ref = reference(x)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for b, c in zip(model.buffers(), reference.buffers()):  # running statistics updated the same way
        assert torch.equal(b, c)
    assert not any(isinstance(c, FoldedGraph) for c in rec.compiled)


def test_eval_model_with_grad_enabled_is_not_folded():
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder()
    out = torch.compile(model, backend=rec)(x)
    out.sum().backward()
    assert not any(isinstance(c, FoldedGraph) for c in rec.compiled)
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# dynamic shapes, options, registration


def test_dynamic_shapes_fold_once_and_run_other_batch_sizes():
    model = small_vit()
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, dynamic=True)
    with torch.no_grad():
        for batch in (2, 5, 9):  # (a batch of 1 is specialized by dynamo: a new graph)
            x = model.example_input(batch)
            assert close(model(x), compiled(x)), batch
    assert len(rec.compiled) == 1 and rec.folded.active


def test_inner_backend_is_chosen_by_options_or_make_backend():
    model = small_vit()
    x = model.example_input(2)
    with torch.no_grad():
        out = torch.compile(model, backend="branchfold", options={"backend": "eager"})(x)
        torch._dynamo.reset()
        out2 = torch.compile(model, backend=make_backend("aot_eager"))(x)
        ref = model(x)
    assert close(ref, out) and close(ref, out2)


def test_bad_inner_backend_is_one_readable_error():
    with pytest.raises(InputError, match="unknown inner backend"):
        branchfold_backend(None, [], options={"backend": "no-such-backend"})
    with pytest.raises(InputError, match="Inductor only"):
        branchfold_backend(None, [], options={"backend": "eager", "max_autotune": True})


def test_entry_point_works_without_importing_branchfold():
    code = textwrap.dedent(
        """
        import logging, sys, torch
        from torch import nn
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            def forward(self, x):
                return torch.relu(self.a(x) + self.b(x))
        m = M().eval()
        x = torch.randn(4, 8)
        with torch.no_grad():
            out = torch.compile(m, backend="branchfold", options={"backend": "eager"})(x)
            assert torch.allclose(out, m(x), atol=1e-6)
        print("imported", "branchfold" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "folded 1 region(s)" in done.stderr
    assert "imported True" in done.stdout


def test_inductor_hand_off_folds_and_refolds():
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder(backend="inductor")
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        assert close(model(x), compiled(x))
        model.blocks[0].attn.v.branches[0].weight.add_(0.05)
        assert close(model(x), compiled(x))
    assert rec.folded.refolds == 1 and len(rec.compiled) == 1


def test_a_failure_inside_folding_compiles_the_graph_unfolded(monkeypatch, caplog):
    import branchfold.passes.backend as backend

    def broken(self, gm):
        raise RuntimeError("recognizer bug")

    monkeypatch.setattr(backend.FoldBranchesPass, "call", broken)
    model = small_vit()
    x = model.example_input(2)
    rec = Recorder()
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
        assert close(model(x), out)
    assert not any(isinstance(c, FoldedGraph) for c in rec.compiled)
    assert "recognizer bug" in caplog.text
