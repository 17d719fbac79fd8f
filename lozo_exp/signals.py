"""Stopping a run cleanly on the signals a scheduler sends before it preempts or times out a job.

SLURM sends SIGTERM when it preempts a job (and at its time limit), and the signal asked for
with `--signal` some time before the limit (SIGUSR1 in sbatch scripts; submitit, the engine of
Hydra's submitit launcher, uses SIGUSR2 and requeues the job itself). While a run trains,
`StopSignals` turns each of them into a note; at the next step boundary the runner writes a
checkpoint and calls `stop_if_signalled`, which hands the signal to the handler that was
installed before (submitit's requeues the job and exits; one that returns lets the run go on,
as submitit's does for the SIGTERM that precedes its own signal) or, without one, stops the
run with `Preempted`: results.json says "preempted" and the process exits with 128 + the signal.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


class Preempted(Exception):
    """A stop signal ended the run at a step boundary, after a checkpoint."""

    def __init__(self, signum: int, step: int, handed_over: BaseException | None = None):
        self.signum, self.step, self.handed_over = signum, step, handed_over
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}, with a checkpoint of that step")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def exit(self) -> NoReturn:
        """End the process as the signal would: through the handler it was handed over to
        (e.g. submitit's exit after it requeued the job), else with status 128 + signum."""
        if self.handed_over is not None:
            raise self.handed_over from None
        raise SystemExit(self.exit_status) from None


class StopSignals:
    """While entered, notes SIGTERM, SIGUSR1 and SIGUSR2 instead of dying at once (only in the
    main thread, where Python runs signal handlers; a signal someone set to be ignored stays
    ignored); restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.pending: list[int] = []  # in the order they came
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if signum not in self.pending:
            self.pending.append(signum)
            log.warning("%s received: a checkpoint after this step", signal.Signals(signum).name)

    def stop_if_signalled(
        self, step: int, checkpoint: Callable[[], None], signums: Sequence[int]
    ) -> None:
        """If signals came: `checkpoint()`, then hand each over in turn (see the module).
        `signums`: the signals to act on, those any process noted (`distributed.agree`), so all
        stop at the same step; a later one waits for the next step."""
        came = list(signums)
        self.pending = [s for s in self.pending if s not in came]
        if not came:
            return
        checkpoint()
        for signum in came:
            previous = self.previous.get(signum)
            if not callable(previous):
                raise Preempted(signum, step)
            try:
                previous(signum, None)
            except BaseException as exit_:  # e.g. submitit's: requeued, SystemExit
                raise Preempted(signum, step, exit_) from exit_
            name = signal.Signals(signum).name
            log.info("the handler of %s before ours let the run go on", name)
