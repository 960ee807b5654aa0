"""The regime a speedup was measured in, said beside it: tokens per non-embedding parameter,
epochs over the training split, and scratch's loss against the corpus' unigram entropy (the loss
of a model that knows only how often each token occurs). A scratch run above `PLATEAU` x that
entropy has barely left the unigram plateau, where a speedup says little about pretraining.

    r = regime(run_config, scratch_loss=2.02)
    r.describe()   # '22 tokens per parameter, 2.3 epochs, scratch at 2.02 nats against ...'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apollo_ray.config import ModelConfig, RunConfig
from apollo_ray.data import Manifest, load_manifest, open_split
from apollo_ray.method.model import TransformerLM

__all__ = ["PLATEAU", "Regime", "non_embedding_params", "regime", "unigram_entropy"]

PLATEAU = 0.8  # scratch at or above this fraction of the unigram entropy: still on the plateau
ENTROPY_TOKENS = 50_000_000  # the entropy of a larger training split is read from its start


def unigram_entropy(data: str | Path, kind: str, manifest: Manifest | None = None) -> float:
    """Entropy (nats) of the training split's token frequencies (its first `ENTROPY_TOKENS`
    tokens); for bert, over the tokens that are not special."""
    manifest = manifest or load_manifest(data)
    counts = np.zeros(manifest.vocab_size, dtype=np.float64)
    left = ENTROPY_TOKENS
    for shard in open_split(data, "train", manifest):
        counts += np.bincount(shard[:left], minlength=manifest.vocab_size)
        left -= min(left, len(shard))
        if not left:
            break
    if kind == "bert":
        counts[list(manifest.special_ids.values())] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def non_embedding_params(model: ModelConfig) -> int:
    """The full model's parameters outside its embeddings and output head (its layers)."""
    with torch.device("meta"):  # shapes only, no memory
        layers = TransformerLM(model).layers
    return sum(p.numel() for p in layers.parameters())


@dataclass(frozen=True)
class Regime:
    """How much a run of the budget trains, on what, and how far scratch got."""

    params: int  # non-embedding
    tokens: int  # the budget's training tokens
    train_tokens: int  # the training split's
    entropy: float
    scratch_loss: float | None  # scratch's final loss at the budget, on the split reported

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def epochs(self) -> float:
        return self.tokens / self.train_tokens

    @property
    def on_plateau(self) -> bool | None:
        """Whether scratch is still near the unigram plateau (None: no scratch loss)."""
        if self.scratch_loss is None:
            return None
        return self.scratch_loss >= PLATEAU * self.entropy

    def describe(self) -> str:
        text = f"{self.tokens_per_param:.3g} tokens per parameter, {self.epochs:.2g} epochs"
        if self.scratch_loss is None:
            return f"{text}, unigram entropy {self.entropy:.3g} nats"
        text += (
            f", scratch at {self.scratch_loss:.3g} nats against a unigram entropy of "
            f"{self.entropy:.3g}"
        )
        return text + (" (still near the unigram plateau)" if self.on_plateau else "")

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {
            "nonembedding_params": self.params,
            "tokens": self.tokens,
            "tokens_per_param": self.tokens_per_param,
            "epochs": self.epochs,
            "unigram_entropy": self.entropy,
            "scratch_loss": self.scratch_loss,
            "on_unigram_plateau": self.on_plateau,
        }


def regime(cfg: RunConfig, scratch_loss: float | None = None) -> Regime:
    """The regime of `cfg`'s budget on its data (local or behind a URI)."""
    manifest = load_manifest(cfg.data.path)
    t = cfg.train
    tokens = t.steps * t.grad_accum * t.micro_batch * cfg.data.seq_len * cfg.resources.workers
    return Regime(
        params=non_embedding_params(
            cfg.model.model_copy(update={"vocab_size": manifest.vocab_size})
        ),
        tokens=tokens,
        train_tokens=manifest.splits["train"].tokens,
        entropy=unigram_entropy(cfg.data.path, cfg.model.kind, manifest),
        scratch_loss=scratch_loss,
    )
