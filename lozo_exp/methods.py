"""A method is a choice of trainable parameters (all, or LoRA's via `peft`) plus an optimizer:
a zeroth-order one from `lozo_exp.optim`, AdamW with backprop for FT, none for zero-shot and ICL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lozo_exp.adapter import Adapter, Batch
from lozo_exp.config import EVAL_METHODS, ZO_METHODS, MethodConfig, ModelConfig
from lozo_exp.optim import (
    LOZO,
    LOZOM,
    FastEngine,
    MeZO,
    ZeroOrderOptimizer,
    default_param_groups,
)


def uses_lora(method: MethodConfig) -> bool:
    return method.name.endswith("-lora")


def is_zeroth_order(method: MethodConfig) -> bool:
    return method.name in ZO_METHODS


def prepare_model(model: nn.Module, method: MethodConfig, model_cfg: ModelConfig) -> nn.Module:
    """Wrap with LoRA adapters (only they train) for the -lora methods; eval mode for ZO."""
    if uses_lora(method):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=method.lora_r,
            lora_alpha=method.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(model_cfg.lora_targets),
        )
        model = get_peft_model(model, lora)
    model.train(not is_zeroth_order(method) and method.name not in EVAL_METHODS)
    return model


def build_optimizer(
    model: nn.Module, method: MethodConfig, seed: int
) -> torch.optim.Optimizer | None:
    if method.name in EVAL_METHODS:
        return None
    groups = default_param_groups(model.named_parameters(), method.weight_decay)
    if not is_zeroth_order(method):
        return torch.optim.AdamW(groups, lr=method.lr)
    common = dict(lr=method.lr, eps=method.eps, weight_decay=method.weight_decay, seed=seed)
    if method.name == "lozo":
        opt = LOZO(groups, rank=method.rank, interval=method.interval, **common)
    elif method.name == "lozo-m":
        opt = LOZOM(groups, rank=method.rank, interval=method.interval, beta=method.beta, **common)
    else:
        opt = MeZO(groups, **common)
    if method.engine == "fast":
        opt.use_engine(FastEngine(opt, model))
    return opt


def set_learning_rate(
    optimizer: torch.optim.Optimizer, lr: float, schedule: str, step: int, max_steps: int
) -> None:
    """The lr of `step` as a pure function of it (so a resumed run needs no scheduler state)."""
    factor = 1.0 if schedule == "constant" else max(0.0, 1 - step / max(1, max_steps))
    for group in optimizer.param_groups:
        group["lr"] = lr * factor


def make_closure(
    optimizer: torch.optim.Optimizer, adapter: Adapter, batch: Batch
) -> Callable[[], torch.Tensor]:
    """The loss at the current parameters: forward only for ZO, forward + backward for FT."""
    if isinstance(optimizer, ZeroOrderOptimizer):

        def closure() -> torch.Tensor:
            with torch.inference_mode():
                return adapter.loss(batch)
    else:

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = adapter.loss(batch)
            loss.backward()
            return loss

    return closure
