"""How a causal-LM task presents an example: a context and the options scored after it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from lozo_exp.data import Row


@dataclass(frozen=True)
class Prompted:
    """One example rendered for a causal LM.

    `options` are continuations of `context`: the candidates of a classification task, or the
    gold continuation of a language-modelling task. `label` indexes the correct option.
    """

    context: str
    options: tuple[str, ...]
    label: int = 0


class CausalTask(ABC):
    """A task for causal LMs: data columns in, `Prompted` out, and the metric it reports."""

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    # "classification": cross-entropy over options of the mean option log-probability;
    # "lm": language-modelling loss on the correct option's tokens.
    objective: ClassVar[str] = "classification"

    @abstractmethod
    def render(self, row: Row) -> Prompted:
        """The example as context and options, in the published template."""
