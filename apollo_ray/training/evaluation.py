"""Held-out evaluation at full depth: a quick loss during training, and the final one that runs
are compared by, read on the whole validation split with its standard error.

Both split the work over the data-parallel ranks and all-reduce sums, so every rank gets the
same value whatever the number of workers. Loss is per predicted token (every position for
gpt, the masked ones for bert).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from apollo_ray.config import RunConfig
from apollo_ray.data.batches import IGNORE_INDEX, Batches
from apollo_ray.method.model import TransformerLM

__all__ = ["Evaluator"]


class Evaluator:
    """Evaluates a model on the validation split `data` of run `cfg`."""

    def __init__(
        self,
        data: Batches,
        cfg: RunConfig,
        device: torch.device,
        autocast: AbstractContextManager,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data, self.cfg, self.device, self.autocast = data, cfg, device, autocast
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def loss(self, model: TransformerLM, plan: Sequence[int]) -> float:
        """Mean loss over the first `train.eval_batches` validation micro-batches (a split with
        fewer sequences is read again from its first one, so one sequence is enough)."""
        model.eval()
        train = self.cfg.train
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss * n, n)
        for i in range(self.rank, train.eval_batches, self.world_size):
            batch = self.data.batch(i, 0, micro_batch=train.micro_batch)
            labels = batch["labels"].to(self.device)
            with self.autocast:
                _, loss = model(batch["input_ids"].to(self.device), labels, plan=plan)
            n = (labels != IGNORE_INDEX).sum()
            sums += torch.stack([loss.double() * n, n.double()])
        if self.world_size > 1:
            dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    @torch.no_grad()
    def final(self, model: TransformerLM, plan: Sequence[int]) -> dict[str, Any]:
        """The final held-out loss, read on the whole validation split or on as many of its
        sequences as give `train.final_eval_tokens` predicted tokens: `eval_loss`, its standard
        error `eval_loss_se` (over sequences, as a ratio estimate; None for one sequence),
        `eval_accuracy`, the fraction of predicted tokens whose most likely token is the label
        (bert: masked-LM accuracy; gpt: next-token accuracy), and `eval_tokens`, the number of
        predicted tokens read."""
        model.eval()
        train, data = self.cfg.train, self.cfg.data
        mlm = self.cfg.model.kind == "bert"
        per_sequence = data.mlm_probability * (data.seq_len - 1) if mlm else data.seq_len
        wanted = math.ceil(1.1 * train.final_eval_tokens / per_sequence)  # MLM varies: +10%
        count = min(self.data.n_sequences, wanted)
        # per sequence i, l_i summed over its n_i predicted tokens: l, n, l^2, n^2, l n, 1, and
        # the predictions that are right
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        step = self.world_size * train.micro_batch
        for first in range(self.rank * train.micro_batch, count, step):
            batch = self.data.samples(first, min(train.micro_batch, count - first))
            labels = batch["labels"].to(self.device)  # (B, T)
            with self.autocast:
                logits, _ = model(batch["input_ids"].to(self.device), plan=plan)  # (B, T, V)
            token_loss = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), reduction="none"
            ).view(labels.shape)  # (B, T): 0 where labels == IGNORE_INDEX
            loss, n = token_loss.double().sum(1), (labels != IGNORE_INDEX).double().sum(1)
            right = (logits.argmax(-1) == labels).double().sum(1)  # labels -100 never match
            sums += torch.stack(
                [loss, n, loss * loss, n * n, loss * n, torch.ones_like(n), right]
            ).sum(1)
        if self.world_size > 1:
            dist.all_reduce(sums)
        l_sum, n_sum, l_sq, n_sq, l_n, m, right = sums.tolist()
        mean, se = l_sum / n_sum, None
        if m > 1:  # the ratio estimator's variance: sum (l_i - mean n_i)^2 / (m (m-1) nbar^2)
            spread = max(l_sq - 2 * mean * l_n + mean**2 * n_sq, 0.0)
            se = math.sqrt(spread / (m * (m - 1))) / (n_sum / m)
        return {
            "eval_loss": mean,
            "eval_loss_se": se,
            "eval_accuracy": right / n_sum,
            "eval_tokens": int(n_sum),
        }
