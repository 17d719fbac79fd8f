"""Task data: rows with the hub dataset's columns, from the hub, local files or the bundled sample,
and the OPT sampling protocol (RoBERTa's LM-BFF k-shot splits: `medium_models.kshot`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lozo_exp.config import ConfigError, TaskConfig

log = logging.getLogger(__name__)

SAMPLES = Path(__file__).parent / "samples"
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
Row = dict


class DataUnavailable(ConfigError):
    """The task's data cannot be read: the message says how to point at local files."""


@dataclass
class Splits:
    train: list[Row]
    dev: list[Row]
    test: dict[str, list[Row]] = field(default_factory=dict)  # name -> rows (MNLI has two)
    # The whole training split train and dev were drawn from (ICL's demonstration pool, as
    # published); empty when the family draws its splits otherwise.
    train_source: list[Row] = field(default_factory=list)


def _read_file(path: str | Path) -> list[Row]:
    import datasets

    suffix = Path(path).suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise ConfigError(
            f"cannot read {path}: the file type {suffix!r} is not one of {', '.join(FILE_BUILDERS)}"
        )
    ds = datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train")
    return ds.to_list()


def sample_path(task: str, split: str) -> Path:
    return SAMPLES / task / f"{split}.jsonl"


def load_rows(cfg: TaskConfig, split: str) -> list[Row]:
    """One split (train, validation or test) of a task, with the hub dataset's columns."""
    local = getattr(cfg.data_files, split, None)
    if local is not None:
        return _read_file(Path(local).expanduser())
    if cfg.source == "sample":
        path = sample_path(cfg.name, split)
        if not path.is_file():
            raise DataUnavailable(
                f"task {cfg.name!r} has no bundled {split} sample ({path}); "
                f"use task.source=hub or task.data_files.{split}=<file>"
            )
        return _read_file(path)
    return _load_hub(cfg, split)


def _load_hub(cfg: TaskConfig, split: str) -> list[Row]:
    import datasets

    hub_split = cfg.splits.get(split, split)
    try:
        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=hub_split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        name = f"{cfg.hub_id}" + (f" ({cfg.hub_config})" if cfg.hub_config else "")
        raise DataUnavailable(
            f"The {split} split of task {cfg.name!r} could not be read from the hub dataset "
            f"{name}: {type(err).__name__}: {str(err).splitlines()[0]}. If you are offline, "
            f"point the task at local files with the hub dataset's columns, e.g. "
            f"task.data_files.train=/path/train.parquet "
            f"task.data_files.validation=/path/validation.parquet (parquet, json/jsonl or "
            f"csv), or use the small bundled sample with task.source=sample."
        ) from err
    return ds.to_list()


def _seeded_subset(rows: list[Row], seed: int, num: int) -> list[Row]:
    """The first `num` rows of a permutation drawn by NumPy's legacy generator seeded with
    `seed`: the published `sample_subset`, so the same seed picks the same examples."""
    order = np.random.RandomState(seed).permutation(len(rows))[:num]
    return [rows[i] for i in order]


def sample_opt_protocol(cfg: TaskConfig, train: list[Row], evaluation: list[Row]) -> Splits:
    """MeZO/LOZO's OPT protocol (`run.py`, `tasks.py`): with seed `train_set_seed`, a
    permutation of the train split gives num_train + num_dev examples, of which the last num_dev
    are dev and the rest train (`train_samples[-num_dev:]`, `[:-num_dev]`), and a permutation of
    the validation split gives the num_eval test examples. A source smaller than num_train +
    num_dev keeps dev whole and shortens train, as published: CB's 250 rows give 150 train and
    100 dev, WSC's 554 give 54 and 500; one of at most num_dev rows is all dev, no train."""
    seed, wanted = cfg.train_set_seed, cfg.num_train + cfg.num_dev
    picked = _seeded_subset(train, seed, wanted)
    num_dev = min(cfg.num_dev, len(picked))
    splits = Splits(
        train=picked[: len(picked) - num_dev],
        dev=picked[len(picked) - num_dev :],
        test={"test": _seeded_subset(evaluation, seed, cfg.num_eval)},
        train_source=train,
    )
    if len(picked) < wanted:
        log.warning(
            "%s: the training split has %d rows, fewer than num_train + num_dev = %d: dev gets "
            "%d, train the other %d (as published: dev is the last num_dev sampled rows)",
            cfg.name,
            len(train),
            wanted,
            num_dev,
            len(splits.train),
        )
    if len(splits.test["test"]) < cfg.num_eval:
        log.warning(
            "%s: asked for %d test examples, the validation split has only %d",
            cfg.name,
            cfg.num_eval,
            len(evaluation),
        )
    log.info(
        "%s: %d train + %d dev sampled from %d training rows, %d test from %d validation rows "
        "(train_set_seed %d)",
        cfg.name,
        len(splits.train),
        len(splits.dev),
        len(train),
        len(splits.test["test"]),
        len(evaluation),
        seed,
    )
    return splits
