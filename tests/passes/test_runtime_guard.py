"""The runtime guard: a fold must keep every fusion onnxruntime (and its transformer optimizer) makes of the
original; regions whose rewrite loses one are undone and reported as ``lost-fusion``.

The harmful folds are real: branchfold used to fold GELU's ``Mul 0.5`` into the next MatMul (exact, and
onnxruntime no longer fused the GELU). Since decomposed nonlinearities are kept whole
(``patterns/onnx_nonlinear.py``), such a fold only happens with that protection switched off, which is
what ``unprotected`` does: the guard is the safety net for every pattern the recognizers do not know.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

import branchfold
from branchfold import cli
from branchfold.passes import runtime_guard as rg
from branchfold.passes.onnx_pipeline import fold_onnx
from branchfold.passes.runtime_guard import FusionGuard, Profile, profile_of, runtime_profile
from branchfold.storage.onnx_weights import stand_in_file
from branchfold.zoo import ZOO

R = np.random.default_rng(0)
GELU_CONSTS = {"sqrt2": np.float32(math.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}


def gelu(src: str, out: str) -> list[onnx.NodeProto]:
    """GELU as the legacy exporter writes it below opset 20: x · (1 + erf(x / √2)) · 0.5."""
    return [
        helper.make_node("Div", [src, "sqrt2"], [f"{out}_d"]),
        helper.make_node("Erf", [f"{out}_d"], [f"{out}_e"]),
        helper.make_node("Add", [f"{out}_e", "one"], [f"{out}_e1"]),
        helper.make_node("Mul", [src, f"{out}_e1"], [f"{out}_p"]),
        helper.make_node("Mul", [f"{out}_p", "half"], [out]),
    ]


def weights(*names: str, size: int = 16) -> dict[str, np.ndarray]:
    return {n: R.standard_normal((size, size)).astype(np.float32) / 4 for n in names}


@pytest.fixture
def mlp(make_onnx) -> onnx.ModelProto:
    """x → (x·w0 + x·w1 + b) → GELU → ·w2: a parallel sum before the GELU (a fold that keeps the fusion)
    and GELU's ``Mul 0.5`` before a MatMul (a fold that loses it)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("MatMul", ["x", "w1"], ["c"]),
        helper.make_node("Add", ["a", "c"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["h"]),
        *gelu("h", "g"),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ]
    inits = {**weights("w0", "w1", "w2"), "b": R.standard_normal(16).astype(np.float32), **GELU_CONSTS}
    return make_onnx(nodes, [("x", ["N", 8, 16])], [("y", ["N", 8, 16])], inits, opset=17)


@pytest.fixture
def unprotected(monkeypatch):
    """Decomposed nonlinearities are not kept whole: folds into GELU happen as the algebra allows."""
    from branchfold.patterns import onnx_ops

    monkeypatch.setattr(onnx_ops.OnnxContext, "nonlinearity", lambda self, node: None)


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def linears(proto: onnx.ModelProto) -> int:
    c = Counter(n.op_type for n in proto.graph.node)
    return c["MatMul"] + c["Gemm"]


# ----------------------------------------------------------------------------------------------
# what is counted: the kinds onnxruntime really writes


def _model(make_onnx, nodes, inits, shape, opset=17):
    """The case's nodes (which write ``y``) followed by a Neg: onnxruntime leaves a chain that writes a graph
    output unfused."""
    for node in nodes:
        node.output[:] = ["out" if o == "y" else o for o in node.output]
    nodes = [*nodes, helper.make_node("Neg", ["out"], ["y"])]
    return make_onnx(nodes, [("x", shape)], [("y", None)], inits, opset=opset)


def _tanh_gelu() -> tuple[list, dict]:
    """GPT-2's gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    nodes = [helper.make_node("Pow", ["x", "three"], ["x3"]), helper.make_node("Mul", ["x3", "k"], ["kx3"]),
             helper.make_node("Add", ["x", "kx3"], ["inner"]), helper.make_node("Mul", ["inner", "c"], ["ci"]),
             helper.make_node("Tanh", ["ci"], ["t"]), helper.make_node("Add", ["t", "one"], ["t1"]),
             helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Mul", ["hx", "t1"], ["y"])]  # fmt: skip
    consts = {"three": np.float32(3), "k": np.float32(0.044715), "c": np.float32(math.sqrt(2 / math.pi)),
              "one": np.float32(1), "half": np.float32(0.5)}  # fmt: skip
    return nodes, consts


def _norm(rms: bool) -> tuple[list, dict]:
    """LayerNorm (or RMSNorm) over the last axis, decomposed as the legacy exporter writes it."""
    nodes = [] if rms else [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["c"])]
    src = "x" if rms else "c"
    nodes += [helper.make_node("Pow", [src, "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
              helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
              helper.make_node("Div", [src, "sd"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["y" if rms else "ng"])]  # fmt: skip
    if not rms:
        nodes.append(helper.make_node("Add", ["ng", "beta"], ["y"]))
    consts = {"two": np.float32(2), "eps": np.float32(1e-5), "gamma": R.uniform(0.5, 1.5, 16).astype(np.float32),
              "beta": R.standard_normal(16).astype(np.float32)}  # fmt: skip
    return nodes, consts


CASES = {
    "erf GELU, opset 17": (lambda: (gelu("x", "y"), GELU_CONSTS), [2, 8, 16], 17, "Gelu"),
    "erf GELU, opset 20": (lambda: (gelu("x", "y"), GELU_CONSTS), [2, 8, 16], 20, "Gelu"),
    "bias + erf GELU": (
        lambda: ([helper.make_node("Add", ["x", "b"], ["h"]), *gelu("h", "y")],
                 {**GELU_CONSTS, "b": R.standard_normal(16).astype(np.float32)}),
        [2, 8, 16], 17, "BiasGelu",
    ),  # fmt: skip
    "tanh GELU (GPT-2)": (_tanh_gelu, [2, 8, 16], 17, "FastGelu"),
    "x * sigmoid(x)": (
        lambda: ([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])], {}),
        [2, 8, 16], 17, "QuickGelu",
    ),  # fmt: skip
    "LayerNorm, decomposed": (lambda: _norm(rms=False), [2, 8, 16], 17, "LayerNormalization"),
    "RMSNorm, decomposed": (lambda: _norm(rms=True), [2, 8, 16], 17, "SimplifiedLayerNormalization"),
    "residual + LayerNormalization": (
        lambda: ([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["x", "m"], ["r"]),
                  helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["y"], axis=-1)],
                 {**weights("w"), "gamma": np.ones(16, np.float32), "beta": np.zeros(16, np.float32)}),
        [2, 8, 16], 17, "SkipLayerNormalization",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_profile_counts_what_onnxruntime_fuses(make_onnx, case):
    build, shape, opset, kind = CASES[case]
    nodes, inits = build()
    profile = runtime_profile(_model(make_onnx, nodes, inits, shape, opset))
    assert profile.fused[kind] >= 1, profile


def test_profile_ignores_the_linear_ops_a_fold_merges():
    def node(op, domain="", **attrs):
        return helper.make_node(op, ["x"], ["y"], domain=domain, **attrs)

    nodes = [node("Gemm"), node("MatMul"), node("FusedMatMul", "com.microsoft"), node("Conv", "com.microsoft.nchwc"),
             node("Conv", "com.microsoft.nchwc", activation="Relu"), node("FusedGemm", "com.microsoft", activation="Relu"),
             node("MaxPool", "com.microsoft.nchwc"), node("ReorderInput", "com.microsoft.nchwc"),
             node("ReorderOutput", "com.microsoft.nchwc"), node("Gelu", "com.microsoft"), node("Gelu"), node("Relu"),
             node("LayerNormalization")]  # fmt: skip
    profile = profile_of(nodes)
    assert profile.fused == Counter({"Gelu": 2, "LayerNormalization": 1})
    assert profile.reorders == 2


def test_a_sum_of_matmuls_folded_before_relu_loses_nothing(make_onnx):
    """Two MatMuls summed before a Relu become a Gemm with its Relu fused (FusedGemm); the folded single
    MatMul keeps its Relu apart. That is not a lost fusion: the fold is the faster model."""
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["x", "w1"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]  # fmt: skip
    proto = make_onnx(nodes, [("x", ["N", 16])], [("y", ["N", 16])], weights("w0", "w1"))
    result = fold_onnx(proto)
    assert len(result.report.folded) == 1 and linears(result.model) == 1
    assert FusionGuard(proto).losses(result.model) == []


def test_losses_compare_families_and_name_what_was_lost():
    original = Profile(Counter({"BiasGelu": 4, "SkipLayerNormalization": 2}), reorders=30)
    assert rg.losses(original, Profile(Counter({"Gelu": 4, "LayerNormalization": 2}), 30), "ort") == []
    (gelu_loss, reorders) = rg.losses(original, Profile(Counter({"SkipLayerNormalization": 2}), 57), "onnxruntime")
    assert str(gelu_loss) == "onnxruntime fuses 4 BiasGelu in the original, 0 after this fold"
    assert str(reorders) == "onnxruntime's NCHWc layout needs 30 reorders in the original, 57 after this fold"
    (partial,) = rg.losses(original, Profile(Counter({"Gelu": 1, "BiasGelu": 2, "SkipLayerNormalization": 2}), 0), "x")
    assert (partial.kind, partial.before, partial.after) == ("Gelu", 4, 3)


def test_guard_sees_a_gelu_lost_to_an_exact_fold(mlp):
    """GELU's ``Mul 0.5`` moved into the next MatMul: the same function, and onnxruntime no longer fuses it."""
    harmed = onnx.ModelProto()
    harmed.CopyFrom(mlp)
    (mul,) = [n for n in harmed.graph.node if n.output == ["g"]]
    (matmul,) = [n for n in harmed.graph.node if n.input[:1] == ["g"]]
    w2 = next(t for t in harmed.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w2) * np.float32(0.5), "w2"))
    harmed.graph.node.remove(mul)
    matmul.input[0] = "g_p"
    x = R.standard_normal((2, 8, 16)).astype(np.float32)
    np.testing.assert_allclose(run(harmed, x), run(mlp, x), rtol=1e-5, atol=1e-6)
    guard = FusionGuard(mlp)
    assert guard.reference["onnxruntime"].fused == Counter({"BiasGelu": 1})
    assert guard.losses(mlp) == []
    (loss,) = guard.losses(harmed)
    assert (loss.tool, loss.kind, loss.before, loss.after) == ("onnxruntime", "Gelu", 1, 0)
    assert str(loss) == "onnxruntime fuses 1 BiasGelu in the original, 0 after this fold"


# ----------------------------------------------------------------------------------------------
# the guard in fold_onnx


def test_region_that_loses_a_fusion_is_undone_and_reported(mlp, unprotected):
    unguarded = fold_onnx(mlp, runtime_guard=False)
    assert len(unguarded.report.folded) == 2  # the parallel sum, and Mul 0.5 into w2
    assert rg.family_counts(runtime_profile(unguarded.model))["Gelu"] == 0  # the harm the guard must catch

    result = fold_onnx(mlp)
    r = result.report
    assert r.verified
    assert [f.kind for f in r.folded] == ["parallel-sum"]
    (lost,) = [s for s in r.not_folded if s.reason == "lost-fusion"]
    assert lost.detail == "onnxruntime fuses 1 BiasGelu in the original, 0 after this fold"
    assert r.not_folded[0] is lost  # rewrites undone are listed first
    assert rg.family_counts(runtime_profile(result.model))["Gelu"] == 1  # the output keeps the fusion
    assert linears(result.model) == 2 and linears(mlp) == 3
    assert r.to_dict()["skipped_by_reason"]["lost-fusion"] == 1
    assert "lost-fusion" in r.render() and "BiasGelu" in r.render()
    x = R.standard_normal((2, 8, 16)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, x), run(mlp, x), rtol=1e-5, atol=1e-6)


def test_runtime_guard_false_turns_it_off_and_the_api_accepts_it(mlp, unprotected):
    folded = branchfold.fold_with_report(mlp, runtime_guard=False)
    assert len(folded.report.folded) == 2 and "lost-fusion" not in folded.report.skipped_by_reason()
    assert fold_onnx(mlp, verify=False).report.skipped_by_reason().get("lost-fusion") is None  # only when verifying


def test_guard_does_not_change_a_fold_that_keeps_every_fusion(mlp):
    """With nonlinearities kept whole, the parallel sum is the only region: kept, nothing reported lost."""
    on, off = fold_onnx(mlp), fold_onnx(mlp, runtime_guard=False)
    assert [f.at for f in on.report.folded] == [f.at for f in off.report.folded]
    assert on.model.SerializeToString() == off.model.SerializeToString()
    assert "lost-fusion" not in on.report.skipped_by_reason()


def _export(model, args, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17)
    return onnx.load_from_string(f.getvalue())


def test_seed_vit_folds_as_before():
    """A fold that keeps every fusion is untouched by the guard: the legacy export (opset 17, GELU decomposed)
    still folds to the plain ViT's linear count, nothing is reported lost, and the guard finds no loss."""
    entry = ZOO["seed-vit-k2"]
    model = entry.build().eval()
    x = entry.example_input(model, 1)
    proto = _export(model, x, dynamo=False)
    result = fold_onnx(proto)
    assert result.report.verified and "lost-fusion" not in result.report.skipped_by_reason()
    assert linears(result.model) <= linears(_export(entry.single_path(model).eval(), x, dynamo=False)) < linears(proto)
    assert FusionGuard(proto).losses(result.model) == []


# ----------------------------------------------------------------------------------------------
# the command line


def test_cli_flags(mlp, unprotected, tmp_path, capsys):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp, src)
    assert cli.main(["fold", str(src), "-o", str(tmp_path / "a.onnx"), "--json"]) == 0
    guarded = json.loads(capsys.readouterr().out)
    assert guarded["skipped_by_reason"].get("lost-fusion") == 1
    assert cli.main(["fold", str(src), "-o", str(tmp_path / "b.onnx"), "--json", "--no-runtime-guard"]) == 0
    unguarded = json.loads(capsys.readouterr().out)
    assert "lost-fusion" not in unguarded["skipped_by_reason"] and len(unguarded["folded"]) == 2
    argv = ["fold", str(src), "-o", str(tmp_path / "c.onnx"), "--json", "--no-runtime-guard"]
    assert cli.main([*argv, "--transformer-model-type", "bert"]) == 0
    (lost,) = [s for s in json.loads(capsys.readouterr().out)["not_folded"] if s["reason"] == "lost-fusion"]
    assert lost["detail"].startswith("onnxruntime's transformer optimizer (bert) fuses 1 ")
    assert cli.main([*argv, "--transformer-model-type", "nosuch"]) == 2
    assert "unknown transformer model type 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "d.onnx").exists()


# ----------------------------------------------------------------------------------------------
# onnxruntime's transformer optimizer on a small Hugging Face BERT

transformers = pytest.importorskip("transformers")


class _Bert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=128, vocab_size=100, attn_implementation="eager")  # fmt: skip
        torch.manual_seed(0)
        self.bert = transformers.BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def bert() -> onnx.ModelProto:
    ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    return _export(_Bert().eval(), (ids, mask), dynamo=False)


def test_transformer_guard_on_bert(bert, unprotected):
    tool = "onnxruntime's transformer optimizer (bert)"
    reference = rg.family_counts(rg.transformer_profile(bert, "bert"))
    assert reference["Gelu"] == 2 and reference["LayerNormalization"] >= 4
    unguarded = fold_onnx(bert, runtime_guard=False)
    assert rg.family_counts(rg.transformer_profile(unguarded.model, "bert"))["Gelu"] < 2  # the harm
    result = fold_onnx(bert, runtime_guard=False, transformer_guard="bert")
    r = result.report
    assert r.verified
    lost = [s for s in r.not_folded if s.reason == "lost-fusion"]
    assert lost and all(s.detail.startswith(f"{tool} fuses ") for s in lost)
    assert rg.family_counts(rg.transformer_profile(result.model, "bert")) == reference
    assert FusionGuard(bert, runtime=False, transformer="bert").losses(result.model) == []


def test_transformer_guard_rejects_an_unknown_model_type(bert):
    with pytest.raises(branchfold.InputError, match="unknown transformer model type 'bret'"):
        fold_onnx(bert, transformer_guard="bret")


class _Gpt2(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, attn_implementation="eager")
        torch.manual_seed(0)
        self.gpt2 = transformers.GPT2Model(config).eval()

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        return self.gpt2(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=False).last_hidden_state  # fmt: skip


def test_gpt2_fold_keeps_every_transformer_fusion():
    """A fold that keeps every fusion is left as it is under both guards."""
    ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    gpt2 = _export(_Gpt2().eval(), (ids, mask), dynamo=False)
    result = fold_onnx(gpt2, transformer_guard="gpt2")
    r = result.report
    assert r.verified and r.folded and "lost-fusion" not in r.skipped_by_reason()
    assert r.after.ops < r.before.ops
    reference = rg.family_counts(rg.transformer_profile(gpt2, "gpt2"))
    assert reference["FastGelu"] == 2  # GPT-2's tanh GELU, fused by the transformer optimizer
    assert rg.family_counts(rg.transformer_profile(result.model, "gpt2")) == reference


# ----------------------------------------------------------------------------------------------
# the weights a fold wrote go to the guard's optimizer as stand-ins


def _file_backed(proto: onnx.ModelProto, tmp_path, name: str):
    from branchfold.storage import onnx_io

    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, path)
    return onnx_io.load(path)


def _models_with_folded_weights():
    """Real exports whose fold writes weights: BERT (unprotected, so GELU constants move into MatMuls and
    the profile changes), GPT-2, a multi-branch ViT and a RepVGG conv stack (NCHWc layout)."""
    ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    yield "bert", _export(_Bert().eval(), (ids, mask), dynamo=False), True
    yield "gpt2", _export(_Gpt2().eval(), (ids, mask), dynamo=False), False
    for zoo_name in ("seed-vit-k2", "repvgg"):
        entry = ZOO[zoo_name]
        model = entry.build().eval()
        yield zoo_name, _export(model, entry.example_input(model, 1), dynamo=False), False


def test_stand_ins_give_the_optimizer_the_graph_it_builds_from_the_real_weights(tmp_path, monkeypatch):
    """The guard's candidate sessions take each weight the fold wrote as a region of the model's own file
    (no copy: GPT-2 124M's 24 folded weights cost 190 MB as OrtValues). onnxruntime's optimizer must build
    the same graph from them as from the real values: same fused kinds and reorders, and, as a check that
    this test can tell graphs apart, the unprotected BERT fold's profile differs from its original's."""
    from branchfold.patterns import onnx_ops

    for name, proto, unprotect in _models_with_folded_weights():
        with monkeypatch.context() as patch:
            if unprotect:
                patch.setattr(onnx_ops.OnnxContext, "nonlinearity", lambda self, node: None)
            original = _file_backed(proto, tmp_path, name)
            folded = fold_onnx(original, verify=False).model
        written = [v for v in folded.graph.initializers.values() if v.const_value is not None
                   and not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= 1024]  # fmt: skip
        assert written, name  # the fold wrote weights: they are what the stand-ins replace
        real = runtime_profile(folded, weights="initializers")
        assert runtime_profile(folded, stand_in=stand_in_file(original)) == real, name
        if unprotect:
            assert rg.family_counts(real) != rg.family_counts(runtime_profile(original)), name


def test_stand_ins_fall_back_to_values_where_no_file_holds_the_weights(mlp):
    """A model built in memory has no file to take regions of: the weights go to the runtime as values."""
    folded = fold_onnx(mlp, verify=False, runtime_guard=False).model
    assert stand_in_file(ir.from_proto(mlp)) is None
    assert runtime_profile(folded) == runtime_profile(folded, weights="initializers")


def test_the_transformer_optimizer_is_quieted_through_its_own_loggers_only():
    """No process-wide switch: ``logging.disable`` stays as it was, other loggers keep talking, and the
    filter is gone afterwards."""
    import logging

    import onnxruntime.transformers.optimizer  # noqa: F401  (imports the modules that log under bare names)

    talker, other = logging.getLogger("onnx_model"), logging.getLogger("someone.else")

    def passes(logger: logging.Logger, level: int) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, level, __file__, 0, "fusing", (), None)))

    disabled = logging.root.manager.disable
    with rg._quiet_logging():
        assert logging.root.manager.disable == disabled
        assert not passes(talker, logging.WARNING) and passes(talker, logging.ERROR)
        assert passes(other, logging.WARNING)
    assert passes(talker, logging.WARNING) and talker.filters == []
