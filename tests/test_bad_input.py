"""Bad input as a careful user would try it (issue 15): every case ends the command with exit
status 1 and one paragraph naming the problem, before any model loads, with every file that was
there unchanged (by hash) and nothing left that blocks the run directory."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import hold_run_dir

import lozo_exp.runner as runner_module
from lozo_exp import outputs
from lozo_exp.__main__ import main
from lozo_exp.adapter import available_tasks, load_task
from medium_models.kshot import MINIATURE
from medium_models.kshot import main as kshot

SAMPLES = Path(__file__).resolve().parents[1] / "lozo_exp" / "samples"
SST2 = [json.loads(line) for line in (SAMPLES / "sst2" / "validation.jsonl").open()]
TRAIN = f"task.data_files.train={SAMPLES / 'sst2' / 'train.jsonl'}"
VALIDATION = f"task.data_files.validation={SAMPLES / 'sst2' / 'validation.jsonl'}"
ROBERTA = "model=tiny-roberta"
PATHS = {
    "squad": SAMPLES / "squad" / "train.jsonl",
    "copa": SAMPLES / "copa" / "validation.jsonl",
    "rec": SAMPLES / "record" / "validation.jsonl",
}
GARBAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # a binary file under a data file's name


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def sample(task: str, split: str, **changes) -> str:
    """The bundled sample of a task with `changes` applied to every row, as JSON lines."""
    rows = [json.loads(line) for line in (SAMPLES / task / f"{split}.jsonl").open()]
    return jsonl([{**row, **changes} for row in rows])


def edited_cache(tmp: Path) -> None:
    """A k-shot split the suite built from the archive, then edited by hand."""
    shutil.copytree(MINIATURE, tmp / "data" / "original")
    kshot(["--task", "sst2", "--k", "4", "--seed", "13", "--data-dir", str(tmp / "data")])
    with (tmp / "data" / "k-shot-1k-test" / "SST-2" / "4-13" / "train.tsv").open("a") as f:
        f.write("my own extra example .\t1\n")


def split_for_k2(tmp: Path) -> None:
    args = ["--task", "sst2", "--k", "2", "--seed", "13", "--source", "sample"]
    kshot([*args, "--data-dir", str(tmp)])


@dataclass
class Case:
    """Files to write under the test's directory (text, bytes, or a function that writes
    them), the command line (`{tmp}`: that directory; `{squad}` etc.: bundled samples, `PATHS`)
    and what the message must say."""

    overrides: list[str]
    message: str  # a regular expression the one-paragraph message must match
    files: dict[str, str | bytes] | Callable[[Path], None] = field(default_factory=dict)


TSV = "sentence\tlabel\nan example .\t1\n"
CASES = {
    # -- derived data never replaces inputs and is never stale
    "a data_dir with your dev and test files but no train file": Case(
        [ROBERTA, "task.data_dir={tmp}/mine"],
        r"mine holds dev\.tsv, test\.tsv but not train\.tsv.*never writes into a directory you",
        {"mine/dev.tsv": TSV, "mine/test.tsv": TSV},
    ),
    "a cached split edited by hand": Case(
        [ROBERTA, "task.source=hub", "task.lmbff_root={tmp}/data"],
        r"4-13 holds train\.tsv, changed or added since; the suite never replaces files it did",
        edited_cache,
    ),
    "a split the suite did not build where task.data_files builds one": Case(
        [ROBERTA, "task.lmbff_root={tmp}/data", TRAIN, VALIDATION],
        r"4-13 holds a k-shot split the suite did not build .* from task\.data_files",
        {f"data/k-shot-1k-test/SST-2/4-13/{name}.tsv": TSV for name in ("train", "dev", "test")},
    ),
    "a data_dir split built for another k": Case(
        [ROBERTA, "task.data_dir={tmp}/k-shot-1k-test/SST-2/2-13"],
        r"holds a split built with task\.k=2 \(this run: 4\)",
        split_for_k2,
    ),
    "an unknown label in your split directory": Case(
        [ROBERTA, "task.data_dir={tmp}/mine"],
        r"mine/dev\.tsv: row 1: label '7' is not one of '0', '1'",
        {"mine/train.tsv": TSV, "mine/dev.tsv": "sentence\tlabel\nx .\t7\n", "mine/test.tsv": TSV},
    ),
    # -- task.data_files: honoured, or the combination is an error
    "RoBERTa: data_files for some splits with task.source=sample": Case(
        [ROBERTA, TRAIN],
        r"gives train but not validation, and task\.source=sample would read that from the bun",
    ),
    "OPT: data_files for some splits with task.source=sample": Case(
        [VALIDATION], r"gives validation but not train, and task\.source=sample"
    ),
    "a data file for a split the task does not read": Case(
        [TRAIN, VALIDATION, "task.data_files.test={tmp}/test.jsonl"],
        r"task\.data_files\.test=.* is a split task sst2 does not read on a causal model",
        {"test.jsonl": sample("sst2", "validation")},
    ),
    "data_dir and data_files together": Case(
        [ROBERTA, TRAIN, VALIDATION, "task.data_dir={tmp}/new"],
        r"task\.data_dir=.* names a k-shot split directory to read, and task\.data_files",
    ),
    # -- labels in the task's label set
    "OPT: an unlabelled validation file (label -1)": Case(
        [TRAIN, "task.data_files.validation={tmp}/dev.jsonl"],
        r"dev\.jsonl has no gold answers .* point it at a labelled split",
        {"dev.jsonl": sample("sst2", "validation", label=-1)},
    ),
    "RoBERTa: an unlabelled validation file (label -1)": Case(
        [ROBERTA, "task.lmbff_root={tmp}/data", TRAIN, "task.data_files.validation={tmp}/d.jsonl"],
        r"d\.jsonl has no gold answers",
        {"d.jsonl": sample("sst2", "validation", label=-1)},
    ),
    "OPT: labels out of range": Case(
        [TRAIN, "task.data_files.validation={tmp}/dev.jsonl"],
        r"dev\.jsonl: rows 1, 2, 3, \.\.\.: label 5 is not one of 0 \('terrible'\), 1 \('great",
        {"dev.jsonl": sample("sst2", "validation", label=5)},
    ),
    "RoBERTa: labels out of range": Case(
        [ROBERTA, "task.lmbff_root={tmp}/data", TRAIN, "task.data_files.validation={tmp}/d.jsonl"],
        r"d\.jsonl: rows 1, 2, 3, \.\.\.: label 7 is not one of 0 \(terrible\), 1 \(great\)",
        {"d.jsonl": sample("sst2", "validation", label=7)},
    ),
    "string labels": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"t\.jsonl: rows 1, 2, 3, \.\.\.: label 'positive' is text, not one of 0",
        {"t.jsonl": sample("sst2", "train", label="positive")},
    ),
    "float labels": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"label 0\.5 is a float, not one of 0",
        {"t.jsonl": sample("sst2", "train", label=0.5)},
    ),
    "a CSV with an empty label": Case(
        ["task.data_files.train={tmp}/t.csv", VALIDATION],
        r"t\.csv: row 2: column 'label' is empty \(1 of 3 rows\)",
        {"t.csv": "sentence,label\ngood .,1\nbad .,\nfine .,1\n"},
    ),
    "SQuAD rows without answers": Case(
        ["task=squad", "task.data_files.train={squad}", "task.data_files.validation={tmp}/d.jsonl"],
        r"d\.jsonl has no gold answers.*answers is an object whose 'text' lists",
        {"d.jsonl": sample("squad", "validation", answers={"text": [], "answer_start": []})},
    ),
    "COPA: an unknown question type": Case(
        ["task=copa", "task.data_files.train={tmp}/t.jsonl", "task.data_files.validation={copa}"],
        r"t\.jsonl: rows 1, 2, 3, \.\.\.: question 'why' is not one of effect, cause",
        {"t.jsonl": sample("copa", "train", question="why")},
    ),
    "ReCoRD: an answer that is not a candidate entity": Case(
        ["task=record", "task.data_files.train={tmp}/t.jsonl", "task.data_files.validation={rec}"],
        r"its first answer 'Atlantis' is not one of its entities",
        {"t.jsonl": sample("record", "train", answers=["Atlantis"])},
    ),
    # -- columns and their types
    "a missing label column": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"t\.jsonl has no column 'label' \(its columns: sentence\); task sst2 \(causal\) reads",
        {"t.jsonl": jsonl([{"sentence": r["sentence"]} for r in SST2])},
    ),
    "a missing text column": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"t\.jsonl has no column 'sentence' \(its columns: label, text\)",
        {"t.jsonl": jsonl([{"text": r["sentence"], "label": r["label"]} for r in SST2])},
    ),
    "numbers where text belongs": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"t\.jsonl: rows 1, 2, 3, \.\.\.: sentence 12 is an integer, not text",
        {"t.jsonl": sample("sst2", "train", sentence=12)},
    ),
    # -- files that cannot be read
    "an empty file": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION], r"t\.jsonl is empty", {"t.jsonl": ""}
    ),
    "a CSV with only its header": Case(
        ["task.data_files.train={tmp}/t.csv", VALIDATION],
        r"t\.csv has no rows",
        {"t.csv": "sentence,label\n"},
    ),
    "an empty validation split": Case(
        [TRAIN, "task.data_files.validation={tmp}/dev.jsonl"],
        r"dev\.jsonl has no rows",
        {"dev.jsonl": "\n\n"},
    ),
    "a malformed JSON line": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"t\.jsonl, line 4: not valid JSON \(Expecting ',' delimiter, column 18\)",
        {"t.jsonl": jsonl(SST2[:3]) + '{"sentence": "x" "label": 1}\n'},
    ),
    "binary garbage named .parquet": Case(
        ["task.data_files.train={tmp}/t.parquet", VALIDATION],
        r"cannot read .*t\.parquet as parquet: .*magic bytes",
        {"t.parquet": GARBAGE},
    ),
    "binary garbage named .jsonl": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"t\.jsonl is not UTF-8 text \(byte 0x89 at offset 0\)",
        {"t.jsonl": GARBAGE},
    ),
    "a CSV row longer than its header": Case(
        ["task.data_files.train={tmp}/t.csv", VALIDATION],
        r"cannot read .*t\.csv as csv",
        {"t.csv": "sentence,label\ngood .,1,extra\n"},
    ),
    "a directory as a data file": Case(
        ["task.data_files.train={tmp}/dir", VALIDATION],
        r"task\.data_files\.train: .*dir is a directory, not a file",
        {"dir/t.jsonl": sample("sst2", "train")},
    ),
    "a data file that does not exist": Case(
        ["task.data_files.train={tmp}/none.jsonl", VALIDATION], r"none\.jsonl does not exist"
    ),
    "a data file of an unknown type": Case(
        ["task.data_files.train={tmp}/t.txt", VALIDATION],
        r"the file type '\.txt' is not one of \.parquet",
        {"t.txt": "good .\t1\n"},
    ),
    # -- enough rows
    "a one-row train split (all of it dev, as published)": Case(
        ["task.data_files.train={tmp}/t.jsonl", VALIDATION],
        r"task sst2 has no training examples: all 1 sampled rows went to dev",
        {"t.jsonl": jsonl(SST2[:1])},
    ),
    "RoBERTa: k beyond the source (no dev example)": Case(
        [ROBERTA, "task.k=10"], r"has no dev examples.*more than k=10 training examples"
    ),
    # -- device and logger settings
    "a GPU this machine does not have": Case(
        ["trainer.device=cuda:99"], r"trainer\.device=cuda:99 but "
    ),
    "an unknown device": Case(["trainer.device=gpu"], r"trainer\.device='gpu' is not a device"),
    "an unknown logger.mode": Case(
        ["logger=wandb", "logger.mode=sometimes"], r"logger\.mode='sometimes' is not one of offline"
    ),
    "W&B online without credentials": Case(
        ["logger=wandb", "logger.mode=online"], r"logger\.mode=online needs W&B credentials"
    ),
    # -- numbers
    "lr inf": Case(["method.lr=inf"], r"method\.lr=inf is not a finite number"),
    "eps nan": Case(["method.eps=nan"], r"method\.eps=nan is not a finite number\.$"),
    "AdamW eps inf": Case(["method=ft", "method.adam_eps=inf"], r"method\.adam_eps=inf is not"),
    "a negative train_set_seed": Case(["task.train_set_seed=-1"], r"task\.train_set_seed=-1 must"),
    "a negative data_seed": Case([ROBERTA, "task.data_seed=-3"], r"task\.data_seed=-3 must lie"),
    "a negative progress_every_s": Case(
        ["trainer.progress_every_s=-1"], r"trainer\.progress_every_s=-1\.0 must be >= 0"
    ),
    "a negative lora_alpha": Case(
        ["method=mezo-lora", "method.lora_alpha=-16"], r"method\.lora_alpha=-16 must be > 0"
    ),
    "a LoRA target module the model lacks": Case(
        ["method=mezo-lora", "method.target_modules=[foo]"],
        r"method\.target_modules=\['foo'\] names no module of model tiny-opt; LoRA adapts its "
        r"Linear modules: k_proj, v_proj, q_proj, out_proj, fc1, fc2, lm_head\.$",
    ),
    "a LoRA module to save the model lacks (peft would skip it)": Case(
        [ROBERTA, "method=ft-lora", "method.modules_to_save=[lm_head,nope]"],
        r"method\.modules_to_save: 'nope' is not a module of model tiny-roberta \(peft would skip "
        r"it and train the adapters alone\); its modules are named: .*\bquery\b.*\blm_head\b",
    ),
    # -- keys the model family ignores
    "task.k on OPT": Case(
        ["task.k=32"], r"task\.k=32 is not used on a causal model \(model tiny-opt\)"
    ),
    "task.num_train on RoBERTa": Case(
        [ROBERTA, "task.num_train=10"], r"task\.num_train=10 is not used on a masked model"
    ),
    "task.lmbff_root on OPT": Case(
        ["task.lmbff_root=elsewhere"], r"task\.lmbff_root=elsewhere is not used"
    ),
    "task.data_dir on OPT": Case(["task.data_dir=/tmp"], r"task\.data_dir=/tmp is not used"),
}


def digests(directory: Path, skip: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


def write(tmp: Path, files: dict[str, str | bytes] | Callable[[Path], None]) -> None:
    if callable(files):
        files(tmp)
        return
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


@pytest.fixture
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner_module, "load_model", load_model)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    # The command sets it for its process (quiet progress bars), and `datasets` reads it once,
    # when imported: set here, it is unset again for the tests that run next.
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_with_one_paragraph_before_the_model_and_changes_nothing(
    name, tmp_path, capsys, no_model
):
    case = CASES[name]
    write(tmp_path, case.files)
    run_dir = tmp_path / "run"
    before = digests(tmp_path, run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(
            [*(o.format(tmp=tmp_path, **PATHS) for o in case.overrides), f"hydra.run.dir={run_dir}"]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("lozo-exp: ")
    assert re.search(case.message, message), message
    assert digests(tmp_path, run_dir) == before  # no input changed, no split written
    assert outputs.run_record(run_dir) is None  # the directory is free for the next run
    assert not (run_dir / outputs.LOCK).exists()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "rejected"


def test_every_issue_case_is_in_the_table():
    """The cases issue 15 lists, by the words of the issue."""
    listed = [
        "your dev and test files", "cached split edited", "data_files for some splits",
        "unlabelled validation", "labels out of range", "empty file", "only its header",
        "empty validation split", "malformed JSON", "binary garbage", "missing label column",
        "missing text column", "string labels", "float labels", "one-row train split",
        "SQuAD rows without answers", "COPA: an unknown question", "directory as a data file",
        "logger.mode", "W&B online", "GPU this machine", "unknown device", "lr inf", "eps nan",
        "negative train_set_seed", "negative lora_alpha", "task.k on OPT",
        "task.num_train on RoBERTa",
    ]  # fmt: skip
    assert [item for item in listed if not any(item in name for name in CASES)] == []


def test_cuda_without_a_gpu_is_refused_before_the_model(tmp_path, capsys, no_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        main(["trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}"])
    assert "trainer.device=cuda but no CUDA GPU is visible" in capsys.readouterr().err


def test_a_run_into_a_directory_another_run_uses_is_refused_before_writing(
    tmp_path, capsys, no_model
):
    run_dir = tmp_path / "run"
    holder = hold_run_dir(run_dir)
    try:
        before = digests(tmp_path, tmp_path / "none")
        with pytest.raises(SystemExit) as exit_:
            main([f"hydra.run.dir={run_dir}"])
        assert exit_.value.code == 1
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message == (
            f"lozo-exp: output directory {run_dir} is in use by another run (process "
            f"{holder.pid} on {socket.gethostname()}, started "
            f"{json.loads((run_dir / outputs.LOCK).read_text())['started']}); a run never "
            f"overwrites another: choose a new hydra.run.dir"
        )
        assert digests(tmp_path, tmp_path / "none") == before  # not even .hydra/
    finally:
        holder.stdin.close()
        holder.wait()


def test_the_readme_lists_the_columns_each_task_reads():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own data") :]
    listed = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("OPT", "RoBERTa"):
            for name in cells[1].split(", "):
                listed[(cells[0], name)] = re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", cells[2]))
    schemas = {
        ("OPT", name): load_task("causal", name).schema for name in available_tasks("causal")
    } | {
        ("RoBERTa", name): load_task("masked", name).hub_schema
        for name in available_tasks("masked")
    }
    assert {key: list(schema.columns) for key, schema in schemas.items()} == listed


def test_a_wandb_that_cannot_start_rejects_the_run_and_leaves_the_directory_free(
    tmp_path, capsys, monkeypatch
):
    wandb = pytest.importorskip("wandb")

    def init(**kwargs):
        raise RuntimeError("api key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # as `no_model` says
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["logger=wandb", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lozo-exp: logger=wandb could not start (RuntimeError: api key not configured "
        "(no-tty)); check logger.mode and your W&B login, or use logger=local"
    )
    assert not (run_dir / "metrics.jsonl").exists() and outputs.run_record(run_dir) is None
