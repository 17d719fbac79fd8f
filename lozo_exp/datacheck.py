"""Checks of a task's data before any model loads.

Each task declares what it reads from a row (a `Schema`: the columns and the type of their
values, and what a valid gold answer is; the family task classes build it), and each family says
which splits it reads (`Adapter.data_splits`). A file that lacks a column, holds a value of the
wrong type or a gold outside the task's label set, or a split that is empty or has no gold, ends
the run with one message naming the file, the rows and the fix (a `DataError`, exit status 1),
instead of a traceback later, often after minutes of loading a model, or a wrong metric.

Rows without a gold answer (label -1, as in the unlabelled test splits of GLUE and SuperGLUE, or
no answers) are left out with a warning; a split where no row has one is refused, since every
split of this suite is scored against its gold (train: the loss, dev: the selection, test: the
reported metric).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lozo_exp.config import ConfigError, TaskConfig
from lozo_exp.data import OWN_DATA, DataError, Row, Splits

log = logging.getLogger(__name__)

NO_GOLD = "no gold answer"  # what `Schema.check` returns for a row without one
SHOWN = 3  # bad rows named in a message
TYPE_NAMES = {str: "text", int: "an integer", bool: "true/false", list: "a list", dict: "an object"}


@dataclass(frozen=True)
class Schema:
    """What a task reads from each row.

    `columns` maps each column to the type of its values (`None`: checked by `check` only);
    `check` returns the problem with a row's values beyond their types (a label outside the
    label set, an unknown COPA question type), NO_GOLD for a row without a gold answer, or None;
    `gold` says what a valid gold is, for messages and the README.
    """

    task: str
    columns: Mapping[str, type | None]
    check: Callable[[Row], str | None]
    gold: str

    def describe(self) -> str:
        types = [f"{c} ({TYPE_NAMES[t] if t else 'the gold'})" for c, t in self.columns.items()]
        return f"task {self.task} reads the columns {', '.join(types)}; {self.gold}"


def missing(value: object) -> bool:
    """None, or NaN (an empty cell of a numeric CSV column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind(value: object) -> str:
    """The type of a value in words (`1.5` is "a float")."""
    for type_, name in TYPE_NAMES.items():
        if type(value) is type_:
            return name
    return f"a {type(value).__name__}"


def integer_label(value: object, words: Sequence[str], column: str = "label") -> str | None:
    """The problem with an integer class label (class i has label word `words[i]`)."""
    if value == -1 and not isinstance(value, bool):
        return NO_GOLD
    if type(value) is not int:
        return f"{column} {show(value)} is {kind(value)}, not one of {label_set(words)}"
    if not 0 <= value < len(words):
        return f"{column} {value} is not one of {label_set(words)}"
    return None


def label_set(words: Sequence[str]) -> str:
    return ", ".join(f"{i} ({w.strip()!r})" for i, w in enumerate(words))


def _row_problem(row: Row, schema: Schema) -> str | None:
    for column, type_ in schema.columns.items():
        value = row.get(column)
        if missing(value):
            return f"column {column!r} is empty"
        if type_ is not None and type(value) is not type_:
            return f"{column} {show(value)} is {kind(value)}, not {TYPE_NAMES[type_]}"
    return schema.check(row)


def _rows(numbers: list[int]) -> str:
    """`row 3`, `rows 1, 2, 5, ...`."""
    if len(numbers) == 1:
        return f"row {numbers[0]}"
    more = ", ..." if len(numbers) > SHOWN else ""
    return "rows " + ", ".join(map(str, numbers[:SHOWN])) + more


def check_rows(rows: list[Row], schema: Schema, where: str) -> list[Row]:
    """The rows of one split that have a gold answer; a DataError when the split is empty, lacks
    a column, has a bad value, or has no gold answer at all. `where` names the source
    (`task.data_files.validation=dev.jsonl`, a hub dataset's split, a split file)."""
    if not rows:
        raise DataError(f"{where} has no rows; {schema.describe()} ({OWN_DATA})")
    present = set().union(*(row.keys() for row in rows))
    absent = [c for c in schema.columns if c not in present]
    if absent:
        raise DataError(
            f"{where} has no column {', '.join(map(repr, absent))} (its columns: "
            f"{', '.join(sorted(map(str, present)))}); {schema.describe()} ({OWN_DATA})"
        )
    bad: dict[str, list[int]] = {}  # problem -> its rows
    no_gold: list[int] = []
    for number, row in enumerate(rows, 1):
        problem = _row_problem(row, schema)
        if problem == NO_GOLD:
            no_gold.append(number)
        elif problem is not None:
            bad.setdefault(problem, []).append(number)
    if bad:
        shown = "; ".join(f"{_rows(numbers)}: {problem}" for problem, numbers in bad.items())
        if len(bad) > SHOWN:
            shown = "; ".join(f"{_rows(n)}: {p}" for p, n in list(bad.items())[:SHOWN]) + "; ..."
        count = sum(map(len, bad.values()))
        raise DataError(
            f"{where}: {shown} ({count} of {len(rows)} rows). {schema.describe()} ({OWN_DATA})"
        )
    if len(no_gold) == len(rows):
        raise DataError(
            f"{where} has no gold answers (no row has one: label -1, as in the unlabelled test "
            f"splits of GLUE and SuperGLUE, or no answers), but every split is scored against "
            f"its gold: point it at a labelled split; {schema.gold}"
        )
    if no_gold:
        log.warning(
            "%s: %d of %d rows have no gold answer and are left out (%s)",
            where, len(no_gold), len(rows), _rows(no_gold),
        )  # fmt: skip
    left_out = set(no_gold)
    return [row for number, row in enumerate(rows, 1) if number not in left_out]


def check_sizes(splits: Splits, what: str, dev_fix: str) -> None:
    """Every split of a split directory has examples: the train split, dev to select by, each
    test set to report. `dev_fix` says how the family's protocol can give dev examples."""
    if not splits.train:
        raise DataError(f"{what} has no training examples")
    if not splits.dev:
        raise DataError(f"{what} has no dev examples, and every run evaluates on dev: {dev_fix}")
    for name, rows in splits.test.items():
        if not rows:
            raise DataError(f"{what} has no examples in its {name} set")


def check_data_files(cfg: TaskConfig, reads: Sequence[str], family: str) -> None:
    """`task.data_files` name only splits the task reads, and with `task.source=sample` either
    every split or none (the bundled sample is not mixed with your files)."""
    given = {split: path for split, path in vars(cfg.data_files).items() if path is not None}
    bad = [
        f"task.data_files.{split}={path} is a split task {cfg.name} does not read on a "
        f"{family} model (it reads {', '.join(reads)})"
        for split, path in given.items()
        if split not in reads
    ]
    given = {split: path for split, path in given.items() if split in reads}
    if given and cfg.source == "sample" and set(reads) - set(given):
        bad.append(
            f"task.data_files gives {', '.join(sorted(given))} but not "
            f"{', '.join(s for s in reads if s not in given)}, and task.source=sample would "
            f"read that from the bundled sample: give every split "
            f"(task.data_files.{{{','.join(reads)}}}), or task.source=hub for the rest"
        )
    if given and family == "masked" and cfg.data_dir is not None:
        bad.append(
            f"task.data_dir={cfg.data_dir} names a k-shot split directory to read, and "
            f"task.data_files the files to build one from: set one of them"
        )
    if bad:
        raise ConfigError("Invalid configuration: " + "; ".join(bad) + ".")
