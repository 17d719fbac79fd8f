"""Task data: rows with the hub dataset's columns, from the hub, local files or the bundled sample,
and the OPT sampling protocol (RoBERTa's LM-BFF k-shot splits: `medium_models.kshot`).

Local files are read here (parquet, json/jsonl, csv), so a file that cannot be read ends the run
with one message naming the file, the line where known, and the fix; what the rows must hold is
checked by `lozo_exp.datacheck`.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lozo_exp.config import ConfigError, TaskConfig

log = logging.getLogger(__name__)

SAMPLES = Path(__file__).parent / "samples"
FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
OWN_DATA = 'see README "Your own data"'
Row = dict


class DataUnavailable(ConfigError):
    """The task's data cannot be read: the message says how to point at local files."""


class DataError(ConfigError):
    """The task's data cannot be used as it is: the message names the file, the rows and the fix."""


@dataclass
class Splits:
    train: list[Row]
    dev: list[Row]
    test: dict[str, list[Row]] = field(default_factory=dict)  # name -> rows (MNLI has two)
    # The whole training split train and dev were drawn from (ICL's demonstration pool, as
    # published); empty when the family draws its splits otherwise.
    train_source: list[Row] = field(default_factory=list)


def _read_json(path: Path) -> list[Row]:
    """A JSON array of objects, or JSON lines (one object per line)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from err
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); "
                    f"a .jsonl file holds one JSON object per line"
                ) from err
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, row {number}: a JSON {type(row).__name__} where an object with the "
                f"task's columns belongs ({OWN_DATA})"
            )
    return rows


def _read_csv(path: Path) -> list[Row]:
    """A CSV with a header; integer columns stay integers and empty cells are None."""
    import pandas as pd

    with warnings.catch_warnings():  # a row longer than the header would shift the columns
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            frame = pd.read_csv(path, index_col=False).convert_dtypes()
        except pd.errors.ParserWarning as err:
            raise DataError(f"cannot read {path} as csv: {err}") from err
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


READERS: dict[str, Callable[[Path], list[Row]]] = {
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
}


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be a data file (missing, a directory, an unknown type), or None."""
    if path.is_dir():
        return f"{path} is a directory, not a file: name the file inside it"
    if not path.is_file():
        return f"{path} does not exist"
    if path.suffix.lower() not in FILE_FORMATS:
        return (
            f"{path}: the file type {path.suffix!r} is not one of "
            f"{', '.join(FILE_FORMATS)} (parquet, json/jsonl or csv)"
        )
    return None


@contextmanager
def reading(path: Path, fmt: str) -> Iterator[None]:
    """Reading errors of `path` (not UTF-8, pandas' and pyarrow's) as one DataError."""
    try:
        yield
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}): is it a {fmt} file? ({OWN_DATA})"
        ) from err
    except (ValueError, OSError, ImportError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {path} as {fmt}: {reason} ({OWN_DATA})") from err


def read_file(path: str | Path) -> list[Row]:
    """The rows of a local parquet, json/jsonl or csv file, or a DataError saying why not."""
    path = Path(path)
    if problem := file_problem(path):
        raise DataError(problem)
    fmt = FILE_FORMATS[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: a {fmt} file with the task's columns belongs here")
    with reading(path, fmt):
        return READERS[fmt](path)


def sample_path(task: str, split: str) -> Path:
    return SAMPLES / task / f"{split}.jsonl"


def source_of(cfg: TaskConfig, split: str) -> str:
    """Where `load_rows` reads a split from, for messages."""
    local = getattr(cfg.data_files, split, None)
    if local is not None:
        return f"task.data_files.{split}={local}"
    if cfg.source == "sample":
        return f"the bundled {split} sample {sample_path(cfg.name, split)}"
    name = cfg.hub_id + (f" ({cfg.hub_config})" if cfg.hub_config else "")
    return f"the {cfg.splits.get(split, split)} split of the hub dataset {name}"


def load_rows(cfg: TaskConfig, split: str) -> list[Row]:
    """One split (train, validation or test) of a task, with the hub dataset's columns."""
    local = getattr(cfg.data_files, split, None)
    if local is not None:
        return read_file(Path(local).expanduser())
    if cfg.source == "sample":
        path = sample_path(cfg.name, split)
        if not path.is_file():
            raise DataUnavailable(
                f"task {cfg.name!r} has no bundled {split} sample ({path}); "
                f"use task.source=hub or task.data_files.{split}=<file>"
            )
        return read_file(path)
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
