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
from lozo_exp.datacheck import NO_GOLD, Schema, integer_label, label_set, show


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
    # The columns `render` reads (the hub dataset's) and the type of their values; None: the
    # gold, checked by `check_row` (README "Your own data" lists them).
    columns: ClassVar[dict[str, type | None]]

    @abstractmethod
    def render(self, row: Row) -> Prompted:
        """The example as context and options, in the published template."""

    @abstractmethod
    def check_row(self, row: Row) -> str | None:
        """What is wrong with the row's values beyond their types (NO_GOLD: it has no gold)."""

    @property
    @abstractmethod
    def gold(self) -> str:
        """What a valid gold answer is, in words."""

    @property
    def schema(self) -> Schema:
        return Schema(f"{self.name} (causal)", self.columns, self.check_row, self.gold)


class LabelTask(CausalTask):
    """Classification with one label word per class, appended directly after the prompt."""

    words: ClassVar[tuple[str, ...]]  # label word of class 0, 1, ...

    @abstractmethod
    def prompt(self, row: Row) -> str:
        """The prompt the label word follows."""

    def label(self, row: Row) -> int:
        return int(row["label"])

    def check_row(self, row: Row) -> str | None:
        return integer_label(row["label"], self.words)

    @property
    def gold(self) -> str:
        return f"label is one of {label_set(self.words)}, or -1 for no gold"

    def render(self, row: Row) -> Prompted:
        return Prompted(self.prompt(row), self.words, self.label(row))


class GenerationTask(CausalTask):
    """Question answering by generation: trained on " {first gold answer}\\n" after the prompt,
    evaluated by F1 (the number the paper reports) and EM of the greedy answer."""

    metric = "f1"
    objective = "lm"
    generation = True
    # The gold answers: the list `answer_field` of the object column `answer_column`.
    answer_column: ClassVar[str]
    answer_field: ClassVar[str]

    @abstractmethod
    def prompt(self, row: Row) -> str:
        """The prompt, ending in "Answer:"."""

    def answers(self, row: Row) -> list[str]:
        """The gold answers (the first is the training target)."""
        return list(row[self.answer_column][self.answer_field])

    def check_row(self, row: Row) -> str | None:
        golds = row[self.answer_column].get(self.answer_field)
        if not isinstance(golds, list) or not all(isinstance(g, str) for g in golds):
            field = f"{self.answer_column}[{self.answer_field!r}]"
            return f"{field} {show(golds)} is not a list of texts"
        return None if golds else NO_GOLD

    @property
    def gold(self) -> str:
        return (
            f"{self.answer_column} is an object whose {self.answer_field!r} lists the gold "
            f"answers (an empty list: no gold)"
        )

    def render(self, row: Row) -> Prompted:
        golds = tuple(self.answers(row))
        return Prompted(self.prompt(row), (f" {golds[0]}\n",), 0, answers=golds)
