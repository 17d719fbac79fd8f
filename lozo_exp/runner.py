"""The one training loop for every method and model family.

`run` checks the config and reads the data (the cheap steps that can fail) before it loads a
model, then trains with the method's step (`lozo_exp.methods`: a zeroth-order optimizer
evaluates the loss at two perturbed points, AdamW runs it with backprop), evaluates on dev every
`trainer.eval_steps` (or each epoch) keeping the best dev state by `trainer.select_by` (dev
loss or the task metric), and tests with that state.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lozo_exp.adapter import Adapter, adapter_class, load_task
from lozo_exp.config import ConfigError, RunConfig, validate
from lozo_exp.data import Row, Splits
from lozo_exp.datacheck import check_data_files
from lozo_exp.methods import METHODS, Method, build_method
from lozo_exp.models import (
    dtype_on,
    load_model,
    load_tokenizer,
    parameter_count,
    resolve_model,
    torch_dtype,
)
from lozo_exp.outputs import check_output_dir, claimed, hyperparameters, run_name
from lozo_exp.tracking import (
    MetricsLog,
    Progress,
    device_capacity,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    synchronize,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops, keeping what it logged."""


class DoesNotFit(ConfigError):
    """The run needs more memory than its device has, known before the model is built."""


def check_fits(
    cfg: RunConfig, method: Method, n_params: int, capacity: int, device: torch.device
) -> None:
    """Refuse a run whose method's memory floor for the model exceeds the device's `capacity`
    (bytes), instead of building the model to run out of memory."""
    need, what = method.memory_floor(n_params, torch_dtype(cfg.model.dtype).itemsize)
    if need > capacity:
        raise DoesNotFit(
            f"out of memory before building the model: method {cfg.method.name} on "
            f"{cfg.model.name} ({n_params / 1e9:.2f}B parameters in {cfg.model.dtype}) keeps at "
            f"least {need / 2**30:.1f} GiB on the device ({what}), and {device} has a total "
            f"capacity of {capacity / 2**30:.2f} GiB: the run does not fit on one GPU"
        )


@dataclass
class RunState:
    """Everything a run needs to continue exactly: parameters, optimizer state, step, data
    position and best-dev bookkeeping. ZO random draws are keyed by (seed, step), and the data
    order by (seed, epoch), so no generator state beyond torch's (dropout) is needed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    seed: int
    method: Method | None = None  # its step state (e.g. FT's loss scaler)
    step: int = 0
    epoch: int = 0
    position: int = 0  # rows of the current epoch already consumed
    best_metric: float | None = None  # trainer.select_by's value, higher is better (-dev loss)
    best_step: int | None = None
    best_dev: dict[str, float] | None = None
    best_params: dict[str, torch.Tensor] | None = None

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def next_batch(self, rows: list[Row], batch_size: int) -> list[Row]:
        """The next rows of a seeded per-epoch shuffle (the last batch of an epoch may be short)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(rows), generator=gen)[self.position : self.position + batch_size]
        self.position += len(order)
        if self.position >= len(rows):
            self.epoch, self.position = self.epoch + 1, 0
        return [rows[i] for i in order.tolist()]

    _PROGRESS = ("step", "epoch", "position", "best_metric", "best_step", "best_dev", "best_params")

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self.trainable().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "method": self.method.state_dict() if self.method else {},
            "torch_rng": torch.get_rng_state(),
            **{k: getattr(self, k) for k in self._PROGRESS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.trainable().items():
                p.copy_(state["params"][name])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.method is not None:
            self.method.load_state_dict(state["method"])
        torch.set_rng_state(state["torch_rng"])
        for k in self._PROGRESS:
            setattr(self, k, state[k])


class Runner:
    """Holds what one run shares across its phases: config, adapter, splits, state, logs."""

    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.start = time.perf_counter()
        cfg.model = resolve_model(cfg.model)  # the checkpoint is there; its family is known
        validate(cfg)
        check_output_dir(out_dir)
        self.cfg, self.out_dir = cfg, out_dir
        family = cfg.model.family
        task = load_task(family, cfg.task.name)
        adapter_cls: type[Adapter] = adapter_class(family)
        check_data_files(cfg.task, adapter_cls.data_splits(task), family)
        self.splits: Splits = adapter_cls.build_splits(task, cfg.task)  # read and checked
        log.info(
            "data: %d train, %d dev; test sets: %s",
            len(self.splits.train),
            len(self.splits.dev),
            ", ".join(f"{k} {len(v)}" for k, v in self.splits.test.items()),
        )
        self.method = build_method(cfg)
        if self.method.trains and not self.splits.train:
            evaluation_only = ", ".join(n for n, m in METHODS.items() if not m.trains)
            raise ConfigError(
                f"task {cfg.task.name} has no training examples: all {len(self.splits.dev)} "
                f"sampled rows went to dev (task.num_dev={cfg.task.num_dev}; dev is the last "
                f"num_dev sampled rows, as published). Set task.num_dev below the training "
                f"split's size, or use an evaluation-only method ({evaluation_only})."
            )
        self.max_steps, self.eval_steps = self._schedule()
        tokenizer = load_tokenizer(cfg.model)
        adapter_cls.check(task, tokenizer)
        self.device = resolve_device(cfg.trainer.device)
        cfg.model.dtype = dtype_on(self.device, cfg.model.dtype)
        capacity = device_capacity(self.device)
        if capacity is not None:  # counting the parameters costs a meta-device build
            n_params = parameter_count(cfg.model, tokenizer)
            check_fits(cfg, self.method, n_params, capacity, self.device)
        # Everything expensive starts here.
        torch.manual_seed(cfg.seed)
        reset_peak_memory(self.device)  # this job's peak starts here (sweeps share a process)
        model = load_model(cfg.model, tokenizer, self.device).to(self.device)
        model = self.method.prepare_model(model)
        self.adapter = adapter_cls(model, tokenizer, task, cfg.model)
        self.adapter.prepare(cfg, self.splits)
        self.method.prepare_adapter(self.adapter, self.splits)
        optimizer = self.method.build_optimizer(model, cfg.seed)
        self.state = RunState(model, optimizer, cfg.seed, self.method)
        n_train = sum(p.numel() for p in self.state.trainable().values())
        log.info("method %s: %.2fM trainable parameters", cfg.method.name, n_train / 1e6)
        self.peak_mem_mb = 0.0

    def _schedule(self) -> tuple[int, int]:
        """Training steps and the dev evaluation interval, from steps or epochs."""
        tr = self.cfg.trainer
        if not self.method.trains:
            return 0, 1
        per_epoch = math.ceil(len(self.splits.train) / self.cfg.method.batch_size)
        steps = tr.max_steps if tr.max_steps is not None else tr.epochs * per_epoch
        every = tr.eval_steps if tr.eval_steps is not None else per_epoch
        log.info(
            "training %d steps (%.3g epochs of %d steps at batch %d), dev evaluation every %d",
            steps,
            steps / per_epoch,
            per_epoch,
            self.cfg.method.batch_size,
            every,
        )
        if len(self.splits.train) < self.cfg.method.batch_size:  # as the RoBERTa k=16 scripts
            log.info(
                "method.batch_size=%d is more than the %d training examples: every step uses "
                "all of them",
                self.cfg.method.batch_size,
                len(self.splits.train),
            )
        return steps, every

    def _memory(self) -> float:
        peak = peak_memory_mb(self.device)
        self.peak_mem_mb = max(self.peak_mem_mb, peak)
        return peak

    def train(self, metrics: MetricsLog) -> None:
        state, tr, method = self.state, self.cfg.trainer, self.method
        optimizer = state.optimizer
        progress = Progress("step", self.max_steps, tr.progress_every_s, state.step)
        losses: list[float] = []
        times: list[float] = []
        self._memory()
        while state.step < self.max_steps:
            batch = self.adapter.collate(
                state.next_batch(self.splits.train, self.cfg.method.batch_size)
            )
            lr = method.learning_rate(state.step, self.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            step_loss, extra = method.step(optimizer, partial(self.adapter.loss, batch))
            loss = float(step_loss)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
            losses.append(loss)
            state.step += 1
            if state.step % tr.log_steps == 0 or not math.isfinite(loss):
                record = {
                    "step": state.step,
                    "loss": sum(losses) / len(losses),
                    "lr": optimizer.param_groups[0]["lr"],
                    "step_time_s": sum(times) / len(times),
                    "mem_peak_mb": self._memory(),
                }
                metrics.write({**record, **extra})  # extra: the last step's (e.g. its g)
                losses, times = [], []
            if not math.isfinite(loss):
                raise TrainingDiverged(self._diverged(loss))
            progress.update(state.step, f"loss {loss:.4f}")
            if state.step % self.eval_steps == 0 or state.step == self.max_steps:
                self.evaluate_dev(metrics)

    def _diverged(self, loss: float) -> str:
        m, dtype = self.cfg.method, self.cfg.model.dtype
        eps = getattr(m, "eps", None)  # zeroth-order methods: the perturbation scale
        setting = f"method {m.name}, lr {m.lr}" + (f", eps {eps}" if eps is not None else "")
        advice = "a smaller method.lr"
        if eps is not None:
            advice += (
                ", a method.eps the weights' precision resolves (in float16, an eps far below "
                "the published 1e-3 leaves the two losses differing by rounding, and g blows up)"
            )
        return (
            f"the training loss became {loss} at step {self.state.step} ({setting}, "
            f"model.dtype {dtype}); the run stopped. Try {advice}, or model.dtype=float32/"
            f"bfloat16. Logged steps are in metrics.jsonl."
        )

    def evaluate_dev(self, metrics: MetricsLog) -> dict[str, float]:
        state, metric, tr = self.state, self.adapter.task.metric, self.cfg.trainer
        start = time.perf_counter()
        scores = self.adapter.evaluate(self.splits.dev, tr.eval_batch_size)
        scores["dev_loss"] = self.adapter.dev_loss(self.splits.dev, tr.eval_batch_size)
        metrics.write(
            {
                "step": state.step,
                "split": "dev",
                **scores,
                "eval_time_s": time.perf_counter() - start,
            }
        )
        log.info("step %d dev %s", state.step, _fmt(scores))
        # Lower dev loss or higher metric is better; on a tie the earlier evaluation stays.
        value = -scores["dev_loss"] if tr.select_by == "loss" else scores[metric]
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step, state.best_dev = value, state.step, scores
            if state.optimizer is not None:
                state.best_params = {
                    n: p.detach().to("cpu", copy=True) for n, p in state.trainable().items()
                }
        return scores

    def test(self) -> dict[str, dict[str, float]]:
        """Test sets, evaluated with the best dev state."""
        state = self.state
        if state.best_params is not None:
            with torch.no_grad():
                for name, p in state.trainable().items():
                    p.copy_(state.best_params[name])
        return {
            name: self.adapter.evaluate(rows, self.cfg.trainer.eval_batch_size)
            for name, rows in self.splits.test.items()
        }

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        metrics = MetricsLog(self.out_dir, cfg.logger, run_name(self.out_dir), asdict(cfg))
        results: dict[str, Any] = {
            **hyperparameters(cfg),
            "metric": self.adapter.task.metric,
            "select_by": cfg.trainer.select_by,
        }
        try:
            if not self.method.trains:
                self.evaluate_dev(metrics)
            else:
                self.train(metrics)
            tests = self.test()
            first = next(iter(tests.values()), {})
            results.update(status="completed", dev=self.state.best_dev, test=first, test_sets=tests)
            log.info("test %s", _fmt(first))
            return results
        except TrainingDiverged as err:
            results.update(status="diverged", error=str(err))
            raise
        except BaseException as err:  # out of memory, Ctrl-C, a bug: keep what is known
            results.update(status="failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            results.update(
                steps=self.state.step,
                best_step=self.state.best_step,
                wall_time_s=time.perf_counter() - self.start,
                peak_mem_mb=max(self.peak_mem_mb, self._memory()),
            )
            metrics.write(
                {
                    "step": self.state.step,
                    "split": "final",
                    **{k: results.get(k) for k in ("status", "peak_mem_mb")},
                }
            )
            (self.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            metrics.close(results)


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())


def run(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Train (unless the method is evaluation-only), test, and write results.json, in a
    directory claimed for this run (`outputs.claim_run_dir`)."""
    with claimed(out_dir):
        return Runner(cfg, out_dir).run()
