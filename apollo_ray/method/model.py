"""The Transformer language model that Apollo trains: a bank of physical layers run by a plan.

`TransformerLM` owns `layers`, a bank of N "physical" Transformer layers, plus embeddings and a
tied output head. `forward(input_ids, labels, plan)` executes the physical layers listed in
`plan`, in order and with repeats, so one N-layer bank computes a model of any depth
(docs/method.md, section 2: `plan = interp_plan(N, depth)` shares layers across depth).

Two flavours, chosen by `ModelConfig.kind`, each matching Hugging Face's layout exactly so that
`apollo_ray.export.to_hf` is a pure weight copy:
- `bert`: bidirectional, post-LN, masked-LM head (HF `BertForMaskedLM`, no token types);
- `gpt`: causal, pre-LN, LM head (HF `GPT2LMHeadModel`).

`compile_blocks()` compiles two functions with `torch.compile`: one call of a layer, shared by
every layer of the bank (the layer is an argument, so any plan, depth or grown bank reuses the
same graph), and the head with its loss.

`flops_per_microbatch` counts the FLOPs of one pass by arithmetic, the way
`torch.utils.flop_counter.FlopCounterMode` counts them (checked in tests/method/test_flops.py).

Plain PyTorch: imports torch and the config only. Tests: `pytest tests/method/test_model.py`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from apollo_ray.config import ModelConfig

__all__ = ["TransformerLM", "flops_per_microbatch"]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (causal for GPT)."""

    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.n_head, self.causal, self.dropout = cfg.n_head, causal, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # (B, H, T, C/H)
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward: fc -> GELU -> proj (exact GELU for BERT, tanh for GPT-2)."""

    def __init__(self, cfg: ModelConfig, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))  # (B, T, C)


class BertLayer(nn.Module):
    """Post-LN encoder layer (Devlin et al. 2019): LayerNorm after each residual sum."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg, causal=False)
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.mlp = MLP(cfg, approximate="none")
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = self.ln_attn(x + self.drop(self.attn(x)))
        return self.ln_mlp(x + self.drop(self.mlp(x)))


class GPTBlock(nn.Module):
    """Pre-LN decoder block (GPT-2, Radford et al. 2019): LayerNorm before each sub-layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.attn = SelfAttention(cfg, causal=True)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.mlp = MLP(cfg, approximate="tanh")  # HF "gelu_new"
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(F.gelu(self.dense(x))), wte, self.bias)  # (B, T, V)


class LMHead(nn.Module):
    """GPT-2's final LayerNorm and LM head tied to the token embeddings (no bias)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.eps)

    def forward(self, x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(x), wte)  # (B, T, V)


class TransformerLM(nn.Module):
    """Embeddings -> physical layers executed as `plan` -> tied head (+ cross-entropy loss).

    `n_physical` is the size of the layer bank (default `cfg.n_layer`, the full depth L).
    """

    def __init__(self, cfg: ModelConfig, n_physical: int | None = None) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (take it from the tokenizer)")
        n_physical = cfg.n_layer if n_physical is None else n_physical
        if n_physical < 1:
            raise ValueError(f"n_physical must be at least 1, got {n_physical}")
        bert = cfg.kind == "bert"
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.ln_emb = nn.LayerNorm(cfg.d_model, eps=cfg.eps) if bert else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.head = MLMHead(cfg) if bert else LMHead(cfg)
        self.apply(_init_normal)
        self.layers = nn.ModuleList(self.new_layer() for _ in range(n_physical))
        self.run_layer, self.head_loss = _run_layer, _head_loss

    def new_layer(self) -> nn.Module:
        """A freshly initialised physical layer (also what `random` growth adds)."""
        layer = (BertLayer if self.cfg.kind == "bert" else GPTBlock)(self.cfg)
        layer.apply(_init_normal)
        if self.cfg.kind == "gpt":  # GPT-2: residual projections std 0.02/sqrt(2 L), L = full depth
            for name, p in layer.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
        return layer.to(self.wte.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        plan: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, given `labels` (B, T), the mean cross-entropy over labels != -100.

        `labels` are aligned with the logits (no shift here). `plan` lists the physical layers
        to run, in order, repeats allowed; default: each physical layer once.
        """
        seq_len = input_ids.shape[1]  # input_ids: (B, T)
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        pos = torch.arange(seq_len, device=input_ids.device)  # (T,)
        x = self.drop(self.ln_emb(self.wte(input_ids) + self.wpe(pos)))  # (B, T, C)
        for i in self.resolve_plan(plan):
            x = self.run_layer(self.layers[i], x)
        return self.head_loss(self.head, x, self.wte.weight, labels)

    def compile_blocks(self) -> None:
        """Run layers and head through `torch.compile`d functions (see the module docstring):
        a fixed handful of graphs (train and eval, per input kind) for a whole schedule."""
        self.run_layer = torch.compile(_run_layer)
        self.head_loss = torch.compile(_head_loss)

    def resolve_plan(self, plan: Sequence[int] | None) -> list[int]:
        """The plan as a list of valid physical layer indices (None: each layer once)."""
        n = len(self.layers)
        if plan is None:
            return list(range(n))
        try:
            idx = [operator.index(i) for i in plan]
        except TypeError:
            raise TypeError(f"plan must be a sequence of ints, got {plan!r}") from None
        if not idx or not all(0 <= i < n for i in idx):
            raise ValueError(f"plan must be a non-empty list of layer indices in [0, {n}): {idx}")
        return idx


def _run_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def _head_loss(
    head: nn.Module, x: torch.Tensor, wte: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(x, wte)  # (B, T, V)
    if labels is None:
        return logits, None
    return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _init_normal(module: nn.Module) -> None:
    # BERT and GPT-2 init: N(0, 0.02) weights, zero biases; LayerNorm keeps ones/zeros and the
    # MLM decoder bias starts at zero.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def flops_per_microbatch(
    cfg: ModelConfig, batch_size: int, seq_len: int, depth: int, backward: bool = True
) -> int:
    """FLOPs of one forward (and backward) pass over a (batch_size, seq_len) micro-batch.

    `depth` is the number of layers executed (`len(plan)`: a shared layer run 3 times counts 3
    times). Counted like `torch.utils.flop_counter.FlopCounterMode`: a matmul is 2*m*n*k,
    attention is its two batched matmuls (QK^T and AV, the full T x T square even when causal),
    backward is twice the forward; embeddings, norms, softmax, GELU and the loss are free.
    With N = batch_size * seq_len tokens, d = d_model, f = ff_dim, V = vocab_size:

        per layer = N * (6 d^2        qkv projection
                         + 2 d^2      attention output projection
                         + 4 T d      QK^T and AV over T = seq_len keys
                         + 4 d f)     fc and proj of the MLP
        head      = N * 2 d V (+ N * 2 d^2 for BERT's dense transform)
        forward   = depth * per layer + head;  forward + backward = 3 * forward

    (On GPUs, FlopCounterMode counts the fused flash/efficient attention backward as 5 matmuls,
    recomputing QK^T, i.e. 2.5x its forward; this counts model FLOPs, 2x, as the math path does.)
    """
    if cfg.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size must be set to count the head's FLOPs")
    d, f, tokens = cfg.d_model, cfg.ff_dim, batch_size * seq_len
    per_layer = tokens * (8 * d * d + 4 * seq_len * d + 4 * d * f)
    head = tokens * 2 * d * cfg.vocab_size + (tokens * 2 * d * d if cfg.kind == "bert" else 0)
    forward = depth * per_layer + head
    return 3 * forward if backward else forward
