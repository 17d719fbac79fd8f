"""LoRA through `peft`: the keys and the model wrapping shared by MeZO-LoRA and FT-LoRA."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from omegaconf import MISSING
from torch import nn

from lozo_exp.config import MethodConfig, RunConfig, failing
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


class LoRAMethod(Method):
    """Wraps the model with peft's LoRA before the method's own preparation."""

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
