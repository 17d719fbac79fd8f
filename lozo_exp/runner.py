"""The one training loop for every method and model family.

`run` checks the config and reads the data (the cheap steps that can fail) before it builds the
model on its device, then trains with the method's step (`lozo_exp.methods`: a zeroth-order
optimizer evaluates the loss at two perturbed points, AdamW runs it with backprop), evaluates
on dev every `trainer.eval_steps` (or each epoch) and tests the best dev state by
`trainer.select_by` (dev loss or the task metric): the test sets are evaluated whenever a dev
evaluation becomes the best, so no copy of the weights is kept. Every step is logged to
steps.jsonl, and checkpoints (`lozo_exp.checkpoint`) let a killed or preempted run continue
exactly where it stopped (`resume`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from lozo_exp import distributed
from lozo_exp.adapter import Adapter, TokenBatch, adapter_class, load_task
from lozo_exp.checkpoint import Checkpoints, StepLog, fingerprint, write_atomic
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
from lozo_exp.outputs import METRICS, RESULTS, check_output_dir, claimed, hyperparameters, run_name
from lozo_exp.signals import Preempted, StopSignals
from lozo_exp.tracking import (
    MetricsLog,
    Progress,
    device_capacity,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
)

log = logging.getLogger(__name__)

FINAL_WEIGHTS = "final.safetensors"


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
    """What a run carries from step to step. The data order is a function of (seed, step) and
    ZO draws of (seed, step, tensor), so the rest is the weights and the optimizer's state
    (`lozo_exp.checkpoint` saves or replays them)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    seed: int
    method: Method
    step: int = 0
    losses: list[float] = field(default_factory=list)  # training losses since the last record
    best_metric: float | None = None  # trainer.select_by's value, higher is better (-dev loss)
    best_step: int | None = None
    best_dev: dict[str, float] | None = None
    best_test: dict[str, dict[str, float]] | None = None  # the test sets, with that state

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def next_batch(self, rows: list[Row], batch_size: int) -> list[Row]:
        """The rows of this step: a seeded shuffle per epoch, cut into batches (the last batch
        of an epoch may be short)."""
        epoch, k = divmod(self.step, math.ceil(len(rows) / batch_size))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(rows), generator=gen)[k * batch_size : (k + 1) * batch_size]
        return [rows[i] for i in order.tolist()]

    def progress(self) -> dict[str, Any]:
        return {
            "best": {
                "metric": self.best_metric,
                "step": self.best_step,
                "dev": self.best_dev,
                "test": self.best_test,
            }
        }

    def restore(self, saved: dict[str, Any], step: int, losses: list[float]) -> None:
        best = saved["best"]
        self.step, self.losses = step, losses
        self.best_metric, self.best_step = best["metric"], best["step"]
        self.best_dev, self.best_test = best["dev"], best["test"]

    def trainer_state(self) -> dict[str, Any]:
        """The optimizer's and the method's state and the RNG states (dropout); across
        processes, in the main process (the others get {}): the whole optimizer state and each
        process's RNG states (`ranks`)."""
        rng = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        }
        optimizer = distributed.optimizer_state_dict(self.model, self.optimizer)
        if distributed.world_size() > 1:
            rng = {"ranks": distributed.gather_to_main(rng)}
        if not distributed.is_main():
            return {}
        return {"optimizer": optimizer, "method": self.method.state_dict(), **rng}

    def load_trainer_state(self, state: dict[str, Any] | None) -> None:
        """Load what `trainer_state` saved (`state`: the main process's; None in the others)."""
        distributed.load_optimizer_state_dict(
            self.model, self.optimizer, state and state["optimizer"]
        )
        rest = distributed.from_main(lambda: {k: v for k, v in state.items() if k != "optimizer"})
        self.method.load_state_dict(rest["method"])
        rng = rest["ranks"][distributed.rank()] if "ranks" in rest else rest
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"]:
            torch.cuda.set_rng_state_all(rng["cuda_rng"])


class Runner:
    """Holds what one run shares across its phases: config, adapter, splits, state, logs."""

    def __init__(self, cfg: RunConfig, out_dir: Path, resume: str = "never"):
        self.start = time.perf_counter()
        cfg.model = resolve_model(cfg.model)  # the checkpoint is there; its family is known
        validate(cfg)
        distributed.check(cfg)
        # The main process holds the directory and decides; the others follow its answer.
        self.resuming = distributed.from_main(lambda: check_output_dir(out_dir, resume=resume))
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
        self.device = distributed.device(cfg.trainer.device)
        cfg.model.dtype = dtype_on(self.device, cfg.model.dtype)
        self.checkpoints = Checkpoints(out_dir, cfg, self.method.replayable)
        self.earlier: dict[str, Any] = {"elapsed_s": 0.0, "peak_mem_mb": 0.0, "resumed_at": []}
        if self.resuming:  # another config is an error before the model is built
            saved = distributed.from_main(self.checkpoints.load)
            self.earlier = {k: saved[k] for k in self.earlier}
        tokenizer = load_tokenizer(cfg.model)
        adapter_cls.check(task, tokenizer)
        capacity = device_capacity(self.device)
        if capacity is not None:  # counting the parameters costs a meta-device build
            n_params = parameter_count(cfg.model, tokenizer)
            check_fits(cfg, self.method, n_params, capacity, self.device)
        # Everything expensive starts here.
        torch.manual_seed(cfg.seed)
        reset_peak_memory(self.device)  # this job's peak starts here (sweeps share a process)
        model = load_model(cfg.model, tokenizer, self.device)
        model = self.method.prepare_model(model)
        base = fingerprint(model) if self.method.trains else []  # the whole weights, unsharded
        model = self.method.parallelize(model)
        self.adapter = adapter_cls(model, tokenizer, task, cfg.model)
        self.adapter.prepare(cfg, self.splits)
        self.method.prepare_adapter(self.adapter, self.splits)
        optimizer = self.method.build_optimizer(model, cfg.seed)
        self.state = RunState(model, optimizer, cfg.seed, self.method)
        n_train = sum(p.numel() for p in self.state.trainable().values())
        log.info("method %s: %.2fM trainable parameters", cfg.method.name, n_train / 1e6)
        self.checkpoints.base = base
        if distributed.world_size() > 1:
            log.info("one run across %d processes (%s)", distributed.world_size(), self.device.type)
        self.peak_mem_mb = 0.0
        self.startup_s: float | None = None
        self.steps: StepLog | None = None
        self.signals = StopSignals()

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

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_steps == 0 or step == self.max_steps

    def _memory(self) -> float:
        peak = peak_memory_mb(self.device)
        self.peak_mem_mb = max(self.peak_mem_mb, peak)
        return peak

    def session(self) -> dict[str, Any]:
        """Time, memory and resumptions over this run's sessions so far."""
        return {
            "elapsed_s": self.earlier["elapsed_s"] + time.perf_counter() - self.start,
            "peak_mem_mb": max(self.earlier["peak_mem_mb"], self.peak_mem_mb),
            "resumed_at": self.earlier["resumed_at"],
        }

    def checkpoint(self) -> None:
        self.checkpoints.save(self.state, self.session(), self.steps)

    def train(self, metrics: MetricsLog) -> None:
        state, tr, method = self.state, self.cfg.trainer, self.method
        optimizer = state.optimizer
        progress = Progress("step", self.max_steps, tr.progress_every_s, state.step)
        times: list[float] = []
        if self.steps is None and distributed.is_main():
            self.steps = StepLog(self.out_dir)
        self._memory()
        while state.step < self.max_steps:
            if self.startup_s is None:  # from the command to the first step
                self.startup_s = time.time() - psutil.Process().create_time()
            rows, weight = distributed.shard(
                state.next_batch(self.splits.train, self.cfg.method.batch_size)
            )
            batch = self.adapter.collate(rows)
            several = distributed.world_size() > 1  # one process: the loss is the mean itself
            count = self.adapter.loss_count(batch) * weight if several else 1
            lr = method.learning_rate(state.step, self.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            step_loss, extra = method.step(optimizer, partial(self._global_loss, batch, count))
            loss = float(step_loss)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
            state.losses.append(loss)
            state.step += 1
            if state.step % tr.log_steps == 0 or not math.isfinite(loss):
                record = {
                    "step": state.step,
                    "loss": sum(state.losses) / len(state.losses),
                    "lr": lr,
                    "step_time_s": sum(times) / len(times),
                    "mem_peak_mb": self._memory(),
                }
                metrics.write({**record, **extra})  # extra: the last step's (e.g. its g)
                state.losses, times = [], []
            if self.steps is not None:  # after its metrics record: a resume replays up to here
                self.steps.write({"step": state.step, "loss": loss, "lr": lr,
                                  **method.step_record(optimizer)})  # fmt: skip
            if not math.isfinite(loss):
                raise TrainingDiverged(self._diverged(loss))
            progress.update(state.step, f"loss {loss:.4f}")
            evaluated = self.evaluates_at(state.step)
            if evaluated:
                self.evaluate_dev(metrics)
            due, signals = distributed.agree(
                self.checkpoints.due(state.step, evaluated), self.signals.pending
            )
            if due:
                self.checkpoint()
            self.signals.stop_if_signalled(state.step, self.checkpoint, signals)

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

    def _global_loss(self, batch: TokenBatch, count: torch.Tensor | float) -> torch.Tensor:
        """The mean loss over the global batch, of which `batch` is this process's shard."""
        return distributed.global_mean(self.adapter.loss(batch), count)

    def evaluate_dev(self, metrics: MetricsLog) -> dict[str, float]:
        """Dev metrics and loss; a new best (ties keep the earlier) also evaluates the test
        sets, so the best state's test metrics are known without keeping its weights."""
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
        value = -scores["dev_loss"] if tr.select_by == "loss" else scores[metric]
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step, state.best_dev = value, state.step, scores
            state.best_test = self.evaluate_test()
        return scores

    def evaluate_test(self) -> dict[str, dict[str, float]]:
        return {
            name: self.adapter.evaluate(rows, self.cfg.trainer.eval_batch_size)
            for name, rows in self.splits.test.items()
        }

    def save_final(self) -> None:
        """The trainable weights after the last step (LoRA: the adapter) as safetensors."""
        from safetensors.torch import save_file

        tensors = distributed.full_tensors(self.state.trainable())  # main process: all of them
        if distributed.is_main():
            write_atomic(self.out_dir / FINAL_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))

    def run(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        main = distributed.is_main()  # the others write nothing
        results: dict[str, Any] = {
            **hyperparameters(cfg),
            "metric": self.adapter.task.metric,
            "select_by": cfg.trainer.select_by,
            "processes": distributed.world_size(),
        }
        if self.resuming:  # replay (ZO) or load the weights, cut the logs back
            step = self.checkpoints.resume(state, self.evaluates_at, cfg.trainer.log_steps)["step"]
            self.earlier["resumed_at"] = [*self.earlier["resumed_at"], state.step]
            log.info("continuing from step %d (checkpoint of step %d)", state.step, step)
        name = run_name(self.out_dir)
        metrics = MetricsLog(self.out_dir, cfg.logger, name, asdict(cfg), active=main)
        try:
            if self.method.trains and not self.resuming:
                self.checkpoint()  # step 0: from here on the run can be resumed
            if not self.method.trains:
                self.evaluate_dev(metrics)
            else:
                with self.signals:
                    self.train(metrics)
                if cfg.trainer.save_final:
                    self.save_final()
                if main:
                    self.checkpoints.remove_weights()  # a completed run is not resumed
            if state.best_test is None:  # no dev evaluation (max_steps=0)
                state.best_test = self.evaluate_test()
            first = next(iter(state.best_test.values()), {})
            results.update(status="completed", dev=state.best_dev, test=first,
                           test_sets=state.best_test)  # fmt: skip
            log.info("test %s", _fmt(first))
            return results
        except TrainingDiverged as err:
            results.update(status="diverged", error=str(err))
            raise
        except Preempted as err:
            results.update(status="preempted", error=f"{err}; lozo-exp resume={self.out_dir}")
            raise
        except BaseException as err:  # out of memory, Ctrl-C, a full disk, a bug
            results.update(status="failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            session = self.session()
            results.update(
                steps=state.step,
                best_step=state.best_step,
                wall_time_s=session["elapsed_s"],
                peak_mem_mb=max(session["peak_mem_mb"], self._memory()),
                peak_host_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
                startup_s=self.startup_s,
                resumed_at=session["resumed_at"],
            )
            if main:
                self._close(metrics, results)

    def _close(self, metrics: MetricsLog, results: dict[str, Any]) -> None:
        """The final record and results.json (written aside, then renamed), each as far as the
        disk allows, and the logs closed."""
        final = {"step": self.state.step, "split": "final"}
        final.update((k, results.get(k)) for k in ("status", "peak_mem_mb"))
        text = json.dumps(results, indent=2) + "\n"
        _as_far_as_possible(self.out_dir / METRICS, lambda: metrics.write(final))
        _as_far_as_possible(
            self.out_dir / RESULTS,
            lambda: write_atomic(self.out_dir / RESULTS, lambda tmp: tmp.write_text(text)),
        )
        _as_far_as_possible(self.out_dir / METRICS, lambda: metrics.close(results))
        if self.steps is not None:
            _as_far_as_possible(self.steps.path, self.steps.close)


def _as_far_as_possible(path: Path, write: Callable[[], None]) -> None:
    """Run `write`; a failure to write `path` (full disk) is logged, not raised over the error
    that is ending the run."""
    try:
        write()
    except OSError as err:
        log.error("could not write %s (%s: %s)", path, type(err).__name__, err)


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())


def run(cfg: RunConfig, out_dir: Path, resume: str = "never") -> dict[str, Any]:
    """Train (unless the method is evaluation-only), test, and write results.json, in a
    directory claimed for this run (`outputs.claim_run_dir`) by the main process, which alone
    writes there; with `resume` "allow" or "require", continue the run `out_dir` holds
    (`outputs.RESUME`)."""
    claim = claimed(out_dir, resume=resume) if distributed.is_main() else contextlib.nullcontext()
    with claim:
        return Runner(cfg, out_dir, resume).run()
