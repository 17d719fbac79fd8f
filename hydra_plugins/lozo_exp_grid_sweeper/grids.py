"""`hydra/sweeper=grids`: Hydra's basic sweeper over a union of grids.

Hydra's basic sweeper runs one cartesian product. A paper table is several: each method sweeps
its own hyperparameters (MeZO its learning rates, LOZO also rank and interval, zero-shot
nothing), and one product over all of them would pair MeZO with a rank. Here
`hydra.sweeper.params` are shared by every job and `hydra.sweeper.grids` names sub-grids, each
a product of its own keys; the jobs are, for each combination of the shared values, the jobs of
every grid in turn (a job twice only once):

    hydra:
      sweeper:
        params: {task: "sst2,rte"}
        grids:
          zero-shot: {method: zero-shot}
          mezo: {method: mezo, method.lr: "1e-6,1e-7"}
          lozo: {method: lozo, method.lr: "1e-6,1e-7", method.rank: "1,2"}

gives, per task, zero-shot, two MeZO jobs and four LOZO jobs (14 in all). Grids are named so
that a config including another can replace one, add one, or drop one (`grids: {ft: null}`).
On the command line a key that a grid sets narrows the grids to the values given
(`method=lozo`: the LOZO grid only; `method.lr=1e-6`: the jobs at that learning rate, and the
grids that set none); any other key applies to every job, as in a plain sweep (`task=sst2`
replaces the shared tasks).
"""

import itertools
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.lozo_exp_grid_sweeper.grids.GridsSweeper"
    max_batch_size: int | None = None  # jobs handed to the launcher at once (None: all)
    params: dict[str, str] | None = None  # shared by every job
    grids: dict[str, Any] = field(default_factory=dict)  # name -> {key: values} (or null)


ConfigStore.instance().store(
    group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="lozo-exp"
)


def _text(value: Any) -> str:
    """A YAML value as override text (YAML reads `1e-6` as a number, `true` as a bool)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _values(override: Override) -> list[tuple[Any, str]]:
    """(value, its text) for each value of a sweep or single-value override."""
    if override.is_sweep_override():
        return list(zip(override.sweep_iterator(), override.sweep_string_iterator(), strict=True))
    return [(override.value(), override.get_value_element_as_str())]


def _product(overrides: list[Override]) -> list[list[str]]:
    """The jobs of one cartesian product (a later override of a key replaces an earlier one)."""
    values = {
        o.get_key_element(): [f"{o.get_key_element()}={s}" for _, s in _values(o)]
        for o in overrides
    }
    return [list(job) for job in itertools.product(*values.values())]


class GridsSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        grids: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        parser = OverridesParser.create()
        self.grids = {
            name: parser.parse_overrides([f"{key}={_text(value)}" for key, value in grid.items()])
            for name, grid in (grids or {}).items()
            if grid is not None
        }

    def split_arguments(  # type: ignore[override]  # an instance method: it needs the grids
        self, overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        """The jobs of `overrides` (the shared params, then the command line's) and the grids,
        in batches of `max_batch_size` (None: one batch)."""
        jobs = self.job_overrides(overrides)
        size = max_batch_size or len(jobs)
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def job_overrides(self, overrides: list[Override]) -> list[list[str]]:
        """Each job's overrides: every combination of the keys no grid sets, crossed with the
        jobs of every grid, narrowed by the values `overrides` gives for the grids' keys."""
        if not self.grids:
            return _product(overrides)
        grid_keys = {o.get_key_element() for grid in self.grids.values() for o in grid}
        narrowing = {o.get_key_element(): o for o in overrides if o.get_key_element() in grid_keys}
        shared = _product([o for o in overrides if o.get_key_element() not in grid_keys])
        narrowed = {name: _narrow(grid, narrowing) for name, grid in self.grids.items()}
        grids = [_product(grid) for grid in narrowed.values() if grid is not None]
        if not grids:
            given = " ".join(_describe([o]) for o in narrowing.values())
            raise HydraException(
                f"no job left: {given} matches none of the sweep's grids ("
                + "; ".join(f"{name}: {_describe(grid)}" for name, grid in self.grids.items())
                + ")"
            )
        jobs = [outer + inner for outer in shared for grid in grids for inner in grid]
        return [list(job) for job in dict.fromkeys(tuple(job) for job in jobs)]


def _narrow(grid: list[Override], narrowing: dict[str, Override]) -> list[Override] | None:
    """The grid with each narrowed key keeping only the values given (compared as values:
    1e-6 is 1.0e-06); None when a key keeps none."""
    parser = OverridesParser.create()
    narrowed = []
    for override in grid:
        key = override.get_key_element()
        if key in narrowing:
            wanted = [value for value, _ in _values(narrowing[key])]
            kept = [text for value, text in _values(override) if value in wanted]
            if not kept:
                return None
            override = parser.parse_override(f"{key}={','.join(kept)}")
        narrowed.append(override)
    return narrowed


def _describe(overrides: list[Override]) -> str:
    return " ".join(
        f"{o.get_key_element()}={','.join(text for _, text in _values(o))}" for o in overrides
    )
