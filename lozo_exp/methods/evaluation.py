"""Evaluation-only methods: zero-shot and in-context learning (ICL)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from lozo_exp.adapter import Adapter
from lozo_exp.config import MethodConfig, RunConfig, failing
from lozo_exp.data import Row, Splits
from lozo_exp.methods.base import Method, register

log = logging.getLogger(__name__)

DEMO_SEPARATOR = "\n\n"  # between demonstrations, and before the evaluated example (train_sep)
SEED_RANGE = 10_000  # per-example seeds are drawn from [0, 10000), as published


@dataclass
class ZeroShotConfig(MethodConfig):
    name: str = "zero-shot"


@dataclass
class ICLConfig(MethodConfig):
    """Each prompt is preceded by `num_demos` solved examples of the training split, a fresh
    set per evaluated example (seeded by `task.train_set_seed`), joined by a blank line
    (causal models)."""

    name: str = "icl"
    num_demos: int = 32

    def check(self, run: RunConfig) -> list[str]:
        return super().check(run) + failing(
            [
                (self.num_demos >= 0, f"method.num_demos={self.num_demos} must be >= 0"),
                (
                    run.model.family == "causal",
                    f"method.name=icl (in-context learning) needs a causal model; model.family "
                    f"is {run.model.family!r}",
                ),
            ]
        )


class Demonstrations:
    """Per-example demonstrations, as the published `icl.sh` draws them (`run.py` with no
    train_set_seed: one train set per evaluated example). The i-th example of an evaluated set
    gets the first `num_demos` rows of a permutation of the whole training split (`pool`) drawn
    by NumPy's legacy generator seeded with `seeds[i]`, where `seeds` =
    `RandomState(seed).randint(0, 10000, n)` (published: seed 0). An example of the pool (a dev
    row) never shows itself: it is skipped and the next row of the permutation taken, as
    `sample_subset(exclude=...)`. Called with a row, returns the text before its prompt."""

    def __init__(
        self,
        pool: list[Row],
        evaluated: Iterable[list[Row]],
        num_demos: int,
        seed: int,
        answered: Callable[[Row], str],
    ):
        self.pool, self.num_demos, self.answered = pool, num_demos, answered
        self.evaluated = list(evaluated)  # keeps the rows alive, so their ids stay theirs
        self._in_pool = {id(row): i for i, row in enumerate(pool)}
        self._seed = {
            id(row): int(s)
            for rows in self.evaluated
            for row, s in zip(
                rows, np.random.RandomState(seed).randint(0, SEED_RANGE, len(rows)), strict=True
            )
        }

    def indices(self, row: Row) -> list[int]:
        """Positions in the pool of the row's demonstrations, in prompt order."""
        if id(row) not in self._seed:
            raise KeyError(
                "ICL demonstrations are drawn per example of the run's dev and test sets; this "
                "row is not one of them"
            )
        order = np.random.RandomState(self._seed[id(row)]).permutation(len(self.pool))
        order = order[: self.num_demos + 1].tolist()
        own = self._in_pool.get(id(row))
        if own in order:
            order.remove(own)
        return order[: self.num_demos]

    def __call__(self, row: Row) -> str:
        demos = DEMO_SEPARATOR.join(self.answered(self.pool[i]) for i in self.indices(row))
        return demos.strip() + DEMO_SEPARATOR if demos.strip() else ""


@register
class ZeroShotMethod(Method):
    config = ZeroShotConfig
    trains = False


@register
class ICLMethod(Method):
    config = ICLConfig
    trains = False

    def prepare_adapter(self, adapter: Adapter, splits: Splits) -> None:
        pool = splits.train_source or splits.train
        if len(pool) < self.cfg.num_demos:
            log.warning(
                "ICL: asked for %d demonstrations per example, the training split has %d",
                self.cfg.num_demos,
                len(pool),
            )
        adapter.context_prefix = Demonstrations(
            pool,
            [splits.dev, *splits.test.values()],
            self.cfg.num_demos,
            self.run.task.train_set_seed,
            adapter.answered,
        )
