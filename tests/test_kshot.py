"""LM-BFF k-shot splits: the published procedure, exactly, from the archive, hub rows or the
bundled miniature archive."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_config

from lozo_exp.adapter import available_tasks, load_task
from lozo_exp.config import TaskConfig, validate
from lozo_exp.data import DataError
from medium_models.kshot import (
    BUILDER,
    MINIATURE,
    build_split,
    kshot_splits,
    main,
    parse_split,
    read_original,
    task_config,
)

TASKS = available_tasks("masked")
SAMPLES = Path(__file__).resolve().parents[1] / "lozo_exp" / "samples"

# sha256 (first 16 hex digits) of the files that LM-BFF's tools/generate_k_shot_data.py
# (--mode k-shot-1k-test --k 4) writes for the bundled miniature archive.
PUBLISHED = {
    ("sst2", 13): {
        "train.tsv": "a09410f5ef45ed91",
        "dev.tsv": "0f9f333fce9d6aa8",
        "test.tsv": "598d6fd27649d4e7",
    },
    ("trec", 42): {
        "train.csv": "d336b8a20ad657b3",
        "dev.csv": "ba3f27c2e46c4c7e",
        "test.csv": "87cf21d500fbb928",
    },
    ("mnli", 87): {
        "train.tsv": "c8f41b657513645f",
        "dev_matched.tsv": "fc1468b3b91c9353",
        "test_matched.tsv": "f91446280ac5e423",
        "test_mismatched.tsv": "016fca342db4489d",
    },
}


def miniature(name: str):
    task = load_task("masked", name)
    return task, read_original(task, MINIATURE / task.archive)


@pytest.mark.parametrize(("name", "seed"), list(PUBLISHED))
def test_files_match_the_published_script(name, seed):
    task, original = miniature(name)
    files = build_split(task, original, k=4, seed=seed)
    digests = {n: hashlib.sha256(t.encode()).hexdigest()[:16] for n, t in files.items()}
    assert digests == PUBLISHED[(name, seed)]


@pytest.mark.parametrize("name", TASKS)
def test_k_per_label_disjoint_and_deterministic(name):
    task, original = miniature(name)
    files = build_split(task, original, k=3, seed=21)
    assert build_split(task, original, k=3, seed=21) == files
    assert build_split(task, original, k=3, seed=42) != files
    splits = parse_split(task, files)
    labels = set(task.label_words)
    assert Counter(map(task.label, splits.train)) == dict.fromkeys(labels, 3)
    assert Counter(map(task.label, splits.dev)) == dict.fromkeys(labels, 3)

    def key(row):
        return (*task.sentences(row), task.label(row))

    assert not {key(r) for r in splits.train} & {key(r) for r in splits.dev}
    all_train = {key(r) for r in parse_split(task, build_split(task, original, 100, 0)).train}
    assert {key(r) for r in splits.train + splits.dev} <= all_train


@pytest.mark.parametrize("name", ["sst2", "sst5", "mnli"])
def test_test_sets_are_capped(name):
    task, original = miniature(name)
    full = parse_split(task, build_split(task, original, k=2, seed=13)).test
    capped = parse_split(task, build_split(task, original, k=2, seed=13, test_cap=3)).test
    expected = ["test_matched", "test_mismatched"] if name == "mnli" else ["test"]
    assert list(capped) == list(full) == expected
    for rows in capped.values():
        assert len(rows) == 3
    for name_, rows in full.items():
        assert len(rows) > 3
        assert all(r in rows for r in capped[name_])  # a sample of the original, not new rows


def test_k_beyond_the_source_warns_with_the_shortfall(caplog):
    task, original = miniature("rte")
    with caplog.at_level(logging.WARNING):
        splits = parse_split(task, build_split(task, original, k=6, seed=13))
    assert "label 'entailment' has 8 training examples, short of the 12" in caplog.text
    assert "train gets 6 and dev 2" in caplog.text
    assert len(splits.train) == 12 and len(splits.dev) == 4


def test_run_refuses_a_split_without_dev():
    cfg = TaskConfig(name="rte", hub_id="aps/super_glue", source="sample", k=16)
    with pytest.raises(DataError, match=r"no dev examples.*lower task\.k \(lozo-exp kshot: --k\)"):
        kshot_splits(load_task("masked", "rte"), cfg)


def test_cli_without_archive_or_hub_says_where_to_put_the_archive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--task", "rte", "--k", "4", "--seed", "13", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("\nlozo-exp: ") and "Traceback" not in err
    assert "hub dataset aps/super_glue" in err
    assert f"archive's RTE folder at {tmp_path / 'original' / 'RTE'}" in err


def test_cli_builds_from_the_archive(tmp_path, capsys):
    shutil.copytree(MINIATURE, tmp_path / "original")
    args = ["--task", "mnli", "trec", "--k", "2", "4", "--seed", "13", "87"]
    main([*args, "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"mnli: source = LM-BFF archive {tmp_path / 'original' / 'MNLI'}" in out
    for archive, files in (
        ("MNLI", {"train.tsv", "dev_matched.tsv", "test_matched.tsv", "test_mismatched.tsv"}),
        ("trec", {"train.csv", "dev.csv", "test.csv"}),
    ):
        for k in (2, 4):
            for seed in (13, 87):
                folder = tmp_path / "k-shot-1k-test" / archive / f"{k}-{seed}"
                assert {p.name for p in folder.iterdir()} == files | {"kshot_source.json"}
                record = json.loads((folder / "kshot_source.json").read_text())
                assert record["source"]["description"].startswith("LM-BFF archive")
                assert (record["k"], record["seed"], record["builder"]) == (k, seed, BUILDER)
                assert set(record["files"]) == files  # each file's sha256
    task, original = miniature("trec")
    built = (tmp_path / "k-shot-1k-test" / "trec" / "4-87" / "train.csv").read_text()
    assert built == build_split(task, original, 4, 87)["train.csv"]


def test_run_builds_from_hub_rows_on_first_use_then_reads(tmp_path, caplog):
    """`task.data_files` stands in for the hub: rows in the hub dataset's schema."""
    cfg = task_config(
        "sst2",
        lmbff_root=str(tmp_path),
        k=2,
        data_files={
            "train": str(SAMPLES / "sst2" / "train.jsonl"),
            "validation": str(SAMPLES / "sst2" / "validation.jsonl"),
        },
    )
    task = load_task("masked", "sst2")
    with caplog.at_level(logging.INFO):
        first = kshot_splits(task, cfg)
    folder = tmp_path / "k-shot-1k-test" / "SST-2" / "2-13"
    assert "built from the local files" in caplog.text and str(folder) in caplog.text
    record = json.loads((folder / "kshot_source.json").read_text())
    assert record["source"]["description"].startswith("local files")
    assert Counter(map(task.label, first.train)) == {"0": 2, "1": 2}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = kshot_splits(task, cfg)
    assert f"k-shot split {folder} (built from local files" in caplog.text
    assert again == first


def test_hub_rows_map_to_archive_labels():
    rte, snli, trec = (load_task("masked", n) for n in ("rte", "snli", "trec"))
    row = {"premise": "It rains.", "hypothesis": "It is wet.", "label": 1}
    assert rte.from_hub(row) == (["It rains.", "It is wet."], "not_entailment")
    assert rte.from_hub({**row, "label": 0})[1] == "entailment"
    assert rte.from_hub({**row, "label": "entailment"})[1] == "entailment"  # GLUE-style text
    assert snli.from_hub({**row, "label": 2})[1] == "contradiction"
    # CogComp/trec coarse labels ABBR, ENTY, DESC, HUM, LOC, NUM -> LM-BFF's 2, 1, 0, 3, 4, 5.
    words = [trec.label_words[trec.from_hub({"text": "?", "coarse_label": i})[1]] for i in range(6)]
    assert words == ["Expression", "Entity", "Description", "Human", "Location", "Number"]


def test_mnli_builds_both_test_sets_from_local_hub_files(tmp_path):
    rows = [
        {"premise": f"Premise {i}.", "hypothesis": f"Hypothesis {i}.", "label": i % 3, "idx": i}
        for i in range(12)
    ]
    files = {}
    for split in ("train", "validation_matched", "validation_mismatched"):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    cfg = compose_config(
        "model=roberta-large",
        "task=mnli",
        "task.k=2",
        f"task.lmbff_root={tmp_path}",
        *(f"task.data_files.{split}={path}" for split, path in files.items()),
    )
    validate(cfg)  # the hub's split names are valid keys of task.data_files
    cfg = cfg.task
    splits = kshot_splits(load_task("masked", "mnli"), cfg)
    assert list(splits.test) == ["test_matched", "test_mismatched"]
    assert len(splits.train) == 6 and len(splits.test["test_mismatched"]) == 12
    assert splits.train[0]["sentence1"].startswith("Premise")


def _files_config(tmp_path, train: Path, **overrides) -> TaskConfig:
    return task_config(
        "sst2",
        lmbff_root=str(tmp_path / "data"),
        k=2,
        data_files={"train": str(train), "validation": str(SAMPLES / "sst2" / "validation.jsonl")},
        **overrides,
    )


def test_a_cached_split_is_rebuilt_when_its_source_changed(tmp_path, caplog):
    train = tmp_path / "train.jsonl"
    shutil.copy(SAMPLES / "sst2" / "train.jsonl", train)
    task, cfg = load_task("masked", "sst2"), _files_config(tmp_path, train)
    first = kshot_splits(task, cfg)
    folder = tmp_path / "data" / "k-shot-1k-test" / "SST-2" / "2-13"
    record = json.loads((folder / "kshot_source.json").read_text())
    digest = hashlib.sha256(train.read_bytes()).hexdigest()
    assert record["source"]["inputs"]["train"] == {
        "path": str(train),
        "size": train.stat().st_size,
        "sha256": digest,
    }
    assert record["source"]["inputs"]["validation"]["size"] > 0
    train.write_text(train.read_text().replace("movie", "film"))  # the user fixes their file
    with caplog.at_level(logging.WARNING):
        again = kshot_splits(task, cfg)
    assert f"k-shot split {folder} is stale (train input" in caplog.text
    assert again.train != first.train and any("film" in r["sentence"] for r in again.train)
    rebuilt = json.loads((folder / "kshot_source.json").read_text())
    assert rebuilt["source"]["inputs"]["train"]["sha256"] != digest
    assert kshot_splits(task, cfg) == again  # and read as it is from now on


def test_data_files_are_honoured_whatever_task_source_says(tmp_path):
    """RoBERTa with `task.source=sample` (the tiny models' default) and data files: the split
    comes from the files, not from the bundled miniature archive."""
    rows = [json.loads(line) for line in (SAMPLES / "sst2" / "train.jsonl").open()]
    train = tmp_path / "mine.jsonl"
    train.write_text(
        "".join(json.dumps({**r, "sentence": f"mine {i}"}) + "\n" for i, r in enumerate(rows))
    )
    task = load_task("masked", "sst2")
    splits = kshot_splits(task, _files_config(tmp_path, train, source="sample"))
    assert all(
        r["sentence1" if "sentence1" in r else "sentence"].startswith("mine") for r in splits.train
    )


def test_the_cli_keeps_a_split_that_is_up_to_date_and_never_replaces_foreign_files(
    tmp_path, capsys
):
    args = ["--task", "trec", "--k", "2", "--seed", "13", "--source", "sample"]
    main([*args, "--data-dir", str(tmp_path)])
    folder = tmp_path / "k-shot-1k-test" / "trec" / "2-13"
    assert f"{folder}: dev.csv, test.csv, train.csv" in capsys.readouterr().out
    main([*args, "--data-dir", str(tmp_path)])
    assert f"{folder}: up to date" in capsys.readouterr().out
    (folder / "notes.txt").write_text("my notes\n")  # not the suite's: never replaced
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SystemExit):
        main([*args, "--test-cap", "3", "--data-dir", str(tmp_path)])  # a rebuild, refused
    assert f"{folder} holds notes.txt, changed or added since" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_cli_refuses_to_replace_a_directory_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "k-shot-1k-test" / "trec" / "2-13"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("0,my own split\n")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "--task",
                "trec",
                "--k",
                "2",
                "--seed",
                "13",
                "--source",
                "sample",
                "--data-dir",
                str(tmp_path),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 1 and f"{folder} holds files and no kshot_source.json" in err
    assert [p.name for p in folder.iterdir()] == ["train.csv"]
    assert (folder / "train.csv").read_text() == "0,my own split\n"
