"""LoRA through `peft`: the keys and the model wrapping shared by MeZO-LoRA and FT-LoRA."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from omegaconf import MISSING
from torch import nn

from lozo_exp.config import ConfigError, MethodConfig, RunConfig, choices, failing
from lozo_exp.methods.base import Method

log = logging.getLogger(__name__)


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA adapters (dropout 0, as published) on `target_modules`; `modules_to_save` train in
    full next to them (peft's copy of the module). Both default to the model's (the yaml
    interpolates `model.lora_targets` and `model.lora_modules_to_save`): the attention q and v
    projections, and RoBERTa's LM head, which the published RoBERTa code trains too."""

    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: list[str] = MISSING
    modules_to_save: list[str] = MISSING

    def check(self, run: RunConfig) -> list[str]:
        return super().check(run) + failing(
            [
                (self.lora_r >= 1, f"method.lora_r={self.lora_r} must be a positive integer"),
                (self.lora_alpha > 0, f"method.lora_alpha={self.lora_alpha} must be > 0"),
                (bool(self.target_modules), "method.target_modules must name at least one module"),
            ]
        )


def _matches(name: str, module: str) -> bool:
    """peft's rule for a module named in a list: the full name, or its last dotted parts."""
    return module == name or module.endswith("." + name)


def module_problems(cfg: LoRAConfig, modules: dict[str, type[nn.Module]], model: str) -> list[str]:
    """What is wrong with `cfg`'s module names for a model of `modules` (full name: class).
    peft fails only when no target matches, and skips a module to save that matches nothing,
    which would train the adapters alone without a word."""
    leaves = dict.fromkeys(leaf for n in modules if not (leaf := n.rsplit(".", 1)[-1]).isdigit())
    linear = dict.fromkeys(n.rsplit(".", 1)[-1] for n, t in modules.items() if t is nn.Linear)
    unmatched = [x for x in cfg.target_modules if not any(_matches(x, m) for m in modules)]
    bad = []
    if unmatched == list(cfg.target_modules):
        bad.append(
            f"method.target_modules={unmatched} names no module of model {model}; LoRA adapts "
            f"its Linear modules: {choices(linear)}"
        )
    elif unmatched:  # a list for several architectures (model=local) names some that are absent
        log.warning("LoRA: %s name no module of model %s", ", ".join(unmatched), model)
    bad += [
        f"method.modules_to_save: {x!r} is not a module of model {model} (peft would skip it "
        f"and train the adapters alone); its modules are named: {choices(leaves)}"
        for x in cfg.modules_to_save
        if not any(_matches(x, m) for m in modules)
    ]
    return bad


class LoRAMethod(Method):
    """Wraps the model with peft's LoRA before the method's own preparation."""

    def __init__(self, run: RunConfig):
        super().__init__(run)
        if run.model.family is not None:  # the runner builds the method for a resolved model
            from lozo_exp.models import module_types

            # a meta-device build: a name the model lacks fails before its weights load
            if bad := module_problems(self.cfg, module_types(run.model), run.model.name):
                raise ConfigError("Invalid configuration: " + "; ".join(bad) + ".")

    def memory_floor(self, n_params: int, bytes_per_param: int) -> tuple[int, str]:
        return n_params * bytes_per_param, "the frozen weights"  # the adapters are tiny

    def prepare_model(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg: LoRAConfig = self.cfg
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(cfg.target_modules),
            modules_to_save=list(cfg.modules_to_save) or None,
        )
        with warnings.catch_warnings():
            # A module to save that is tied to the input embeddings (RoBERTa's LM head) trains
            # as an untied copy, as in the published code, whose head is untied: no warning.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            model = get_peft_model(model, lora)
        if cfg.modules_to_save:
            log.info("LoRA: %s also train in full", ", ".join(cfg.modules_to_save))
        return super().prepare_model(model)
