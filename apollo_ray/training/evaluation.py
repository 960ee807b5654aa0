"""Held-out evaluation at full depth: a quick loss during training, and the final one that runs
are compared by, read on the whole validation split (and the test split) with its standard error.

The quick loss reads one fixed sample of validation sequences spread over the whole split
(`Batches.spread`: the same sequences, and for bert the same masks, for every run of the data
and sequence length), so any two evaluations of any two runs compare: a scratch checkpoint
mid-run against the frontier, a trial against scratch at equal compute. The final evaluation
reads that sample too (`eval_sample_loss`). Selection (the search's objective, the confirmation,
the frontier's sweep) reads validation; the test split is read once, at the end, for the numbers
a person reads (`test_loss`, ...).

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
    """Evaluates a model on the validation split `data` of run `cfg` (and at the end on its
    test split `test`, when the data has one)."""

    def __init__(
        self,
        data: Batches,
        cfg: RunConfig,
        device: torch.device,
        autocast: AbstractContextManager,
        rank: int = 0,
        world_size: int = 1,
        test: Batches | None = None,
    ) -> None:
        self.data, self.test, self.cfg = data, test, cfg
        self.device, self.autocast = device, autocast
        self.rank, self.world_size = rank, world_size
        train = cfg.train
        self.sample = data.spread(train.eval_batches * train.micro_batch)

    @torch.no_grad()
    def loss(self, model: TransformerLM, plan: Sequence[int]) -> float:
        """Mean loss over the fixed sample of `train.eval_batches` validation micro-batches
        spread over the split (a split with fewer sequences is read again, so one sequence is
        enough)."""
        model.eval()
        size = self.cfg.train.micro_batch
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss * n, n)
        for i in range(self.rank, self.cfg.train.eval_batches, self.world_size):
            batch = self.data.take(self.sample[i * size : (i + 1) * size])
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
        """The final held-out losses: `eval_loss` with its standard error `eval_loss_se`,
        `eval_accuracy` and `eval_tokens` on the validation split (`whole`), the same as
        `test_*` on the test split when there is one, and `eval_sample_loss`, the quick loss's
        sample read at the end."""
        result = {f"eval_{k}": v for k, v in self.whole(self.data, model, plan).items()}
        if self.test is not None:
            result |= {f"test_{k}": v for k, v in self.whole(self.test, model, plan).items()}
        return result | {"eval_sample_loss": self.loss(model, plan)}

    @torch.no_grad()
    def whole(self, data: Batches, model: TransformerLM, plan: Sequence[int]) -> dict[str, Any]:
        """A held-out split read whole, or as many of its sequences as give
        `train.final_eval_tokens` predicted tokens: `loss`, its standard error `loss_se` (over
        sequences, as a ratio estimate; None for one sequence), `accuracy`, the fraction of
        predicted tokens whose most likely token is the label (bert: masked-LM accuracy; gpt:
        next-token accuracy), and `tokens`, the number of predicted tokens read."""
        model.eval()
        train, config = self.cfg.train, self.cfg.data
        mlm = self.cfg.model.kind == "bert"
        per_sequence = config.mlm_probability * (config.seq_len - 1) if mlm else config.seq_len
        wanted = math.ceil(1.1 * train.final_eval_tokens / per_sequence)  # MLM varies: +10%
        count = min(data.n_sequences, wanted)
        # per sequence i, l_i summed over its n_i predicted tokens: l, n, l^2, n^2, l n, 1, and
        # the predictions that are right
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        step = self.world_size * train.micro_batch
        for first in range(self.rank * train.micro_batch, count, step):
            batch = data.samples(first, min(train.micro_batch, count - first))
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
        return {"loss": mean, "loss_se": se, "accuracy": right / n_sum, "tokens": int(n_sum)}
