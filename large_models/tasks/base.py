"""How a causal-LM task presents an example: a context and the options scored after it.

The templates are those of the published MeZO/LOZO OPT code (`large_models/templates.py`): a
classification task has one option per label word, a multiple-choice task one per choice, and a
generation task one option, the gold answer (the language-modelling target), plus every gold
answer for F1/EM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from lozo_exp.data import Row


@dataclass(frozen=True)
class Prompted:
    """One example rendered for a causal LM.

    `options` are continuations of `context`: the candidates of a classification task, or the
    gold continuation of a language-modelling task. `label` indexes the option trained on (and
    the demonstration's answer in ICL); `correct` lists every option counted as correct (ReCoRD
    accepts any answer entity; default: just `label`); `answers` are a generation task's golds.
    """

    context: str
    options: tuple[str, ...]
    label: int = 0
    correct: tuple[int, ...] = ()
    answers: tuple[str, ...] = ()

    def is_correct(self, option: int) -> bool:
        return option in (self.correct or (self.label,))


class CausalTask(ABC):
    """A task for causal LMs: data columns in, `Prompted` out, and the metric it reports."""

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    # "classification": cross-entropy over options of the mean option log-probability;
    # "lm": language-modelling loss on the correct option's tokens.
    objective: ClassVar[str] = "classification"
    # Evaluated by greedy generation and F1/EM instead of by scoring the options.
    generation: ClassVar[bool] = False

    @abstractmethod
    def render(self, row: Row) -> Prompted:
        """The example as context and options, in the published template."""


class LabelTask(CausalTask):
    """Classification with one label word per class, appended directly after the prompt."""

    words: ClassVar[tuple[str, ...]]  # label word of class 0, 1, ...

    @abstractmethod
    def prompt(self, row: Row) -> str:
        """The prompt the label word follows."""

    def label(self, row: Row) -> int:
        return int(row["label"])

    def render(self, row: Row) -> Prompted:
        return Prompted(self.prompt(row), self.words, self.label(row))


class GenerationTask(CausalTask):
    """Question answering by generation: trained on " {first gold answer}\\n" after the prompt,
    evaluated by F1 (the number the paper reports) and EM of the greedy answer."""

    metric = "f1"
    objective = "lm"
    generation = True

    @abstractmethod
    def prompt(self, row: Row) -> str:
        """The prompt, ending in "Answer:"."""

    @abstractmethod
    def answers(self, row: Row) -> list[str]:
        """The gold answers (the first is the training target)."""

    def render(self, row: Row) -> Prompted:
        golds = tuple(self.answers(row))
        return Prompted(self.prompt(row), (f" {golds[0]}\n",), 0, answers=golds)
