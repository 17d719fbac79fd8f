"""OPT tasks: published templates, metrics, sampling, batched evaluation and end-to-end runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config, read_metrics, run_overrides

from large_models.adapter import AnswerBatch, CandidateBatch, CausalLMAdapter, PromptBatch
from lozo_exp import runner as runner_module
from lozo_exp.adapter import available_tasks, load_task
from lozo_exp.config import ConfigError, TaskConfig
from lozo_exp.data import SAMPLES, sample_opt_protocol
from lozo_exp.methods import build_method
from lozo_exp.methods.evaluation import Demonstrations
from lozo_exp.metrics import exact_match, f1, normalize_answer
from lozo_exp.models import load_model, load_tokenizer
from lozo_exp.runner import Runner

TASKS = available_tasks("causal")
# Short runs on few rows: generation (50 tokens per answer of a random model) dominates the time.
SMALL = ("task.num_dev=6", "task.num_eval=6")
FAST = (
    "trainer.max_steps=4",
    "trainer.eval_steps=4",
    "trainer.log_steps=2",
    "method.batch_size=2",
    *SMALL,
)

# -- templates: a fixed example per task and the exact string the published template renders --
TEMPLATES = {
    "sst2": (
        {"sentence": "a gorgeous movie . ", "label": 1, "idx": 0},
        "a gorgeous movie . It was",
        (" terrible", " great"),
        1,
    ),
    "rte": (
        {"premise": "Cats purr.", "hypothesis": "Cats make sounds.", "idx": 0, "label": 0},
        'Cats purr.\nDoes this mean that "Cats make sounds." is true? Yes or No?\n',
        ("Yes", "No"),
        0,
    ),
    "cb": (
        {"premise": "He left.", "hypothesis": "he was gone", "idx": 0, "label": 2},
        'Suppose He left. Can we infer that "he was gone"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        2,
    ),
    "boolq": (
        {"question": "is the sky blue", "answer": False, "passage": "The sky is blue."},
        "The sky is blue. Is the sky blue?\n",
        ("Yes", "No"),
        1,
    ),
    "wsc": (
        {
            "text": "Tom thanked Bob because He helped.",
            "span1_index": 2,
            "span2_index": 4,
            "span1_text": "Bob",
            "span2_text": "He",
            "idx": 0,
            "label": 1,
        },
        'Tom thanked Bob because He helped.\nIn the previous sentence, does the pronoun "he" '
        "refer to Bob? Yes or No?\n",
        ("No", "Yes"),
        1,
    ),
    "wic": (
        {"word": "bank", "sentence1": "A river bank.", "sentence2": "A bank loan.", "label": 0},
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
        "A river bank.\nA bank loan.\n",
        ("No", "Yes"),
        0,
    ),
    "multirc": (
        {"paragraph": "Ann ran.", "question": "Who ran?", "answer": "Ann", "label": 1},
        'Ann ran.\nQuestion: Who ran?\nI found this answer "Ann". Is that correct? Yes or No?\n',
        ("No", "Yes"),
        1,
    ),
    "copa": (
        {
            "premise": "The man fell. ",
            "choice1": "He slipped on ice.",
            "choice2": "I pushed him.",
            "question": "cause",
            "label": 1,
        },
        "The man fell because",
        (" he slipped on ice.", " I pushed him."),
        1,
    ),
    "record": (
        {
            "passage": "Ann met Bob in Rome.\n@highlight\nAnn visits Rome",
            "query": "@placeholder met Bob.",
            "entities": ["Bob", "Ann", "Rome"],
            "answers": ["Ann"],
        },
        "Ann met Bob in Rome.\n- Ann visits Rome\n-",
        (" Bob met Bob.", " Ann met Bob.", " Rome met Bob."),
        1,
    ),
    "squad": (
        {
            "title": "Nile",
            "context": "The Nile flows north.",
            "question": " Which way? ",
            "answers": {"text": ["north", "northward"], "answer_start": [15, 15]},
        },
        "Title: Nile\nContext: The Nile flows north.\nQuestion: Which way?\nAnswer:",
        (" north\n",),
        0,
    ),
    "drop": (
        {
            "passage": "Two goals.",
            "question": "How many goals?",
            "answers_spans": {"spans": ["2", "two"], "types": ["number", "number"]},
        },
        "Passage: Two goals.\nQuestion: How many goals?\nAnswer:",
        (" 2\n",),
        0,
    ),
}


@pytest.mark.parametrize("name", TASKS)
def test_template_renders_the_published_prompt(name):
    row, context, options, label = TEMPLATES[name]
    prompted = load_task("causal", name).render(row)
    assert (prompted.context, prompted.options, prompted.label) == (context, options, label)


def test_task_kinds_and_metrics():
    kinds = {
        n: (t.objective, t.metric, t.generation) for n in TASKS for t in [load_task("causal", n)]
    }
    assert kinds["squad"] == kinds["drop"] == ("lm", "f1", True)
    assert kinds["copa"] == kinds["record"] == ("lm", "accuracy", False)
    classification = set(TASKS) - {"squad", "drop", "copa", "record"}
    assert {kinds[n] for n in classification} == {("classification", "accuracy", False)}


def test_record_accepts_every_answer_and_generation_keeps_all_golds():
    record = load_task("causal", "record").render(
        {
            "passage": "p",
            "query": "@placeholder q",
            "entities": ["A", "B", "C"],
            "answers": ["C", "A"],
        }
    )
    assert record.label == 2 and [record.is_correct(i) for i in range(3)] == [True, False, True]
    squad = load_task("causal", "squad").render(TEMPLATES["squad"][0])
    assert squad.answers == ("north", "northward")


# -- metrics ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat, sat!", "cat sat"),
        ("an apple a day", "apple day"),
        ("Theatre (U.S.)", "theatre us"),
        ("  A  ", ""),
    ],
)
def test_squad_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_f1_and_em_hand_computed():
    # pred tokens [big, red, dog], gold [red, dog, barked]: 2 shared, P = R = 2/3
    assert f1("the big red dog", ["Red dog barked."]) == pytest.approx(2 / 3)
    # pred [john, smith], gold [smith]: P = 1/2, R = 1, F1 = 2/3; the second gold matches fully
    assert f1("John Smith", ["Smith", "john smith!"]) == 1.0
    assert f1("John Smith", ["Smith"]) == pytest.approx(2 / 3)
    assert f1("", ["north"]) == 0.0 and f1("a", ["the"]) == 0.0  # empty after normalisation
    assert f1("yes yes", ["yes"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are a multiset
    assert exact_match("The Nile.", ["nile"]) == 1.0
    assert exact_match("Nile river", ["nile"]) == 0.0


# -- sampling ----------------------------------------------------------------------------------
def _rows(n: int) -> list[dict]:
    return [{"i": i} for i in range(n)]


def test_sampling_is_the_published_permutation_deterministic_and_disjoint():
    cfg = TaskConfig(name="x", hub_id="x", num_train=30, num_dev=10, num_eval=15, train_set_seed=3)
    a = sample_opt_protocol(cfg, _rows(100), _rows(50))
    b = sample_opt_protocol(cfg, _rows(100), _rows(50))
    assert a == b
    np.random.seed(3)  # the published sample_subset: np.random.permutation under temp_seed
    order = np.random.permutation(100).tolist()[:40]
    assert [r["i"] for r in a.train] == order[:30] and [r["i"] for r in a.dev] == order[30:]
    np.random.seed(3)
    assert [r["i"] for r in a.test["test"]] == np.random.permutation(50).tolist()[:15]
    assert not {r["i"] for r in a.train} & {r["i"] for r in a.dev}
    c = sample_opt_protocol(TaskConfig(**{**cfg.__dict__, "train_set_seed": 4}), _rows(100), [])
    assert [r["i"] for r in c.train] != [r["i"] for r in a.train]


def _published_split(n_source: int, num_train: int, num_dev: int, seed: int) -> tuple[list, list]:
    """run.py / tasks.py: sample_subset(num_train + num_dev) under temp_seed, then
    dev = train_samples[-num_dev:], train = train_samples[:-num_dev]."""
    np.random.seed(seed)
    picked = np.random.permutation(n_source).tolist()[: num_train + num_dev]
    return picked[:-num_dev], picked[-num_dev:]


@pytest.mark.parametrize(
    "task, n_source, num_dev, sizes",
    [("wsc", 554, 500, (54, 500)), ("cb", 250, 100, (150, 100)), ("copa", 400, 100, (300, 100))],
)
def test_a_small_source_keeps_dev_whole_and_shortens_train_as_published(
    task, n_source, num_dev, sizes, caplog
):
    cfg = TaskConfig(name=task, hub_id="x", num_train=1000, num_dev=num_dev, num_eval=1000)
    for seed in (0, 5):
        cfg.train_set_seed = seed
        with caplog.at_level(logging.INFO):
            splits = sample_opt_protocol(cfg, _rows(n_source), _rows(104))
        assert (len(splits.train), len(splits.dev), len(splits.test["test"])) == (*sizes, 104)
        train, dev = _published_split(n_source, 1000, num_dev, seed)
        assert [r["i"] for r in splits.train] == train and [r["i"] for r in splits.dev] == dev
    assert f"{task}: the training split has {n_source} rows, fewer than" in caplog.text
    assert f"{task}: {sizes[0]} train + {sizes[1]} dev sampled from {n_source}" in caplog.text
    assert "asked for 1000 test examples, the validation split has only 104" in caplog.text


def test_a_source_of_at_most_num_dev_rows_is_all_dev_and_training_on_it_is_refused(tmp_path):
    cfg = TaskConfig(name="cb", hub_id="x", num_train=1000, num_dev=500, num_eval=10)
    splits = sample_opt_protocol(cfg, _rows(250), _rows(56))
    np.random.seed(0)  # published: train_samples[-500:] of 250 rows is all of them, in order
    assert splits.train == []
    assert [r["i"] for r in splits.dev] == np.random.permutation(250).tolist()
    # The sample has 24 rows: num_dev=30 leaves no training rows (published: an empty train set).
    with pytest.raises(ConfigError, match="task cb has no training examples: all 24 sampled rows"):
        run_overrides(tmp_path / "mezo", "task=cb", "task.num_dev=30", "method=mezo")
    result = run_overrides(tmp_path / "zs", "task=cb", "task.num_dev=30", "method=zero-shot")
    assert result["status"] == "completed" and result["steps"] == 0


def test_cb_and_copa_use_100_dev_examples():
    for name in ("cb", "copa"):
        assert compose_config("model=opt-13b", f"task={name}").task.num_dev == 100
    assert compose_config("model=opt-13b", "task=rte").task.num_dev == 500


# -- batched evaluation ------------------------------------------------------------------------
def _adapter(task: str, *overrides: str) -> tuple[CausalLMAdapter, list[dict]]:
    cfg = compose_config(f"task={task}", "model.dtype=float64", *overrides)
    task_obj = load_task("causal", task)
    splits = CausalLMAdapter.build_splits(task_obj, cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    adapter = CausalLMAdapter(
        load_model(cfg.model, tokenizer).eval(), tokenizer, task_obj, cfg.model
    )
    adapter.prepare(cfg, splits)
    build_method(cfg).prepare_adapter(adapter, splits)
    return adapter, splits.test["test"]


@pytest.mark.parametrize("task", ["record", "cb", "squad"])
def test_batched_predictions_equal_one_at_a_time(task):
    adapter, rows = _adapter(task)
    rows = rows[: 3 if task == "squad" else 6]  # generation in float64 is the slow part
    assert adapter.predict(rows) == [p for row in rows for p in adapter.predict([row])]


@pytest.mark.parametrize(
    "task, overrides, batch_type",
    [
        ("cb", (), CandidateBatch),
        ("squad", (), AnswerBatch),
        ("squad", ("task.non_diff=true", "method=mezo"), PromptBatch),
    ],
)
def test_each_objective_has_its_batch_type_and_the_batch_loss_is_the_mean(
    task, overrides, batch_type
):
    adapter, rows = _adapter(task, *overrides)
    rows = rows[:4]
    batch = adapter.collate(rows)
    assert type(batch) is batch_type
    if batch_type is CandidateBatch:
        assert batch.num_options == [3] * 4 and batch.input_ids.shape[0] == 12
    with torch.no_grad():
        singles = [float(adapter.loss(adapter.collate([row]))) for row in rows]
        if batch_type is AnswerBatch:  # the mean NLL over all answer tokens: token-weighted
            weights = [float(adapter.collate([row]).option_lens.sum()) for row in rows]
        else:
            weights = [1.0] * len(rows)
        expected = sum(w * x for w, x in zip(weights, singles, strict=True)) / sum(weights)
        assert float(adapter.loss(batch)) == pytest.approx(expected, rel=1e-6)  # float32 logp


def test_icl_prompt_joins_demonstrations_and_left_truncates_keeping_bos():
    adapter, rows = _adapter("rte", "method=icl", "method.num_demos=3", "model.max_length=64")
    demonstrations = adapter.context_prefix
    pool = demonstrations.pool
    demos = [adapter.answered(pool[i]) for i in demonstrations.indices(rows[0])]
    assert len(demos) == 3 and all(d.endswith(("Yes", "No")) for d in demos)
    prompted = adapter.render(rows[0])
    template = load_task("causal", "rte").render(rows[0]).context
    assert prompted.context == "\n\n".join(demos) + "\n\n" + template
    batch = adapter.collate(rows[:1])
    full = adapter.tokenizer(prompted.context + "Yes")["input_ids"]
    assert batch.input_ids.shape == (2, 64)
    assert (batch.input_ids[:, 0] == adapter.tokenizer.bos_token_id).all()
    yes = prompted.options.index("Yes")
    assert batch.input_ids[yes, 1:].tolist() == full[-63:] and batch.option_lens[yes] == 1


def _published_icl_demos(n_pool: int, n_eval: int, num_demos: int) -> list[list[int]]:
    """run.py without train_set_seed: seeds from np.random.randint(0, 10000, num_eval) under
    temp_seed(0), then for example i sample_subset('train', seeds[i], num_demos)."""
    np.random.seed(0)
    seeds = np.random.randint(0, 10000, n_eval)
    demos = []
    for seed in seeds:
        np.random.seed(seed)
        demos.append(np.random.permutation(n_pool).tolist()[:num_demos])
    return demos


def test_icl_draws_demonstrations_per_example_as_published_and_reproducibly():
    pool, test = _rows(300), _rows(40)
    drawn = Demonstrations(pool, [test], 32, seed=0, answered=str)
    per_example = [drawn.indices(row) for row in test]
    assert per_example == _published_icl_demos(300, 40, 32)
    assert len({tuple(d) for d in per_example}) == 40  # a fresh set for every example
    again = Demonstrations(pool, [test], 32, seed=0, answered=str)
    other = Demonstrations(pool, [test], 32, seed=1, answered=str)
    assert [again.indices(row) for row in test] == per_example  # same seed, same demos
    assert all(other.indices(row) != d for row, d in zip(test, per_example, strict=True))
    assert drawn(test[0]) == "\n\n".join(str(pool[i]) for i in per_example[0]) + "\n\n"
    # A dev row (one of the pool) never shows itself; the next of its permutation comes in.
    dev = pool[:40]
    own = Demonstrations(pool, [dev], 32, seed=0, answered=str)
    extended = _published_icl_demos(300, 40, 33)
    assert any(i in extended[i] for i in range(40))  # the exclusion is exercised
    for i, row in enumerate(dev):
        assert own.indices(row) == [j for j in extended[i] if j != i][:32]
    with pytest.raises(KeyError, match="not one of them"):
        drawn.indices({"i": 0})


def test_icl_run_draws_from_the_whole_training_split(tmp_path):
    cfg = compose_config("task=rte", "method=icl", "method.num_demos=4", "task.num_train=4", *SMALL)
    runner = Runner(cfg, tmp_path / "a")
    adapter, splits = runner.adapter, runner.splits
    assert adapter.context_prefix.pool is splits.train_source and len(splits.train_source) == 24
    test = splits.test["test"]
    sampled = {id(row) for row in splits.train + splits.dev}  # 10 of the 24 rows
    used = {i for row in test for i in adapter.context_prefix.indices(row)}
    assert any(id(splits.train_source[i]) not in sampled for i in used)
    prefixes = [adapter.context_prefix(row) for row in test]
    assert len(set(prefixes)) == len(test) and all(p.count("\n\n") == 4 for p in prefixes)
    assert [adapter.render(row).context for row in test] == [
        p + load_task("causal", "rte").render(row).context
        for p, row in zip(prefixes, test, strict=True)
    ]
    again = Runner(cfg, tmp_path / "b").adapter
    assert [again.context_prefix(row) for row in again.context_prefix.evaluated[1]] == prefixes
    zero_shot = Runner(compose_config("task=rte", "method=zero-shot", *SMALL), tmp_path / "c")
    assert zero_shot.adapter.context_prefix is None


# -- end to end ---------------------------------------------------------------------------------
def _parquet_files(task: str, tmp_path: Path) -> list[str]:
    """The bundled sample rewritten as parquet, passed as task.data_files."""
    overrides = []
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (SAMPLES / task / f"{split}.jsonl").open()]
        path = tmp_path / f"{task}-{split}.parquet"
        pd.DataFrame(rows).to_parquet(path)
        overrides.append(f"+task.data_files.{split}={path}")
    return overrides


@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs_mezo_from_the_sample_and_lozo_from_data_files(task, tmp_path):
    metric = load_task("causal", task).metric
    mezo = run_overrides(tmp_path / "mezo", f"task={task}", "method=mezo", *FAST)
    lozo = run_overrides(
        tmp_path / "lozo", f"task={task}", "method=lozo", *FAST, *_parquet_files(task, tmp_path)
    )
    for result in (mezo, lozo):
        assert result["status"] == "completed" and result["steps"] == 4
        assert result["metric"] == metric and 0.0 <= result["test"][metric] <= 1.0
    losses = [r["loss"] for r in read_metrics(tmp_path / "lozo") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("task", ["rte", "squad"])
def test_ft_runs(task, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    initial = {}

    def load(*args):
        model = load_model(*args)
        initial.update((n, p.detach().clone()) for n, p in model.named_parameters())
        return model

    monkeypatch.setattr(runner_module, "load_model", load)
    overrides = (f"task={task}", "method=ft", "trainer.save_final=true", *FAST)
    result = run_overrides(tmp_path / "ft", *overrides)
    assert result["status"] == "completed" and result["steps"] == 4
    losses = [r["loss"] for r in read_metrics(tmp_path / "ft") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    final = load_file(tmp_path / "ft" / "final.safetensors")
    assert final.keys() <= initial.keys()
    changed = [n for n, w in final.items() if not torch.equal(w, initial[n])]
    assert len(changed) > len(final) / 2, changed  # FT trains (nearly) every weight


@pytest.mark.parametrize("method", ["zero-shot", "icl"])
@pytest.mark.parametrize("task", ["copa", "drop"])
def test_evaluation_only_methods(task, method, tmp_path):
    result = run_overrides(tmp_path / method, f"task={task}", f"method={method}", *SMALL)
    assert result["status"] == "completed" and result["steps"] == 0
    assert result["metric"] in result["test"]


def test_non_differentiable_squad_objective(tmp_path):
    result = run_overrides(
        tmp_path / "nd",
        "task=squad",
        "task.non_diff=true",
        "method=mezo",
        *FAST,
        "trainer.max_steps=2",
    )
    assert result["status"] == "completed"
    losses = [r["loss"] for r in read_metrics(tmp_path / "nd") if "loss" in r]
    assert all(-1.0 <= x <= 0.0 for x in losses)  # the loss is -F1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("task=squad", "task.non_diff=true", "method=ft"),
            "task.non_diff=true .* method.name='ft'",
        ),
        (("task=sst2", "task.non_diff=true", "method=mezo"), "needs a generation task"),
        (("model=tiny-roberta", "method=icl"), "method.name=icl .* needs a causal model"),
    ],
)
def test_config_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_overrides(tmp_path / "bad", *overrides)


def test_eval_bench_writes_throughput_json(tmp_path, monkeypatch):
    from large_models import eval_bench

    out = tmp_path / "bench.json"
    argv = ["eval_bench", "--out", str(out), "--tasks", "cb,squad", "--rows", "2"]
    monkeypatch.setattr("sys.argv", [*argv, "--single-rows", "1", "trainer.eval_batch_size=2"])
    eval_bench.main()
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-opt" and set(report["tasks"]) == {"cb", "squad"}
    for name, kind in (("cb", "candidate scoring"), ("squad", "generation")):
        result = report["tasks"][name]
        assert result["kind"] == kind and result["agreement"] == 1.0
        assert result["batched_examples_per_s"] > 0 and result["single_examples_per_s"] > 0
