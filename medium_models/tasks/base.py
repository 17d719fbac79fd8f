"""How a masked-LM task presents an example: sentences placed into an LM-BFF template."""

from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar

from lozo_exp.data import Row


class PromptTask(ABC):
    """A prompt-based task: the label is read from the MLM logits of label words at <mask>."""

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    template: ClassVar[str]  # LM-BFF grammar, see medium_models.template
    label_words: ClassVar[dict[Any, str]]  # label value -> word (a leading space is added)
    text_columns: ClassVar[tuple[str, ...]]
    label_column: ClassVar[str] = "label"
    first_sent_limit: ClassVar[int | None] = None
    other_sent_limit: ClassVar[int | None] = None
    max_length: ClassVar[int] = 128

    def sentences(self, row: Row) -> list[str]:
        return [str(row[c]) for c in self.text_columns]

    def label(self, row: Row) -> Any:
        return row[self.label_column]
