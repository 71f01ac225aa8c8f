"""PEFT adapters on Hugging Face models built from small configs (random weights, no downloads), shared by
the adapter tests: in memory (``passes/test_adapters_hf.py``), through the command line
(``test_cli_adapters.py``) and as the README writes them (``test_readme_adapters.py``)."""

from __future__ import annotations

import peft
import torch
import transformers as T
from torch import nn

H = 32
BUILD = {
    "bert": (lambda: T.BertModel(T.BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=2 * H, vocab_size=64)), ["query", "value"]),
    "llama": (lambda: T.LlamaModel(T.LlamaConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                                 num_key_value_heads=2, intermediate_size=2 * H, vocab_size=64)),
              ["q_proj", "v_proj"]),
}  # fmt: skip


class Hidden(nn.Module):
    """The model's last hidden state, so both captures compare one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state


def randomized(model: nn.Module) -> nn.Module:
    """Every parameter random: fresh biases are zero (a fold drops a zero bias that merge keeps) and LoRA's B
    is zero unless ``init_lora_weights=False``; norms get scales away from 1."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if scale else 0.0))
    return model


def adapted(name: str, dora: bool, subset: bool) -> nn.Module:
    build, targets = BUILD[name]
    torch.manual_seed(0)
    base = randomized(build()).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=dora, init_lora_weights=False,
                             target_modules=targets if subset else "all-linear")  # fmt: skip
    return peft.get_peft_model(base, config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
