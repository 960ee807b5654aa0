"""Deterministic, shardable micro-batches of packed sequences from prepared shards.

A split's token stream is cut into fixed windows that never cross a shard boundary:
- bert: windows of `seq_len - 1` tokens, each prefixed with `[CLS]` and masked for MLM
  (BERT, Devlin et al. 2019, section 3.1: 80% `[MASK]`, 10% random token, 10% unchanged);
- gpt: windows of `seq_len + 1` tokens with stride `seq_len`; `labels` are already shifted, so
  position t predicts `labels[t]` = the token after `input_ids[t]`.

Sample b of micro-batch `micro` of optimizer step `step` on worker `rank` has the global index
    g = step * (world_size * micro_batch * grad_accum) + micro * (world_size * micro_batch)
        + rank * micro_batch + b,
so one global batch holds the same sequences whatever the split into workers and
accumulation. Train sequences are visited in a fresh permutation per epoch, seeded by
(seed, epoch); val sequences in order. MLM masks are drawn from an RNG seeded by (seed, g), so
they do not depend on the worker layout either. `labels` is -100 where there is no target.
`DeviceBatches` serves one rank's training micro-batches on its device, the next one prefetched.
(The pre-flight of a run or study is `checks.check_data`.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from ..config import DataConfig, TrainConfig
from ..storage import join_uri
from .checks import check_data, sequences, window
from .shards import Manifest, Split, open_split
from .tokenizer import Kind

__all__ = ["IGNORE_INDEX", "Batches", "DeviceBatches"]

IGNORE_INDEX = -100  # the default ignore_index of torch.nn.functional.cross_entropy


class Batches:
    """The sequences of one split of prepared data, served by (step, micro-batch, rank)."""

    def __init__(self, config: DataConfig, kind: Kind, split: Split, seed: int) -> None:
        self.config, self.kind, self.split, self.seed = config, kind, split, seed
        self.manifest: Manifest = check_data(config, kind, (split,), files=False)
        self._shards = open_split(config.path, split, self.manifest)
        self._span, self._stride = window(kind, config.seq_len)
        counts = sequences([len(s) for s in self._shards], self._span, self._stride)
        self._first = np.cumsum([0, *counts])  # index of each shard's first sequence
        self.n_sequences = int(self._first[-1])
        special = sorted(set(self.manifest.special_ids.values()))
        self._special = np.array(special)
        self._ordinary = np.setdiff1d(np.arange(self.vocab_size), self._special)
        self._epoch, self._order = -1, np.arange(0)
        # held-out masks are the same for every run, whatever its seed: runs compare on them
        self._mask_seed = seed if split == "train" else 0

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def tokenizer_path(self) -> str:
        """Where the data's `tokenizer.json` is (a local path or a URI, like `config.path`)."""
        return join_uri(self.config.path, self.manifest.tokenizer)

    def batch(
        self,
        step: int,
        micro: int,
        *,
        micro_batch: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> dict[str, torch.Tensor]:
        """`input_ids` and `labels`, both (micro_batch, seq_len) int64, for this worker."""
        if step < 0 or micro_batch < 1 or not (0 <= micro < grad_accum and 0 <= rank < world_size):
            raise ValueError(
                f"need step >= 0, micro_batch >= 1, 0 <= micro < grad_accum, 0 <= rank < "
                f"world_size; got step={step} micro={micro} micro_batch={micro_batch} "
                f"grad_accum={grad_accum} rank={rank} world_size={world_size}"
            )
        first = (
            step * world_size * micro_batch * grad_accum
            + micro * world_size * micro_batch
            + rank * micro_batch
        )
        return self.samples(first, micro_batch)

    def samples(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """`input_ids` and `labels`, both (count, seq_len) int64, of global samples `first`,
        ..., `first + count - 1` (of a held-out split: its sequences in order)."""
        return self.take(range(first, first + count))

    def spread(self, count: int) -> list[int]:
        """`count` sample indices spread over the whole split, the same for every run of this
        data and sequence length: one drawn (seed 0) from each of `count` equal strata of the
        sequences, so every part of the split, and so every document, is read in proportion.
        With fewer sequences than `count`, each sequence once and then again."""
        n = self.n_sequences
        if count >= n:
            return list(range(count))
        edges = [i * n // count for i in range(count + 1)]  # strata of 1 or more sequences
        rng = np.random.default_rng(0)
        return [int(lo + rng.integers(hi - lo)) for lo, hi in itertools.pairwise(edges)]

    def take(self, samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """`input_ids` and `labels`, both (len(samples), seq_len) int64, of these global
        sample indices."""
        windows = np.stack([self._window(self._sequence(g)) for g in samples]).astype(np.int64)
        if self.kind == "gpt":
            input_ids, labels = windows[:, :-1], windows[:, 1:]
        else:
            input_ids, labels = self._mask(windows, samples)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(input_ids)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }

    def _sequence(self, g: int) -> int:
        """Which sequence global sample `g` reads."""
        epoch, i = divmod(g, self.n_sequences)
        if self.split != "train":  # held-out splits: their sequences in order
            return i
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n_sequences)
        return int(self._order[i])

    def _window(self, sequence: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first, sequence, side="right")) - 1
        start = (sequence - int(self._first[shard])) * self._stride
        return self._shards[shard][start : start + self._span]

    def _mask(self, windows: np.ndarray, samples: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Prefix `[CLS]` and mask: returns (input_ids, labels), each (B, T)."""
        ids = self.manifest.special_ids
        input_ids = np.concatenate([np.full((len(windows), 1), ids["cls"]), windows], axis=1)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        maskable = ~np.isin(input_ids, self._special)
        for b, g in enumerate(samples):
            rng = np.random.default_rng([self._mask_seed, g])
            chosen = maskable[b] & (rng.random(input_ids.shape[1]) < self.config.mlm_probability)
            if not chosen.any() and maskable[b].any():  # every sample gets a target
                chosen[rng.choice(np.flatnonzero(maskable[b]))] = True
            labels[b, chosen] = input_ids[b, chosen]
            action = rng.random(input_ids.shape[1])
            input_ids[b, chosen & (action < 0.8)] = ids["mask"]
            replace = chosen & (action >= 0.8) & (action < 0.9)
            input_ids[b, replace] = rng.choice(self._ordinary, size=int(replace.sum()))
        return input_ids, labels


class DeviceBatches:
    """This rank's training micro-batches on the device, the next one built and copied while
    the current one runs (from pinned memory on a GPU, so the copy does not wait for the
    kernels queued before it)."""

    def __init__(
        self, data: Batches, cfg: TrainConfig, device: torch.device, rank: int, world_size: int
    ) -> None:
        self.data, self.cfg, self.device = data, cfg, device
        self.rank, self.world_size = rank, world_size
        self._ready: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of micro-batch (step, micro): the prefetched one, or built now."""
        if (step, micro) not in self._ready:
            self.prefetch(step, micro)
        return self._ready.pop((step, micro))

    def prefetch(self, step: int, micro: int) -> None:
        """Build micro-batch (step, micro) and start its copy to the device."""
        batch = self.data.batch(
            step,
            micro,
            micro_batch=self.cfg.micro_batch,
            grad_accum=self.cfg.grad_accum,
            rank=self.rank,
            world_size=self.world_size,
        )
        pin = self.device.type == "cuda"
        ids, labels = (
            (t.pin_memory() if pin else t).to(self.device, non_blocking=pin)
            for t in (batch["input_ids"], batch["labels"])
        )
        self._ready = {(step, micro): (ids, labels)}
