"""PlainCallingConventionPass: export's pytree wrapper goes only where it changes nothing."""

import torch
from torch import nn

import branchfold


class Branches(nn.Module):
    def __init__(self, out: str = "tensor") -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), out

    def forward(self, x):
        y = torch.relu(self.a(x) + self.b(x))
        if self.out == "tuple":
            return y, y * 2
        if self.out == "dict":
            return {"y": y, "z": y * 2}
        return y


def _fold(model, *args, **kwargs):
    return branchfold.fold(model.eval(), args, kwargs or None)


def test_a_tensor_output_model_loses_the_wrapper_and_returns_a_tensor():
    m, x = Branches("tensor"), torch.randn(4, 8)
    folded = _fold(m, x)
    assert "tree_flatten_spec" not in folded.code and "_guards_fn" in folded.code  # input guards stay
    out = folded(x)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, m(x), atol=1e-5)
    assert torch.allclose(folded(x=x), out)  # the argument name still works as a keyword


def test_a_tuple_output_model_returns_the_same_tuple():
    m, x = Branches("tuple"), torch.randn(4, 8)
    folded = _fold(m, x)
    assert "tree_flatten_spec" not in folded.code
    out = folded(x)
    assert isinstance(out, tuple) and len(out) == 2 and torch.allclose(out[1], m(x)[1], atol=1e-5)


def test_a_dict_output_keeps_the_wrapper():
    m, x = Branches("dict"), torch.randn(4, 8)
    folded = _fold(m, x)
    assert "tree_unflatten" in folded.code
    assert set(folded(x)) == {"y", "z"}


def test_keyword_inputs_keep_the_wrapper():
    class KeywordInput(Branches):
        def forward(self, x, *, scale):
            return super().forward(x) * scale

    m, x = KeywordInput(), torch.randn(4, 8)
    folded = _fold(m, x, scale=torch.tensor(2.0))
    assert "tree_flatten_spec" in folded.code
    assert torch.allclose(folded(x, scale=torch.tensor(2.0)), m(x, scale=torch.tensor(2.0)), atol=1e-5)
