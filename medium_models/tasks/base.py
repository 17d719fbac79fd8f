"""How a masked-LM task presents an example: sentences placed into an LM-BFF template.

Rows of a RoBERTa task always come from a k-shot split directory in the LM-BFF archive's
formats (see `medium_models.kshot`): `label` is the archive's label as text and the text
columns are named as in the archive (GLUE TSV header names, or `sentence` for the header-less
`label,sentence` CSVs). The `hub_*` attributes say how a hub dataset row maps onto that.
"""

from __future__ import annotations

import math
from typing import ClassVar

from lozo_exp.data import Row


class PromptTask:
    """A prompt-based task: the label is read from the MLM logits of label words at <mask>."""

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    template: ClassVar[str]  # LM-BFF grammar, see medium_models.template
    label_words: ClassVar[dict[str, str]]  # archive label -> word (a leading space is added)
    first_sent_limit: ClassVar[int | None] = None
    other_sent_limit: ClassVar[int | None] = None
    max_length: ClassVar[int] = 128
    # The LM-BFF archive: folder name, file format, text columns, and the evaluation files
    # (archive file stem -> this task's split name on the hub, see conf/task/<name>.yaml).
    archive: ClassVar[str]
    archive_format: ClassVar[str] = "tsv"  # "tsv" (GLUE style, label last) or "csv"
    text_columns: ClassVar[tuple[str, ...]] = ("sentence",)
    eval_splits: ClassVar[dict[str, str]] = {"dev": "validation"}
    # The hub dataset: text columns, label column, and archive label of each hub label index.
    hub_text_columns: ClassVar[tuple[str, ...]]
    hub_label_column: ClassVar[str] = "label"
    hub_labels: ClassVar[tuple[str, ...]]

    def sentences(self, row: Row) -> list[str]:
        """The text columns; a missing text (NaN in a CSV) is empty, as LM-BFF reads it."""
        return ["" if _missing(row[c]) else str(row[c]) for c in self.text_columns]

    def label(self, row: Row) -> str:
        return row["label"]

    def from_hub(self, row: Row) -> tuple[list[str], str] | None:
        """Texts and archive label of a hub row; None for a row without a gold label (-1)."""
        value = row[self.hub_label_column]
        if isinstance(value, str) and value in self.label_words:  # already an archive label
            label = value
        elif 0 <= int(value) < len(self.hub_labels):
            label = self.hub_labels[int(value)]
        else:
            return None
        return [str(row[c]) for c in self.hub_text_columns], label


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
