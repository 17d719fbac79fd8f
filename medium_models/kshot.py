"""LM-BFF k-shot splits: `original/<TASK>/` -> `k-shot-1k-test/<TASK>/<K>-<seed>/`.

The procedure of LM-BFF's `tools/generate_k_shot_data.py` (used unchanged by MeZO and LOZO):
shuffle the training lines with numpy's legacy generator seeded by the data seed; group them by
label in order of first appearance; train = the first K per label, dev = the next K per label;
test = each original evaluation file (the dev sets of the GLUE-style tasks, MNLI matched and
mismatched; the test set of SST-5 and TREC), capped at 1000 examples (GLUE-style: a seed-42
shuffle; CSV: pandas `sample(random_state=42)`). Files keep the archive's formats: GLUE-style
TSVs with their header (label in the last field) and header-less `label,sentence` CSVs.

The source is the LM-BFF archive when it is at hand, else the task's hub dataset or
`task.data_files` (converted to the archive's formats first, so the same procedure applies), or
the bundled miniature archive for offline tests.

A built split is derived data, so it never replaces an input and is never stale: its directory
records what it was built from (`kshot_source.json`: builder version, task, k, seed, test cap,
the source and its input files with size and sha256, and the sha256 of each split file). A run
reads the cached split only when that record matches its own source, rebuilds it when it does
not, and refuses a directory whose files the suite did not write or that were edited since. A
split directory appears whole (written aside, then renamed), and is checked before it is written.

    lozo-exp kshot --task sst2 mnli --k 16 512 --data-dir data    (or python -m medium_models.kshot)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from lozo_exp import cli
from lozo_exp.adapter import available_tasks, load_task
from lozo_exp.config import ConfigError, TaskConfig
from lozo_exp.data import DataError, DataUnavailable, Splits, load_rows, reading, source_of
from lozo_exp.datacheck import check_rows, check_sizes
from medium_models.tasks.base import PromptTask

log = logging.getLogger(__name__)

MINIATURE = Path(__file__).parent / "data" / "miniature" / "original"
KS = (16, 512)
SEEDS = (13, 21, 42, 87, 100)
TEST_CAP = 1000
SOURCE_FILE = "kshot_source.json"
BUILDER = 2  # the split builder's version: a split recorded by another version is rebuilt
SOURCES = ("auto", "archive", "hub", "sample")
RECORD_KEYS = {"k": "task.k", "seed": "task.data_seed", "test_cap": "task.test_cap"}


@dataclass
class Table:
    """One archive file: TSV lines (with their newline) after a header line, or CSV rows
    `[label, sentence]` as pandas reads them."""

    rows: list
    header: list[str] = field(default_factory=list)


@dataclass
class Original:
    """A task's folder of the LM-BFF archive, and where it came from."""

    train: Table
    evals: dict[str, Table]  # archive file stem (dev, dev_matched, test, ...) -> file
    source: str


def _label(task: PromptTask, row) -> str:
    return row.strip().split("\t")[-1] if task.archive_format == "tsv" else str(row[0])


def _read_csv(source: Path | io.StringIO, name: str) -> list[list]:
    """Header-less `label,sentence` rows."""
    frame = pd.read_csv(source, header=None)
    if frame.shape[1] != 2:
        raise DataError(
            f"{name} has {frame.shape[1]} columns; LM-BFF's CSV files have two, label,sentence"
        )
    return frame.values.tolist()


def read_original(task: PromptTask, folder: Path, source: str | None = None) -> Original:
    """Read `original/<TASK>/` of the LM-BFF archive."""
    ext = task.archive_format

    def read(stem: str) -> Table:
        path = folder / f"{stem}.{ext}"
        if not path.is_file():
            raise DataUnavailable(f"the LM-BFF archive folder {folder} has no {path.name}")
        with reading(path, ext):
            if ext == "csv":
                return Table(_read_csv(path, str(path)))
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        return Table(lines[1:], lines[:1])

    evals = {stem: read(stem) for stem in task.eval_splits}
    return Original(read("train"), evals, source or f"LM-BFF archive {folder}")


def original_from_hub(task: PromptTask, cfg: TaskConfig) -> Original:
    """The task's hub dataset (or `task.data_files`) in the archive's formats; every row is
    checked first (rows without a gold label are left out)."""

    def table(split: str) -> Table:
        rows = check_rows(load_rows(cfg, split), task.hub_schema, source_of(cfg, split))
        examples = [task.from_hub(row) for row in rows]
        if task.archive_format == "csv":
            return Table([[int(label), texts[0]] for texts, label in examples])
        header = "\t".join(("index", *task.text_columns, "label")) + "\n"
        clean = [[" ".join(t.split()) for t in texts] for texts, _ in examples]  # no tabs
        lines = [
            "\t".join((str(i), *texts, label)) + "\n"
            for i, (texts, (_, label)) in enumerate(zip(clean, examples, strict=True))
        ]
        return Table(lines, [header])

    train = table("train")
    evals = {stem: table(split) for stem, split in task.eval_splits.items()}
    return Original(train, evals, describe(plan_source(task, cfg, "hub")))


def build_split(
    task: PromptTask, original: Original, k: int, seed: int, test_cap: int = TEST_CAP
) -> dict[str, str]:
    """The files of `<K>-<seed>/` (name -> text), by LM-BFF's procedure."""
    tsv = task.archive_format == "tsv"
    train = list(original.train.rows)
    np.random.RandomState(seed).shuffle(train)
    files: dict[str, str] = {}
    for stem, table in original.evals.items():
        name = stem.replace("dev", "test")
        if tsv:
            rows = list(table.rows)
            if len(rows) > test_cap:
                np.random.RandomState(42).shuffle(rows)
                rows = rows[:test_cap]
            files[f"{name}.tsv"] = "".join(table.header + rows)
        else:
            frame = pd.DataFrame(table.rows)
            if len(frame) > test_cap:
                frame = frame.sample(n=test_cap, random_state=42)
            files[f"{name}.csv"] = frame.to_csv(header=False, index=False)
    by_label: dict[str, list] = {}
    for row in train:
        by_label.setdefault(_label(task, row), []).append(row)
    for label, rows in by_label.items():
        if len(rows) < 2 * k:
            log.warning(
                "%s k=%d seed %d: label %r has %d training examples, short of the %d that "
                "k=%d train + k dev needs; train gets %d and dev %d",
                task.name, k, seed, label, len(rows), 2 * k, k, min(k, len(rows)),
                max(0, len(rows) - k),
            )  # fmt: skip
    picked_train = [row for rows in by_label.values() for row in rows[:k]]
    picked_dev = [row for rows in by_label.values() for row in rows[k : 2 * k]]
    dev_name = "dev_matched" if "dev_matched" in original.evals else "dev"
    if tsv:
        files["train.tsv"] = "".join(original.train.header + picked_train)
        files[f"{dev_name}.tsv"] = "".join(original.train.header + picked_dev)
    else:
        files["train.csv"] = pd.DataFrame(picked_train).to_csv(header=False, index=False)
        files["dev.csv"] = pd.DataFrame(picked_dev).to_csv(header=False, index=False)
    return files


# -- what a split is built from ----------------------------------------------------------


def _fingerprint(path: Path) -> dict[str, Any]:
    return {
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def archive_folder(task: PromptTask, cfg: TaskConfig) -> Path:
    return Path(cfg.lmbff_root).expanduser() / "original" / task.archive


def source_kind(task: PromptTask, cfg: TaskConfig, source: str = "auto") -> str:
    """sample (the bundled miniature archive), archive (`<lmbff_root>/original/<TASK>`, if
    present for auto) or hub (rows of the hub dataset and/or `task.data_files`)."""
    if source == "auto":
        return "archive" if archive_folder(task, cfg).is_dir() else "hub"
    return source


def run_source(cfg: TaskConfig) -> str:
    """The source a run builds from: its data files (whatever task.source says), the bundled
    miniature (task.source=sample), else the archive when present, else the hub."""
    if any(path is not None for path in vars(cfg.data_files).values()):
        return "hub"
    return "sample" if cfg.source == "sample" else "auto"


def plan_source(task: PromptTask, cfg: TaskConfig, source: str = "auto") -> dict[str, Any]:
    """What the split is built from: its kind and each input (a file's path, size and sha256,
    or the hub dataset's split), before anything is read."""
    kind = source_kind(task, cfg, source)
    stems = ["train", *task.eval_splits]
    if kind in ("sample", "archive"):
        folder = MINIATURE / task.archive if kind == "sample" else archive_folder(task, cfg)
        paths = {stem: folder / f"{stem}.{task.archive_format}" for stem in stems}
        for path in paths.values():
            if not path.is_file():
                raise DataUnavailable(f"the LM-BFF archive folder {folder} has no {path.name}")
        inputs = {stem: _fingerprint(path) for stem, path in paths.items()}
        return {"kind": kind, "inputs": inputs}
    inputs = {}
    for split in ("train", *task.eval_splits.values()):
        local = getattr(cfg.data_files, split, None)
        if local is not None:
            inputs[split] = _fingerprint(Path(local).expanduser())
        else:
            hub_split = cfg.splits.get(split, split)
            inputs[split] = {"hub": cfg.hub_id, "config": cfg.hub_config, "split": hub_split}
    return {"kind": kind, "inputs": inputs}


def describe(source: dict[str, Any]) -> str:
    kind, inputs = source["kind"], source["inputs"]
    if kind == "sample":
        return "bundled miniature LM-BFF archive"
    if kind == "archive":
        return f"LM-BFF archive {Path(inputs['train']['path']).parent}"
    files = {split: i["path"] for split, i in inputs.items() if "path" in i}
    hub = {split: i for split, i in inputs.items() if "hub" in i}
    parts = [f"local files {files}"] if files else []
    if hub:
        first = next(iter(hub.values()))
        name = first["hub"] + (f" ({first['config']})" if first["config"] else "")
        parts.append(f"hub dataset {name}" + (f" ({', '.join(hub)})" if files else ""))
    return " and ".join(parts)


def build_record(task: PromptTask, cfg: TaskConfig, source: str) -> dict[str, Any]:
    """The record of the split a run or the CLI would build (without its files' hashes)."""
    planned = plan_source(task, cfg, source)
    return {
        "builder": BUILDER,
        "task": task.name,
        "k": cfg.k,
        "seed": cfg.data_seed,
        "test_cap": cfg.test_cap,
        "source": {**planned, "description": describe(planned)},
    }


def _content(entry: Any) -> Any:
    """An input as compared: a file by size and hash (not where it lies), a hub split by name."""
    return {k: v for k, v in entry.items() if k != "path"} if isinstance(entry, dict) else entry


def differences(record: dict[str, Any], planned: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """How a recorded split differs from the planned one, in words."""
    diffs = [
        f"{RECORD_KEYS.get(key, key)}={record.get(key)} (this run: {planned[key]})"
        for key in keys
        if key != "source" and record.get(key) != planned[key]
    ]
    if "source" in keys:
        old, new = record.get("source"), planned["source"]
        if not isinstance(old, dict) or old.get("kind") != new["kind"]:
            was = old.get("description") if isinstance(old, dict) else old
            diffs.append(f"source {was!r} (this run: {new['description']!r})")
        else:
            for split in sorted(set(old.get("inputs", {})) | set(new["inputs"])):
                before, now = old.get("inputs", {}).get(split), new["inputs"].get(split)
                if _content(before) != _content(now):
                    diffs.append(f"{split} input {_content(before)} (this run: {_content(now)})")
    return diffs


# -- split directories ---------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_files(task: PromptTask) -> list[str]:
    """The files of a split directory: train, dev (MNLI: dev_matched) and each test set."""
    ext = task.archive_format
    dev = "dev_matched" if "dev_matched" in task.eval_splits else "dev"
    tests = [stem.replace("dev", "test") for stem in task.eval_splits]
    return [f"{name}.{ext}" for name in ("train", dev, *tests)]


def _occupied(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise DataError(f"{path} cannot be read ({err}): delete {folder} to rebuild it") from err
    return record if isinstance(record, dict) else {}


def _edited(folder: Path, record: dict[str, Any]) -> list[str]:
    """Files of `folder` the suite did not write as they are: changed or added since."""
    if "files" not in record:  # recorded by builder 1, which kept no hashes: rebuilt
        return []
    written = record["files"]
    return [
        path.name
        for path in sorted(folder.iterdir())
        if path.name != SOURCE_FILE
        and (
            path.name not in written
            or not path.is_file()
            or _sha256(path.read_text(encoding="utf-8", errors="replace")) != written[path.name]
        )
    ]


def _never_replaced(folder: Path, why: str) -> DataError:
    return DataError(
        f"{folder} {why}; the suite never replaces files it did not write: move them (to use "
        f"them as your split: task.data_dir=<their new directory>), or set task.lmbff_root to "
        f"another directory"
    )


def write_split(files: dict[str, str], folder: Path, record: dict[str, Any]) -> None:
    """Write a split directory whole (written aside, then renamed into place), recording the
    sha256 of each file. It may take the place of a directory the suite built whose files are
    as it wrote them, never of one holding anything else (a DataError)."""
    if folder.exists() and not folder.is_dir():
        raise _never_replaced(folder, "is a file, where a k-shot split directory belongs")
    if _occupied(folder):
        built = _read_record(folder)
        if built is None:
            raise _never_replaced(folder, f"holds files and no {SOURCE_FILE}")
        if edited := _edited(folder, built):
            raise _never_replaced(folder, f"holds {', '.join(edited)}, changed or added since")
    record = {**record, "files": {name: _sha256(text) for name, text in files.items()}}
    files = {**files, SOURCE_FILE: json.dumps(record, indent=2) + "\n"}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp's folders are private
    for name, text in files.items():
        (staging / name).write_text(text, encoding="utf-8")
    old = None
    if _occupied(folder):
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=folder.parent))
        with contextlib.suppress(OSError):  # another process replaced it meanwhile
            folder.rename(old / folder.name)
    try:
        staging.rename(folder)
    except OSError:  # another process wrote the same split meanwhile
        shutil.rmtree(staging)
    if old is not None:
        shutil.rmtree(old)


def _parse(task: PromptTask, text: str, name: str = "split file") -> list[dict]:
    """Rows of one split file: the archive's text columns and `label` (text)."""
    if not text.strip():
        return []
    if task.archive_format == "csv":
        with reading(Path(name), "csv"):
            rows = _read_csv(io.StringIO(text), name)
        return [
            {"label": str(label), "sentence": "" if pd.isna(sent) else str(sent)}
            for label, sent in rows
        ]  # an empty sentence reads as "", as in LM-BFF
    lines = list(csv.reader(io.StringIO(text), delimiter="\t", quotechar=None))
    header, body = lines[0], lines[1:]
    return [
        {**dict(zip(header, fields, strict=False)), "label": fields[-1]}
        for fields in body
        if fields
    ]


def parse_split(task: PromptTask, files: dict[str, str], where: str = "") -> Splits:
    """Train, dev and the named test sets (MNLI: test_matched first) of a split's files."""
    train, dev, *tests = split_files(task)
    ext = f".{task.archive_format}"

    def rows(name: str) -> list[dict]:
        return _parse(task, files[name], f"{where}/{name}" if where else name)

    return Splits(rows(train), rows(dev), {name.removesuffix(ext): rows(name) for name in tests})


def checked_split(task: PromptTask, files: dict[str, str], where: str, k: int) -> Splits:
    """The parsed split, every file checked (columns, labels) and every split non-empty."""
    splits = parse_split(task, files, where)
    parts = [splits.train, splits.dev, *splits.test.values()]
    for name, rows in zip(split_files(task), parts, strict=True):
        if rows:
            check_rows(rows, task.archive_schema, f"{where}/{name}")
    check_sizes(
        splits,
        f"the k-shot split {where}",
        f"LM-BFF's dev set is the k examples per label that follow the k training ones, so "
        f"every label needs more than k={k} training examples in the source: lower task.k "
        f"(lozo-exp kshot: --k)",
    )
    return splits


def read_split_dir(task: PromptTask, folder: Path) -> dict[str, str]:
    """The split files of `folder` (name -> text); a DataError names any that is missing."""
    names = split_files(task)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        raise DataError(
            f"{folder} holds {', '.join(present) or 'nothing'} but not {', '.join(missing)}: a "
            f"k-shot split directory of task {task.name} holds {', '.join(names)}"
        )
    files = {}
    for name in names:
        with reading(folder / name, task.archive_format):
            files[name] = (folder / name).read_text(encoding="utf-8")
    return files


def split_dir(task: PromptTask, root: str | Path, k: int, seed: int) -> Path:
    return Path(root) / "k-shot-1k-test" / task.archive / f"{k}-{seed}"


def load_original(task: PromptTask, cfg: TaskConfig, source: str = "auto") -> Original:
    """The archive folder `<lmbff_root>/original/<TASK>` if present (source auto or archive),
    the bundled miniature (sample), or the hub dataset and `task.data_files` (hub, or auto
    without an archive)."""
    kind = source_kind(task, cfg, source)
    if kind == "sample":
        return read_original(task, MINIATURE / task.archive, "bundled miniature LM-BFF archive")
    if kind == "archive":
        return read_original(task, archive_folder(task, cfg))
    try:
        return original_from_hub(task, cfg)
    except DataUnavailable as err:
        raise DataUnavailable(
            f"{err} Alternatively, place the LM-BFF archive's {task.archive} folder at "
            f"{archive_folder(task, cfg)} (task.lmbff_root={cfg.lmbff_root}) or point "
            f"task.data_dir at a k-shot split directory."
        ) from err


def _user_split(task: PromptTask, cfg: TaskConfig, folder: Path) -> Splits:
    """The split directory the user named (task.data_dir): read, never written."""
    if not folder.is_dir():
        raise DataError(f"task.data_dir={folder} is a file: name a k-shot split directory")
    record = _read_record(folder)
    if record is not None:  # the source is the directory's own; the run's keys must match
        planned = {"task": task.name, "k": cfg.k, "seed": cfg.data_seed, "test_cap": cfg.test_cap}
        if diffs := differences(record, planned, tuple(planned)):
            raise DataError(
                f"task.data_dir={folder} holds a split built with {', '.join(diffs)}: set "
                f"those keys to the directory's values, or point task.data_dir at another split"
            )
    where = f"task.data_dir={folder}"
    try:
        files = read_split_dir(task, folder)
    except DataError as err:
        raise DataError(
            f"{err}. The suite never writes into a directory you name: build the split with "
            f"`lozo-exp kshot`, or name a new directory to build it there"
        ) from err
    log.info("k-shot split %s (yours%s)", folder, f", built from {_built_from(record)}")
    return checked_split(task, files, where, cfg.k)


def _built_from(record: dict[str, Any] | None) -> str:
    if record is None:
        return "a source it does not record"
    source = record.get("source")
    return source.get("description", "?") if isinstance(source, dict) else str(source)


def _cached_split(
    task: PromptTask, cfg: TaskConfig, folder: Path, planned: dict[str, Any]
) -> Splits | None:
    """The cached split in `folder` when it was built from this run's source; None when it is
    the suite's and stale (to rebuild); a DataError when it holds files the suite did not
    write, or that were edited since."""
    if not folder.is_dir():
        raise _never_replaced(folder, "is a file, where a k-shot split directory belongs")
    record = _read_record(folder)
    if record is None:
        if any(path is not None for path in vars(cfg.data_files).values()):
            raise _never_replaced(
                folder,
                f"holds a k-shot split the suite did not build (no {SOURCE_FILE}), and this "
                f"run builds its split from task.data_files",
            )
        files = read_split_dir(task, folder)  # e.g. made by LM-BFF's own script
        log.info("k-shot split %s (no %s: read as it is)", folder, SOURCE_FILE)
        return checked_split(task, files, str(folder), cfg.k)
    if edited := _edited(folder, record):
        raise _never_replaced(folder, f"holds {', '.join(edited)}, changed or added since")
    keys = ("builder", "task", "k", "seed", "test_cap", "source")
    if diffs := differences(record, planned, keys):
        log.warning("k-shot split %s is stale (%s): rebuilding it", folder, "; ".join(diffs))
        return None
    files = read_split_dir(task, folder)
    log.info("k-shot split %s (built from %s)", folder, _built_from(record))
    return checked_split(task, files, str(folder), cfg.k)


def kshot_splits(task: PromptTask, cfg: TaskConfig) -> Splits:
    """The run's k-shot split, checked. `task.data_dir` names a split directory to read (built
    there first when it does not exist yet); else the split is cached in `<lmbff_root>/
    k-shot-1k-test/<TASK>/<k>-<data_seed>`, built on first use and rebuilt when its source
    changed. The bundled miniature (`task.source=sample` without data files) is split in
    memory unless `task.data_dir` is given."""
    source = run_source(cfg)
    folder = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
    if folder is not None and _occupied(folder):
        return _user_split(task, cfg, folder)
    planned = build_record(task, cfg, source)
    if folder is None and source != "sample":
        folder = split_dir(task, Path(cfg.lmbff_root).expanduser(), cfg.k, cfg.data_seed)
        if _occupied(folder) and (splits := _cached_split(task, cfg, folder, planned)):
            return splits
    original = load_original(task, cfg, source)
    files = build_split(task, original, cfg.k, cfg.data_seed, cfg.test_cap)
    where = f"k={cfg.k} seed {cfg.data_seed} of {task.name} built from the {original.source}"
    splits = checked_split(task, files, where, cfg.k)
    if folder is not None:
        write_split(files, folder, planned)
    log.info("k-shot split %s%s", where, f" into {folder}" if folder else " (in memory)")
    return splits


def task_config(name: str, **overrides) -> TaskConfig:
    """A task's `conf/task/<name>.yaml` as a TaskConfig."""
    yaml = cli.config_dir() / "task" / f"{name}.yaml"
    node = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(yaml), overrides)
    return OmegaConf.to_object(node)


def build_into(task: PromptTask, cfg: TaskConfig, source: str, original: Original) -> str:
    """Build (or keep, when up to date) the split of `cfg.k` and `cfg.data_seed` under
    `cfg.lmbff_root` for the CLI; what it did, in words."""
    folder = split_dir(task, cfg.lmbff_root, cfg.k, cfg.data_seed)
    planned = build_record(task, cfg, source)
    if _occupied(folder) and folder.is_dir() and (record := _read_record(folder)) is not None:
        keys = ("builder", "task", "k", "seed", "test_cap", "source")
        if not _edited(folder, record) and not differences(record, planned, keys):
            return f"{folder}: up to date"
    files = build_split(task, original, cfg.k, cfg.data_seed, cfg.test_cap)
    checked_split(task, files, str(folder), cfg.k)
    write_split(files, folder, planned)
    return f"{folder}: {', '.join(sorted(files))}"


def main(argv: Sequence[str] | None = None) -> None:
    tasks = available_tasks("masked")
    parser = argparse.ArgumentParser(
        prog="lozo-exp kshot",
        description="Build LM-BFF k-shot splits <data-dir>/k-shot-1k-test/<TASK>/<K>-<seed>/ "
        "from <data-dir>/original/<TASK>/ (the LM-BFF archive) or from the hub datasets. A split "
        "that is up to date is kept; a directory the suite did not write is never replaced.",
    )
    parser.add_argument("--task", nargs="+", default=tasks, choices=tasks)
    parser.add_argument("--k", nargs="+", type=int, default=list(KS))
    parser.add_argument("--seed", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--data-dir", default="data", help="holds original/ and k-shot-1k-test/")
    parser.add_argument(
        "--source",
        default="auto",
        choices=SOURCES,
        help="auto: the archive when <data-dir>/original/<TASK> exists, else the hub; "
        "sample: the bundled miniature archive",
    )
    parser.add_argument("--test-cap", type=int, default=TEST_CAP)
    parser.add_argument("--verbose", action="store_true", help="debug logs, progress bars")
    args = parser.parse_args(argv)
    cli.start(args.verbose)
    for name in args.task:
        task = load_task("masked", name)
        cfg = task_config(name, lmbff_root=args.data_dir, test_cap=args.test_cap)
        try:
            original = load_original(task, cfg, args.source)
            print(f"{name}: source = {original.source}")
            for k in args.k:
                for seed in args.seed:
                    cfg.k, cfg.data_seed = k, seed
                    print(f"  {build_into(task, cfg, args.source, original)}")
        except ConfigError as err:
            cli.fail(err)


if __name__ == "__main__":
    main()
