"""Backprop methods: FT (all parameters) and FT-LoRA, with AdamW as HF Trainer runs it: linear
warmup/decay, gradient-norm clipping and mixed precision (autocast over float32 master weights,
a loss scaler for fp16). Across processes (torchrun), FSDP2 shards the model
(`lozo_exp.distributed.fully_shard_model`): weights are gathered in the autocast dtype and
gradients reduced in float32 into the float32 shards, under the same autocast."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lozo_exp import distributed
from lozo_exp.config import RunConfig, failing
from lozo_exp.methods.base import LossFn, Method, TrainingConfig, lr_factor, register
from lozo_exp.methods.lora import LoRAConfig, LoRAMethod
from lozo_exp.optim import default_param_groups

log = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FTConfig(TrainingConfig):
    name: str = "ft"
    backprop: ClassVar[bool] = True
    lr: float = 1e-5
    batch_size: int = 8
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's
    adam_eps: float = 1e-8
    warmup_steps: int = 0  # lr rises linearly from 0 over these steps

    def check(self, run: RunConfig) -> list[str]:
        amp = run.trainer.amp
        return super().check(run) + failing(
            [
                (
                    len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    f"method.betas={list(self.betas)} must be two numbers in [0, 1)",
                ),
                (self.adam_eps > 0, f"method.adam_eps={self.adam_eps} must be > 0"),
                (self.warmup_steps >= 0, f"method.warmup_steps={self.warmup_steps} must be >= 0"),
                (
                    amp == "off" or run.model.dtype == "float32",
                    f"trainer.amp={amp} keeps float32 master weights: it needs "
                    f"model.dtype=float32, got {run.model.dtype!r}",
                ),
            ]
        )


@dataclass
class FTLoRAConfig(LoRAConfig, FTConfig):
    name: str = "ft-lora"
    lr: float = 1e-4


@register
class FTMethod(Method):
    config = FTConfig

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model.train()  # dropout on, as HF Trainer trains
        return model

    def memory_floor(self, n_params: int, bytes_per_param: int) -> tuple[int, str]:
        what = "the weights, their gradients and AdamW's two moments"
        return _per_process(4 * n_params * bytes_per_param, what, n_params * bytes_per_param)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Across processes, FSDP shards the model (fp16/bf16 compute over float32 shards)."""
        model = super().parallelize(model)
        if distributed.world_size() == 1:
            return model
        return distributed.fully_shard_model(model, AMP_DTYPES.get(self.run.trainer.amp))

    def build_optimizer(self, model: nn.Module, seed: int) -> torch.optim.Optimizer:
        c, amp = self.cfg, self.run.trainer.amp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device_type = self.params[0].device.type
        self.amp_dtype = AMP_DTYPES.get(amp)
        if amp == "fp16" and self.device_type == "cpu":
            log.warning("trainer.amp=fp16 on a CPU: fp16 autocast is slow there (bf16 is faster)")
        self.scaler = distributed.grad_scaler(self.device_type, enabled=amp == "fp16")
        groups = default_param_groups(model.named_parameters(), c.weight_decay)
        return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps)

    def learning_rate(self, step: int, total_steps: int) -> float:
        factor = lr_factor(self.run.trainer.lr_schedule, step, total_steps, self.cfg.warmup_steps)
        return self.cfg.lr * factor

    def step(
        self, optimizer: torch.optim.Optimizer, loss_fn: LossFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        optimizer.zero_grad(set_to_none=True)
        amp = self.amp_dtype is not None
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=amp):
            loss = loss_fn()
        self.scaler.scale(loss).backward()
        record = {}
        max_norm = self.run.trainer.max_grad_norm
        if max_norm is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients
            norm = distributed.clip_grad_norm_(self.params, max_norm)
            record["grad_norm"] = float(norm)  # before clipping; inf: fp16 step skipped
        self.scaler.step(optimizer)  # skipped when an fp16 gradient overflowed
        self.scaler.update()
        return loss.detach(), record

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


@register
class FTLoRAMethod(LoRAMethod, FTMethod):
    config = FTLoRAConfig


def _per_process(need: int, what: str, weights: int) -> tuple[int, str]:
    """A memory floor on each GPU: across processes FSDP splits it evenly, but each process
    first loads the whole model (`weights` bytes) and only then shards it."""
    world = distributed.world_size()
    if world == 1:
        return need, what
    if need // world < weights:
        return weights, f"the whole weights, which each of the {world} processes loads first"
    return need // world, f"{what}, split across {world} processes"
