"""Checkpoints and exact resume.

Besides metrics.jsonl and results.json, a training run keeps in its directory:

- `steps.jsonl`: one line per step, appended and flushed as the step ends: `step`, `loss`,
  `lr`, and what the method needs to take the step again (`Method.step_record`; zeroth-order:
  the second loss, and the matrices the fast engine moved in place where that changes). A ZO
  step's draws are pure functions of (seed, step, tensor), so a ZO run is its base weights plus
  this log: kilobytes to megabytes at any model size.
- `checkpoint.json`: the run's progress at a step (best-dev bookkeeping with the test metrics of
  that state, time and memory so far, the steps each session resumed at), its config and a
  fingerprint of its base weights. Written aside and renamed into place after the files it
  names and the step log are synced, so a crash or a full disk at any moment leaves the
  previous checkpoint whole.
- `checkpoint/`: for methods that cannot replay their steps (FT, FT-LoRA), the trainable
  weights (`weights-<step>.safetensors`; LoRA: only the adapter) and the trainer state
  (`trainer-<step>.pt`: AdamW's moments, the loss scaler, the RNG states; read back with
  `torch.load(weights_only=True)`). At step 0 the weights are the base ones: none are written.

Resuming rebuilds the model from its base, then either replays the logged steps (the
optimizer's own step with a closure that returns the logged losses, so the same weight passes
run: bit-identical weights, momentum and V included) or loads the weights and trainer state,
and continues with metrics.jsonl and steps.jsonl cut back to the step it continues from. A ZO
run continues from its last logged step (a killed ZO run loses nothing), unless a dev evaluation
after its checkpoint was under way, which is then redone; the others from their checkpoint.

Across processes (torchrun) the main process alone writes these files and reads them back on
resume; every process replays a ZO run's steps (so all end with the same weights), and FSDP's
shards are gathered into the main process's files and scattered back from them. An FT
checkpoint continues only with the number of processes that wrote it (`check_processes`); a ZO
run with any.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lozo_exp import distributed
from lozo_exp.config import RUNTIME_KEYS, ConfigError, RunConfig
from lozo_exp.outputs import CHECKPOINT, METRICS
from lozo_exp.tracking import Progress, synchronize

if TYPE_CHECKING:
    from lozo_exp.runner import RunState

log = logging.getLogger(__name__)

FORMAT = 1
STEPS = "steps.jsonl"
WEIGHTS_DIR = "checkpoint"
FINGERPRINT_ELEMENTS = 1 << 16


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what is intact."""


# -- files ------------------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a file next to `path`, sync it, and rename it to `path`: a reader sees the
    old file or the new one, whole, whatever happens meanwhile."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file a run appends to; a line cut short (by a kill, or a full
    disk) is dropped with a warning."""
    if not path.exists():
        return []
    records, cut = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            cut += 1
    if cut:
        log.warning("%s: dropped %d line(s) cut short (by a kill or a full disk)", path, cut)
    return records


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    write_atomic(path, lambda tmp: tmp.write_text(text))


class StepLog:
    """`steps.jsonl`, one line per step, flushed as the step ends."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STEPS
        self.file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# -- what identifies a run --------------------------------------------------------------------


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: saved -> now` for each key that differs, but for RUNTIME_KEYS."""
    a, b = dict(_flat(saved)), dict(_flat(now))
    changes = []
    for key in sorted(a.keys() | b.keys()):
        free = any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)
        if not free and a.get(key) != b.get(key):
            changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes


def fingerprint(model: torch.nn.Module) -> list[float]:
    """Per parameter, the sum of squares of its first elements (float64): the same base weights
    (checkpoint or random-init seed) give the same numbers, others almost surely not."""
    with torch.no_grad():
        sums = [
            p.detach().reshape(-1)[:FINGERPRINT_ELEMENTS].double().square().sum()
            for p in model.parameters()
        ]
    return torch.stack(sums).tolist() if sums else []


def _same_base(saved: list[float], now: list[float]) -> bool:
    return len(saved) == len(now) and all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(saved, now, strict=True)
    )


# -- checkpoints ------------------------------------------------------------------------------


class Checkpoints:
    """A run's checkpoints: when one is due, writing one, and resuming from the last."""

    def __init__(self, out_dir: Path, cfg: RunConfig, replay: bool) -> None:
        self.out_dir, self.path = out_dir, out_dir / CHECKPOINT
        tr = cfg.trainer
        self.every_steps = tr.checkpoint_steps
        self.every_s = None if tr.checkpoint_minutes is None else 60 * tr.checkpoint_minutes
        self.replay = replay  # weights come from replaying the step log
        self.progress_every_s = tr.progress_every_s
        self.config = config_dict(cfg)
        self.base: list[float] = []  # the base weights' fingerprint, once they are built
        self.saved_step: int | None = None
        self.saved_at = time.monotonic()

    def due(self, step: int, evaluated: bool) -> bool:
        """Every `checkpoint_steps` steps, `checkpoint_minutes` after the last one, and after a
        dev evaluation when a checkpoint holds no weights."""
        if step == self.saved_step:
            return False
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.every_s is not None and time.monotonic() - self.saved_at >= self.every_s
        return by_steps or by_time or (evaluated and self.replay)

    def save(self, state: RunState, session: dict[str, Any], steps: StepLog | None) -> None:
        """Write the checkpoint of `state` (once per step); a failure leaves the previous one
        whole and raises CheckpointError."""
        if state.step == self.saved_step:
            return
        files: dict[str, str | None] = {}
        try:
            if steps is not None:
                steps.sync()
            if not self.replay:
                files = self._save_trainer(state, files)
            record = {
                "format": FORMAT,
                "step": state.step,
                "replay": self.replay,
                "processes": distributed.world_size(),
                **files,
                **state.progress(),
                **session,
                "config": self.config,
                "base": self.base,
            }
            text = json.dumps(record, indent=1) + "\n"
            if distributed.is_main():
                write_atomic(self.path, lambda tmp: tmp.write_text(text))
        except OSError as err:
            for name in files.values():
                if name is not None:
                    (self.out_dir / name).unlink(missing_ok=True)
            kept = (
                f"its checkpoint of step {self.saved_step} is intact: once the directory is "
                f"writable again, continue it with `lozo-exp resume={self.out_dir}`"
                if self.saved_step is not None
                else "it has no checkpoint yet"
            )
            raise CheckpointError(
                f"could not write the checkpoint of step {state.step} in {self.out_dir} "
                f"({type(err).__name__}: {err}); the run stopped, and {kept}"
            ) from err
        if distributed.is_main():
            self._remove_all_but(files)
        self.saved_step, self.saved_at = state.step, time.monotonic()
        log.info("checkpoint: step %d (%s)", state.step, self.path)

    def _save_trainer(self, state: RunState, files: dict[str, str | None]) -> dict[str, str | None]:
        """The trainable weights (none at step 0: the base ones) and the trainer state;
        `files` is filled as they are written (so a failure can remove them). Every process
        takes part (FSDP gathers); the main process writes."""
        from safetensors.torch import save_file

        main = distributed.is_main()
        if main:
            (self.out_dir / WEIGHTS_DIR).mkdir(exist_ok=True)
        files["weights"] = None
        if state.step > 0:
            tensors = distributed.full_tensors(state.trainable())
            files["weights"] = f"{WEIGHTS_DIR}/weights-{state.step}.safetensors"
            if main:
                write_atomic(self.out_dir / files["weights"], lambda t: save_file(tensors, str(t)))
        files["trainer"] = f"{WEIGHTS_DIR}/trainer-{state.step}.pt"
        trainer = state.trainer_state()
        if main:
            write_atomic(self.out_dir / files["trainer"], lambda t: torch.save(trainer, t))
        return files

    def remove_weights(self) -> None:
        """Remove the weight files (a completed run is not resumed; `trainer.save_final` keeps
        its final weights)."""
        if (self.out_dir / WEIGHTS_DIR).is_dir():
            self._remove_all_but({})
            (self.out_dir / WEIGHTS_DIR).rmdir()

    def _remove_all_but(self, files: dict[str, str | None]) -> None:
        folder = self.out_dir / WEIGHTS_DIR
        keep = {self.out_dir / f for f in files.values() if f is not None}
        for path in folder.glob("*") if folder.is_dir() else []:
            if path not in keep:
                path.unlink(missing_ok=True)

    # -- resuming -----------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """checkpoint.json, checked to belong to this run's config (cheap: before the model is
        built)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {self.path}: {type(err).__name__}: {err}") from err
        if saved.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not a checkpoint of format {FORMAT}")
        changes = config_changes(saved["config"], self.config)
        if changes:
            raise ConfigError(
                f"{self.out_dir} holds a run of another config ({'; '.join(changes)}); a run "
                f"resumes with its own config (lozo-exp resume={self.out_dir}), and only "
                f"{', '.join(RUNTIME_KEYS)} may change"
            )
        self.check_processes(saved)
        return saved

    def resume(
        self, state: RunState, evaluates_at: Callable[[int], bool], log_steps: int
    ) -> dict[str, Any]:
        """Bring `state` (a freshly built run whose base weights are fingerprinted in `base`)
        to where the run in this directory stopped, cut its logs back to that step, and return
        the saved checkpoint."""
        saved, records = distributed.from_main(self._read)
        step = saved["step"]
        if self.replay:
            step = _last_without_evaluation(step, len(records), evaluates_at)
            replay(state, records[:step], self.progress_every_s)
        else:
            self._load_trainer(saved, state)
        state.restore(saved, step, [r["loss"] for r in records[step - step % log_steps : step]])
        self.saved_step = saved["step"]
        if not distributed.is_main():
            return saved
        rewrite_jsonl(self.out_dir / STEPS, records[:step])
        metrics = read_jsonl(self.out_dir / METRICS)
        kept = [r for r in metrics if r.get("step", 0) <= step and r.get("split") != "final"]
        rewrite_jsonl(self.out_dir / METRICS, kept)
        log.info(
            "resumed %s at step %d (checkpoint of step %d; metrics.jsonl: %d records kept, %d "
            "dropped)",
            self.out_dir,
            step,
            saved["step"],
            len(kept),
            len(metrics) - len(kept),
        )
        return saved

    def _read(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The checkpoint and the logged steps, checked against this run (main process)."""
        saved = self.load()
        if not _same_base(saved["base"], self.base):
            raise CheckpointError(
                f"the base weights of the run in {self.out_dir} are not those it started from "
                f"(model.hub_id={saved['config']['model']['hub_id']!r}: did that checkpoint "
                f"change?); its steps cannot be continued from other weights"
            )
        records = _consecutive(read_jsonl(self.out_dir / STEPS))
        if len(records) < saved["step"]:
            raise CheckpointError(
                f"{self.out_dir / STEPS} logs {len(records)} steps, fewer than the "
                f"{saved['step']} of {self.path}: the two do not belong together"
            )
        return saved, records

    def check_processes(self, saved: dict[str, Any]) -> None:
        """A checkpoint with weights continues with the number of processes that wrote it:
        its trainer state (the optimizer's, each process's RNG) is laid out for them, and
        another number changes the reduction order, so the run would not continue exactly.
        A replayed (ZO) run continues with any number (its update depends only on the global
        batch's mean loss)."""
        then, now = saved.get("processes", 1), distributed.world_size()
        if self.replay or then == now:
            return
        launch = f"torchrun --nproc_per_node={then} -m lozo_exp" if then > 1 else "lozo-exp"
        raise ConfigError(
            f"the run in {self.out_dir} was checkpointed by {then} process"
            f"{'es' if then != 1 else ''} and is resumed by {now}: method "
            f"{saved['config']['method']['name']} keeps its optimizer and RNG state per "
            f"process layout, so it continues exactly only as it ran; resume it with "
            f"`{launch} resume={self.out_dir}` (zeroth-order runs may change the number)"
        )

    def _load_trainer(self, saved: dict[str, Any], state: RunState) -> None:
        """The saved weights and trainer state, read by the main process (every process
        takes part: FSDP's shards are scattered from it)."""
        from safetensors.torch import load_file

        main = distributed.is_main()
        if saved["weights"] is not None:
            device = next(iter(state.trainable().values())).device
            where = str(device) if distributed.world_size() == 1 else "cpu"
            path = self.out_dir / saved["weights"]
            distributed.load_full_tensors_(
                state.trainable(), load_file(path, device=where) if main else None
            )
        path = self.out_dir / saved["trainer"]
        state.load_trainer_state(torch.load(path, weights_only=True) if main else None)


def _consecutive(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of steps 1, 2, ... up to the first gap (nothing follows a cut line)."""
    for k, record in enumerate(records):
        if record.get("step") != k + 1:
            return records[:k]
    return records


def _last_without_evaluation(saved: int, logged: int, evaluates_at: Callable[[int], bool]) -> int:
    """The last logged step with no dev evaluation after the checkpoint up to it: one was
    under way when the run stopped (a finished one is followed by a checkpoint)."""
    step = saved
    while step < logged and not evaluates_at(step + 1):
        step += 1
    return step


def replay(state: RunState, records: list[dict[str, Any]], every_s: float) -> None:
    """Take the logged steps again, with their learning rates (`Method.replay_step`)."""
    optimizer, method = state.optimizer, state.method
    progress = Progress("replayed step", len(records), every_s)
    start = time.perf_counter()
    for record in records:
        for group in optimizer.param_groups:
            group["lr"] = record["lr"]
        method.replay_step(optimizer, record)
        progress.update(record["step"])
    synchronize(next(iter(state.trainable().values())).device)
    seconds = time.perf_counter() - start
    if records:
        log.info(
            "replayed %d steps in %.1f s (%.1f ms per step)",
            len(records),
            seconds,
            1e3 * seconds / len(records),
        )
