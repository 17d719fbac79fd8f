"""Evaluation-only methods: zero-shot and in-context learning (ICL)."""

from __future__ import annotations

from dataclasses import dataclass

from lozo_exp.config import MethodConfig, RunConfig, failing
from lozo_exp.methods.base import Method, register


@dataclass
class ZeroShotConfig(MethodConfig):
    name: str = "zero-shot"


@dataclass
class ICLConfig(MethodConfig):
    """Each prompt is preceded by `num_demos` solved examples from the training sample, joined
    by a blank line (causal models)."""

    name: str = "icl"
    num_demos: int = 32

    def check(self, run: RunConfig) -> list[str]:
        return super().check(run) + failing(
            [
                (self.num_demos >= 0, f"method.num_demos={self.num_demos} must be >= 0"),
                (
                    run.model.family == "causal",
                    f"method.name=icl (in-context learning) needs a causal model; model.family "
                    f"is {run.model.family!r}",
                ),
            ]
        )


@register
class ZeroShotMethod(Method):
    config = ZeroShotConfig
    trains = False


@register
class ICLMethod(Method):
    config = ICLConfig
    trains = False
