"""FLOPs parity: `flops_per_microbatch` against torch's own `FlopCounterMode` on the real model.

On CPU the default SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`) has no flop
formula, so FlopCounterMode would count attention as 0; the MATH backend runs attention as
plain bmm's, which it counts (2 forward, 4 backward). Run: `pytest tests/method/test_flops.py`.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from apollo_ray.config import ModelConfig
from apollo_ray.method.model import TransformerLM, flops_per_microbatch

B, T = 2, 16


def tiny(kind: str) -> ModelConfig:
    return ModelConfig(
        kind=kind, n_layer=3, d_model=64, n_head=4, d_ff=192, vocab_size=100, max_seq_len=32
    )


@pytest.mark.parametrize("plan", [[0], [0, 0, 0], [0, 1, 2, 1]])
@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_flops_match_flop_counter(kind: str, plan: list[int]) -> None:
    torch.manual_seed(0)
    cfg = tiny(kind)
    model = TransformerLM(cfg)
    x = torch.randint(0, 100, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(x, x, plan=plan)
        forward = counter.get_total_flops()
        loss.backward()
    total = counter.get_total_flops()
    predicted = flops_per_microbatch(cfg, B, T, depth=len(plan))
    rel = (predicted - total) / total
    assert predicted == total, f"relative error {rel:.2e}"
    assert flops_per_microbatch(cfg, B, T, len(plan), backward=False) == forward


def test_flops_formula_by_hand() -> None:
    # GPT-2 small per token, no backward: 12 * (24 d^2 + 4 T d) + 2 d V with f = 4d.
    cfg = ModelConfig(kind="gpt", vocab_size=50257)
    d, t = 768, 1024
    expected = 12 * (24 * d * d + 4 * t * d) + 2 * d * 50257
    assert flops_per_microbatch(cfg, 1, t, 12, backward=False) == t * expected
    with pytest.raises(ValueError, match="vocab_size"):
        flops_per_microbatch(ModelConfig(kind="gpt"), 1, t, 12)
