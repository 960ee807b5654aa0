"""The training loop on one process: the progressive schedule (stages, sampled depths, growth),
AdamW with warmup + decay, accumulation, clipping, evaluation at full depth, FLOPs counted from
what ran, and checkpoints that resume bit-identically.

`Trainer(cfg).fit()` is the whole job; `python -m apollo_ray.train RUN.yaml` is its command line.
The same loop runs as one data-parallel rank of a Ray Train run (`apollo_ray.launch.distributed`):
it then wraps the model in DDP, shards batches by rank, all-reduces loss and eval metrics, and hands
checkpoints to a `Store` that reports them to Ray instead of writing files.
A `TrainState` (step, tokens, FLOPs, wall time) is saved with the model, the optimizer and the
RNG state. Batches, depths and plans are pure functions of (seed, step, micro-batch), so the step
is the data and sampler cursor, and growth is seeded by (seed, stage).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from apollo_ray.config import ConfigError, RunConfig
from apollo_ray.data.batches import Batches, DeviceBatches
from apollo_ray.method.growth import grow, make_growth
from apollo_ray.method.model import TransformerLM, flops_per_microbatch
from apollo_ray.method.schedule import Schedule
from apollo_ray.training.checkpoints import (
    CHECKPOINT_FORMAT,
    LocalStore,
    Store,
    check_same_run,
    checkpoint_name,
    rng_states,
    set_rng_state,
)
from apollo_ray.training.evaluation import Evaluator
from apollo_ray.training.faults import FaultInjection
from apollo_ray.training.fork import load_fork
from apollo_ray.training.late_read import LateRead
from apollo_ray.training.optim import autocast_for, build_optimizer, compile_wanted, progressive_lr
from apollo_ray.training.runlog import METRICS, MetricsLog, read_rows, record_resume
from apollo_ray.training.tracker import NullTracker, Tracker

__all__ = ["TrainState", "Trainer"]


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    flops: int = 0
    wall_time: float = 0.0
    eval_loss: float | None = None


class Trainer:
    """Builds model, optimizer and data from a `RunConfig` and trains it, resuming from the
    store's latest checkpoint if there is one. `rank`/`world_size` > 1 need an initialised
    `torch.distributed` process group (Ray Train sets it up)."""

    def __init__(
        self,
        cfg: RunConfig,
        device: str | torch.device | None = None,
        progress: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
        store: Store | None = None,
        tracker: Tracker | None = None,
        faults: FaultInjection | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world_size = rank, world_size
        self.progress = progress and rank == 0
        self.run_dir = cfg.output_dir
        self.store = store or LocalStore(self.run_dir, cfg.train.keep_checkpoints)
        self.tracker = tracker if tracker is not None and rank == 0 else NullTracker()
        self.faults = faults
        self.late = LateRead(self.run_dir)
        torch.manual_seed(cfg.seed)
        self.train_data = Batches(cfg.data, cfg.model.kind, "train", cfg.seed)
        self.model_cfg = self._model_config()
        self.schedule = Schedule(cfg.schedule, cfg.model.n_layer, cfg.train.steps, cfg.seed)
        self.growth = make_growth(self.schedule.cfg)
        ckpt = self.store.latest()
        self.forked = ckpt is None and cfg.train.fork_from is not None  # a trunk's branch
        if self.forked:
            ckpt = load_fork(cfg)
        self.fork_rows = ckpt["rows"] if self.forked else None  # the trunk's, up to the fork
        n_physical = ckpt["n_physical"] if ckpt else self.schedule.depths[0]
        self.model = TransformerLM(self.model_cfg, n_physical).to(self.device)
        if compile_wanted(cfg.train.compile, self.device):
            self.model.compile_blocks()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.state = TrainState()
        self.autocast = autocast_for(cfg.train.precision, self.device)
        held_out = {
            split: Batches(cfg.data, cfg.model.kind, split, cfg.seed)
            for split in ("val", "test")
            if split in self.train_data.manifest.splits
        }
        self.evaluator = Evaluator(
            held_out["val"], cfg, self.device, self.autocast, rank, world_size, held_out.get("test")
        )
        self.batches = DeviceBatches(self.train_data, cfg.train, self.device, rank, world_size)
        if world_size > 1:  # same init everywhere (above), then each rank its own dropout masks
            torch.manual_seed(cfg.seed + 1_000_003 * rank)
        if ckpt:
            self._restore(ckpt)
        self._wrap()

    def _wrap(self) -> None:
        """`self.net` is what the forward pass calls: the model, or DDP around it. Every plan
        runs every physical layer (interp_plan and stack_plan use all N for any depth >= N), so
        no parameter is ever unused and DDP needs no `find_unused_parameters` graph search."""
        self.net: torch.nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    def _model_config(self):
        vocab = self.train_data.vocab_size
        if self.cfg.model.vocab_size is None:
            return self.cfg.model.model_copy(update={"vocab_size": vocab})
        if self.cfg.model.vocab_size < vocab:
            raise ConfigError(
                f"model.vocab_size ({self.cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({vocab}); leave it unset to take it from the data"
            )
        return self.cfg.model

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if not self.forked:  # a fork's checkpoint was checked by load_fork
            check_same_run(ckpt["run_config"], self.cfg, self.run_dir)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        if self.rank == 0 and self.forked:
            print(f"{self.cfg.name}: forking from {self.cfg.train.fork_from}")
        elif self.rank == 0:  # said, and recorded: when and from where this run resumed
            print(f"{self.cfg.name}: resuming from the checkpoint of step {self.state.step}")
            record_resume(self.run_dir, self.state.step)
        set_rng_state(ckpt["rng"][self.rank], self.device)

    @property
    def eval_plan(self) -> list[int]:
        """The full-depth plan of the current physical layers (what evaluation and export run)."""
        return self.schedule.eval_plan(len(self.model.layers))

    def fit(self) -> TrainState:
        """Train until `train.steps`, evaluating and checkpointing on the configured cadence."""
        cfg = self.cfg.train
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(self.cfg.model_dump_json(indent=2))
        main = self.rank == 0
        metrics_path = self.run_dir / METRICS if main else None
        log = MetricsLog(metrics_path, self.state.step, len(self.model.layers), self.fork_rows)
        tracker = self.tracker
        tracker.start(self.store)  # after the log dropped what the checkpoint does not cover
        bar = tqdm(
            total=cfg.steps,
            initial=self.state.step,
            desc=self.cfg.name,
            unit="step",
            disable=None if self.progress else True,  # None: on a terminal only
            dynamic_ncols=True,
        )
        try:
            if self.state.step == 0:  # the curve starts at the untrained model
                self.state.eval_loss = self.evaluate()
                start = {"step": 0, "tokens": 0, "flops": 0, "wall_time": 0.0}
                log.write({**start, "eval_loss": self.state.eval_loss})

            # a step is read once the next one is queued, or at once (`late_read`)
            self._since_logged = self.state.tokens, self.state.wall_time
            pending: dict[str, Any] | None = None
            while self.state.step < cfg.steps:
                if self._grows_at(self.state.step):
                    log.write(self.grow())
                    tracker.poll()
                row = self.train_step()
                if pending is not None:
                    self._finish(pending, log, bar)
                step = self.state.step
                at_once = (
                    step == cfg.steps
                    or step % cfg.eval_every == 0
                    or step % cfg.checkpoint_every == 0
                    or self._grows_at(step)
                    or step in cfg.branch_steps
                )
                pending = None if at_once else row
                if at_once:
                    self._finish(row, log, bar)
        finally:
            bar.close()
            log.close()
            tracker.close()
        return self.state

    def _grows_at(self, step: int) -> bool:
        """Whether the schedule wants more layers at `step` than the model has."""
        return self.schedule.n_physical(step) > len(self.model.layers)

    def _finish(self, row: dict[str, Any], log: MetricsLog, bar: tqdm) -> None:
        """Read a queued step's loss (stop if it is not finite), then evaluate, log and
        checkpoint as its step asks."""
        cfg = self.cfg.train
        row = self.settle(row)
        tokens, wall = self._since_logged  # the row covers the steps since the last one logged
        row["tokens_per_s"] = (row["tokens"] - tokens) / (row["wall_time"] - wall)
        step = row["step"]
        if self.faults:
            self.faults.step_done(step)
        if step == cfg.steps:
            row |= self.final_evaluation()
            self.state.eval_loss = row["eval_loss"]
        elif step % cfg.eval_every == 0:
            row["eval_loss"] = self.state.eval_loss = self.evaluate()
        if step % cfg.log_every == 0 or "eval_loss" in row or step == cfg.steps:
            log.write(row)
            self.tracker.poll()
            self._since_logged = row["tokens"], row["wall_time"]
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            self.save_checkpoint(row)
        elif "eval_loss" in row:
            self.store.report(row)
        if step in cfg.branch_steps:
            self.save_checkpoint(row, "branch")
        bar.update(1)
        bar.set_postfix(
            N=row["n_physical"],
            loss=f"{row['loss']:.3f}",
            eval=_fmt(self.state.eval_loss),
            tok_s=f"{row['tokens_per_s']:.0f}",
        )

    def grow(self) -> dict[str, Any]:
        """Grow the layers to the current stage's N, with checkpoints before and after, and
        return a metrics row with the eval loss on both sides (equal when growth preserves the
        function). Growth time counts as training wall time; evaluation and saving do not."""
        state, sched = self.state, self.schedule.cfg
        n_old, n_new = len(self.model.layers), self.schedule.n_physical(state.step)
        stage = self.schedule.stage_at(state.step)
        before = self.evaluate()
        row = {
            "step": state.step,
            "event": "growth",
            "stage": stage,
            "n_from": n_old,
            "n_physical": n_old,
            "eval_loss": before,
        }
        self.save_checkpoint(row, "pre-growth")
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + stage)
        with torch.random.fork_rng(devices=[]):  # fresh layers must not shift the dropout RNG
            torch.default_generator.manual_seed(self.cfg.seed * 1000 + stage)  # CPU only
            self.optimizer = grow(
                self.model,
                self.optimizer,
                self.growth,
                n_new,
                lambda m: build_optimizer(m, self.cfg.train),
                sched.optimizer_state,
                generator,
            )
        self._wrap()
        state.wall_time += time.perf_counter() - t0
        after = self.evaluate()
        row = {
            **row,
            "n_physical": n_new,
            "eval_loss_before": before,
            "eval_loss": after,
            "eval_loss_after": after,
            "flops": state.flops,
            "wall_time": state.wall_time,
            "tokens": state.tokens,
        }
        self.save_checkpoint(row, "post-growth")
        return row

    def lr(self, step: int) -> float:
        """This run's LR at `step` (`optim.progressive_lr`)."""
        return progressive_lr(step, self.cfg.train, self.schedule)

    def train_step(self) -> dict[str, Any]:
        """Queue one optimizer step over `grad_accum` micro-batches and return its metrics row,
        its loss and gradient norm still on their way to the host (`settle` reads them).

        The host does not wait for the device here: a step whose loss or gradient norm is not
        finite is skipped on the device (AdamW's `found_inf`, GradScaler's route: weights and
        moments untouched), and `settle` stops the run when it reads it. The next micro-batch
        is built and copied while the device still runs this one's backward."""
        cfg, state = self.cfg.train, self.state
        self.late.start()
        lr = self.lr(state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        depths = []
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            where = self.schedule.step(state.step, micro)
            if where.n_physical != len(self.model.layers):
                raise RuntimeError(
                    f"step {state.step} is in stage {where.stage} (N={where.n_physical}) but the "
                    f"model has {len(self.model.layers)} layers; grow() first"
                )
            input_ids, labels = self.batches.get(state.step, micro)
            # DDP: all-reduce gradients once per step, on the last micro-batch
            sync = nullcontext() if last or self.world_size == 1 else self.net.no_sync()
            with sync:
                with self.autocast:
                    _, loss = self.net(input_ids, labels, plan=where.plan)
                (loss / cfg.grad_accum).backward()
            self.batches.prefetch(*((state.step + 1, 0) if last else (state.step, micro + 1)))
            loss_sum += loss.detach().float()
            tokens += input_ids.numel() * self.world_size
            state.flops += self.world_size * flops_per_microbatch(
                self.model_cfg, *input_ids.shape, where.depth
            )
            depths.append(where.depth)
        loss_mean = loss_sum / cfg.grad_accum
        if self.world_size > 1:  # every rank sees the same loss, so all stop together
            dist.all_reduce(loss_mean)
            loss_mean /= self.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        values = torch.stack([loss_mean, grad_norm.float()])
        self.optimizer.found_inf = (~torch.isfinite(values)).any().float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens
        return {
            "step": state.step,
            "stage": where.stage,
            "n_physical": where.n_physical,
            "depth": sum(depths) / len(depths),
            "lr": lr,
            "tokens": state.tokens,
            "flops": state.flops,
            "pending": self.late.pending(values),
        }

    def settle(self, row: dict[str, Any]) -> dict[str, Any]:
        """A queued step's row, read (`LateRead.settle`)."""
        return self.late.settle(row, self.state)

    def evaluate(self) -> float:
        """The held-out loss during training (`Evaluator.loss`)."""
        return self.evaluator.loss(self.model, self.eval_plan)

    def final_evaluation(self) -> dict[str, Any]:
        """The final held-out loss with its standard error (`Evaluator.final`)."""
        return self.evaluator.final(self.model, self.eval_plan)

    def read_checkpoint(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """The final evaluation (validation and test, `Evaluator.final`) of the model in
        `ckpt`, a checkpoint of this run at any step: how a scratch run mid-way is read on
        test like a finished one."""
        check_same_run(ckpt["run_config"], self.cfg, self.run_dir)
        model = TransformerLM(self.model_cfg, ckpt["n_physical"]).to(self.device)
        model.load_state_dict(ckpt["model"])
        return self.evaluator.final(model, self.schedule.eval_plan(ckpt["n_physical"]))

    def save_checkpoint(self, row: dict[str, Any], tag: str = "") -> None:
        """Hand the checkpoint of this step (`tag`: a `checkpoint_name` tag; built on rank 0
        only, a branch one with the metrics rows so far) and the metrics row to the store; every
        rank calls this at the same points."""
        rngs = rng_states(self.device, self.world_size)
        ckpt = self.checkpoint(rngs) if self.rank == 0 else None
        if ckpt is not None and tag == "branch":
            ckpt["rows"] = read_rows(self.run_dir / METRICS)
        name = checkpoint_name(self.state.step, tag)
        self.store.report(row, ckpt, name)
        if self.faults:
            self.faults.checkpoint_saved(self.state.step)
        self.tracker.checkpoint(name, self.store.location(name), row)

    def checkpoint(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """Model, optimizer, state, per-rank RNG states and config: all a resumed run needs."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
            "rng": rngs,
            "model_config": self.model_cfg.model_dump(),
            "n_physical": len(self.model.layers),
            "plan": self.eval_plan,
            "tokenizer_json": self.train_data.tokenizer_path,
            "run_config": self.cfg.model_dump(mode="json"),
        }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
