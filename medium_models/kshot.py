"""LM-BFF k-shot splits: `original/<TASK>/` -> `k-shot-1k-test/<TASK>/<K>-<seed>/`.

The procedure of LM-BFF's `tools/generate_k_shot_data.py` (used unchanged by MeZO and LOZO):
shuffle the training lines with numpy's legacy generator seeded by the data seed; group them by
label in order of first appearance; train = the first K per label, dev = the next K per label;
test = each original evaluation file (the dev sets of the GLUE-style tasks, MNLI matched and
mismatched; the test set of SST-5 and TREC), capped at 1000 examples (GLUE-style: a seed-42
shuffle; CSV: pandas `sample(random_state=42)`). Files keep the archive's formats: GLUE-style
TSVs with their header (label in the last field) and header-less `label,sentence` CSVs.

The source is the LM-BFF archive when it is at hand, else the task's hub dataset (converted to
the archive's formats first, so the same procedure applies), or the bundled miniature archive
for offline tests. Every built split directory records its source in `kshot_source.json`.

    lozo-exp kshot --task sst2 mnli --k 16 512 --data-dir data    (or python -m medium_models.kshot)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from lozo_exp import cli
from lozo_exp.adapter import available_tasks, load_task
from lozo_exp.config import TaskConfig
from lozo_exp.data import DataUnavailable, Splits, load_rows
from medium_models.tasks.base import PromptTask

log = logging.getLogger(__name__)

MINIATURE = Path(__file__).parent / "data" / "miniature" / "original"
KS = (16, 512)
SEEDS = (13, 21, 42, 87, 100)
TEST_CAP = 1000
SOURCE_FILE = "kshot_source.json"


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


def read_original(task: PromptTask, folder: Path, source: str | None = None) -> Original:
    """Read `original/<TASK>/` of the LM-BFF archive."""
    ext = task.archive_format

    def read(stem: str) -> Table:
        path = folder / f"{stem}.{ext}"
        if not path.is_file():
            raise DataUnavailable(f"the LM-BFF archive folder {folder} has no {path.name}")
        if ext == "csv":
            return Table(pd.read_csv(path, header=None).values.tolist())
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        return Table(lines[1:], lines[:1])

    evals = {stem: read(stem) for stem in task.eval_splits}
    return Original(read("train"), evals, source or f"LM-BFF archive {folder}")


def original_from_hub(task: PromptTask, cfg: TaskConfig) -> Original:
    """The task's hub dataset (or `task.data_files`) in the archive's formats."""

    def table(split: str) -> Table:
        examples = [ex for ex in map(task.from_hub, load_rows(cfg, split)) if ex is not None]
        if task.archive_format == "csv":
            return Table([[int(label), texts[0]] for texts, label in examples])
        header = "\t".join(("index", *task.text_columns, "label")) + "\n"
        clean = [[" ".join(t.split()) for t in texts] for texts, _ in examples]  # no tabs
        lines = [
            "\t".join((str(i), *texts, label)) + "\n"
            for i, (texts, (_, label)) in enumerate(zip(clean, examples, strict=True))
        ]
        return Table(lines, [header])

    where = cfg.hub_id + (f" ({cfg.hub_config})" if cfg.hub_config else "")
    files = {k: v for k, v in vars(cfg.data_files).items() if v is not None}
    source = f"local files {files}" if files else f"hub dataset {where}"
    train = table("train")
    return Original(train, {stem: table(split) for stem, split in task.eval_splits.items()}, source)


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


def write_split(files: dict[str, str], folder: Path, source: dict) -> None:
    """Write the split's files and its source record. A new folder appears whole (written
    aside, then renamed), so runs started together never read a half-written split."""
    files = {**files, SOURCE_FILE: json.dumps(source, indent=2) + "\n"}
    if folder.is_dir():  # rebuilt by the CLI, or a directory named by task.data_dir
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp's folders are private
    for name, text in files.items():
        (staging / name).write_text(text, encoding="utf-8")
    try:
        staging.rename(folder)
    except OSError:  # another process wrote the same split meanwhile
        shutil.rmtree(staging)


def _parse(task: PromptTask, text: str) -> list[dict]:
    """Rows of one split file: the archive's text columns and `label` (text)."""
    if task.archive_format == "csv":
        if not text.strip():
            return []
        frame = pd.read_csv(io.StringIO(text), header=None)
        return [{"label": str(label), "sentence": sent} for label, sent in frame.values.tolist()]
    lines = list(csv.reader(io.StringIO(text), delimiter="\t", quotechar=None))
    header, body = lines[0], lines[1:]
    return [
        {**dict(zip(header, fields, strict=False)), "label": fields[-1]}
        for fields in body
        if fields
    ]


def parse_split(task: PromptTask, files: dict[str, str]) -> Splits:
    """Train, dev and the named test sets (MNLI: test_matched first) of a split's files."""
    ext = task.archive_format
    dev = "dev_matched" if "dev_matched" in task.eval_splits else "dev"
    tests = [stem.replace("dev", "test") for stem in task.eval_splits]
    return Splits(
        train=_parse(task, files[f"train.{ext}"]),
        dev=_parse(task, files[f"{dev}.{ext}"]),
        test={name: _parse(task, files[f"{name}.{ext}"]) for name in tests},
    )


def read_split_dir(task: PromptTask, folder: Path) -> Splits:
    files = {p.name: p.read_text(encoding="utf-8") for p in folder.glob(f"*.{task.archive_format}")}
    return parse_split(task, files)


def split_dir(task: PromptTask, root: str | Path, k: int, seed: int) -> Path:
    return Path(root) / "k-shot-1k-test" / task.archive / f"{k}-{seed}"


def load_original(task: PromptTask, cfg: TaskConfig, source: str = "auto") -> Original:
    """The archive folder `<lmbff_root>/original/<TASK>` if present (source auto or archive),
    the bundled miniature (sample), or the hub dataset (hub, or auto without an archive)."""
    if source == "sample":
        return read_original(task, MINIATURE / task.archive, "bundled miniature LM-BFF archive")
    folder = Path(cfg.lmbff_root).expanduser() / "original" / task.archive
    if source == "archive" or (source == "auto" and folder.is_dir()):
        return read_original(task, folder)
    try:
        return original_from_hub(task, cfg)
    except DataUnavailable as err:
        raise DataUnavailable(
            f"{err} Alternatively, place the LM-BFF archive's {task.archive} folder at "
            f"{folder} (task.lmbff_root={cfg.lmbff_root}) or point task.data_dir at a k-shot "
            f"split directory."
        ) from err


def kshot_splits(task: PromptTask, cfg: TaskConfig) -> Splits:
    """The run's k-shot split: read `task.data_dir` (default `<lmbff_root>/k-shot-1k-test/
    <TASK>/<k>-<data_seed>`) if it holds one, else build it there on first use. The bundled
    miniature (`task.source=sample`) is split in memory unless `task.data_dir` is given."""
    folder = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
    if cfg.source != "sample":
        folder = folder or split_dir(task, Path(cfg.lmbff_root).expanduser(), cfg.k, cfg.data_seed)
    if folder is not None and (folder / f"train.{task.archive_format}").is_file():
        record = folder / SOURCE_FILE
        built_from = json.loads(record.read_text())["source"] if record.is_file() else "unknown"
        log.info("k-shot split %s (built from %s)", folder, built_from)
        splits = read_split_dir(task, folder)
    else:
        original = load_original(task, cfg, "sample" if cfg.source == "sample" else "auto")
        files = build_split(task, original, cfg.k, cfg.data_seed, cfg.test_cap)
        if folder is not None:
            write_split(files, folder, _record(task, original, cfg.k, cfg.data_seed, cfg.test_cap))
        log.info(
            "k-shot split k=%d seed %d of %s built from the %s%s",
            cfg.k, cfg.data_seed, task.name, original.source,
            f" into {folder}" if folder else " (in memory)",
        )  # fmt: skip
        splits = parse_split(task, files)
    if not splits.train or not splits.dev:
        raise DataUnavailable(
            f"the k-shot split of task {task.name!r} (k={cfg.k}, seed {cfg.data_seed}) has "
            f"{len(splits.train)} train and {len(splits.dev)} dev examples; every label needs "
            f"more than k training examples in the source: lower task.k"
        )
    return splits


def _record(task: PromptTask, original: Original, k: int, seed: int, test_cap: int) -> dict:
    return dict(task=task.name, source=original.source, k=k, seed=seed, test_cap=test_cap)


def task_config(name: str, **overrides) -> TaskConfig:
    """A task's `conf/task/<name>.yaml` as a TaskConfig."""
    yaml = cli.config_dir() / "task" / f"{name}.yaml"
    node = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(yaml), overrides)
    return OmegaConf.to_object(node)


def main(argv: Sequence[str] | None = None) -> None:
    tasks = available_tasks("masked")
    parser = argparse.ArgumentParser(
        prog="lozo-exp kshot",
        description="Build LM-BFF k-shot splits <data-dir>/k-shot-1k-test/<TASK>/<K>-<seed>/ "
        "from <data-dir>/original/<TASK>/ (the LM-BFF archive) or from the hub datasets.",
    )
    parser.add_argument("--task", nargs="+", default=tasks, choices=tasks)
    parser.add_argument("--k", nargs="+", type=int, default=list(KS))
    parser.add_argument("--seed", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--data-dir", default="data", help="holds original/ and k-shot-1k-test/")
    parser.add_argument(
        "--source",
        default="auto",
        choices=("auto", "archive", "hub", "sample"),
        help="auto: the archive when <data-dir>/original/<TASK> exists, else the hub; "
        "sample: the bundled miniature archive",
    )
    parser.add_argument("--test-cap", type=int, default=TEST_CAP)
    parser.add_argument("--verbose", action="store_true", help="debug logs, progress bars")
    args = parser.parse_args(argv)
    cli.start(args.verbose)
    for name in args.task:
        task = load_task("masked", name)
        try:
            original = load_original(task, task_config(name, lmbff_root=args.data_dir), args.source)
        except DataUnavailable as err:
            cli.fail(err)
        print(f"{name}: source = {original.source}")
        for k in args.k:
            for seed in args.seed:
                folder = split_dir(task, args.data_dir, k, seed)
                files = build_split(task, original, k, seed, args.test_cap)
                write_split(files, folder, _record(task, original, k, seed, args.test_cap))
                print(f"  {folder}: {', '.join(sorted(files))}")


if __name__ == "__main__":
    main()
