"""Hugging Face vision models (random weights from a config, no download) exported with both torch
exporters fold, pass the checker and match the original in onnxruntime."""

from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch

from branchfold.passes.onnx_pipeline import fold_onnx

transformers = pytest.importorskip("transformers")


def _vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine, so that folding it into q/k/v/fc1 matters
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_hf_vit_folds_and_verifies(dynamo):
    model = _vit()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                      dynamic_shapes=({0: torch.export.Dim("batch")},)).model_proto  # fmt: skip
        else:
            f = io.BytesIO()
            torch.onnx.export(model, (x,), f, dynamo=False, input_names=["pixel_values"],
                              dynamic_axes={"pixel_values": {0: "batch"}})  # fmt: skip
            proto = onnx.load_from_string(f.getvalue())
    result = fold_onnx(proto)
    r = result.report
    assert r.verified, r.render()
    assert r.folded, r.render()  # LayerNorm affine into the q/k/v and fc1 projections
    assert r.after.ops <= r.before.ops
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in proto.graph.output]
