"""Load a model and its tokenizer for a family: pretrained from the hub, or random-initialised.

`model.random_init=true` builds the architecture from its config with random weights and
downloads nothing: the hub config is used when it can be read (cache or network), otherwise
the architecture written in the model's YAML (`model.arch`). When the real tokenizer is not
available offline, the bundled stand-in tokenizer is used and the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from lozo_exp.config import ModelConfig

log = logging.getLogger(__name__)

STAND_IN_TOKENIZER = Path(__file__).parent / "assets" / "stand_in_tokenizer.json"
AUTO_MODEL = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}
# Architecture class used for `model.arch` when no hub config is at hand.
ARCH_TYPE = {"causal": "opt", "masked": "roberta"}


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


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
    if cfg.hub_id is not None:
        try:
            return AutoTokenizer.from_pretrained(cfg.hub_id)
        except OSError as err:
            if not cfg.random_init:
                raise
            log.warning(
                "tokenizer of %s not available offline (%s); using the bundled stand-in tokenizer",
                cfg.hub_id,
                type(err).__name__,
            )
    else:
        log.info("model %s has no hub checkpoint: using the bundled stand-in tokenizer", cfg.name)
    return stand_in_tokenizer(cfg.family)


def _architecture(cfg: ModelConfig, vocab_size: int):
    if cfg.hub_id is not None:
        try:
            return AutoConfig.from_pretrained(cfg.hub_id)
        except OSError:
            log.warning(
                "config of %s not available offline: building it from model.arch", cfg.hub_id
            )
    arch = {"vocab_size": vocab_size, **cfg.arch}
    return AutoConfig.for_model(ARCH_TYPE[cfg.family], **arch)


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    auto = AUTO_MODEL[cfg.family]
    dtype = torch_dtype(cfg.dtype)
    if cfg.random_init:
        config = _architecture(cfg, vocab_size=len(tokenizer))
        model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(cfg.hub_id, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
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
