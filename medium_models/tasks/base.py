"""How a masked-LM task presents an example: sentences placed into an LM-BFF template.

Rows of a RoBERTa task always come from a k-shot split directory in the LM-BFF archive's
formats (see `medium_models.kshot`): `label` is the archive's label as text and the text
columns are named as in the archive (GLUE TSV header names, or `sentence` for the header-less
`label,sentence` CSVs). The `hub_*` attributes say how a hub dataset row maps onto that.
"""

from __future__ import annotations

from typing import ClassVar

from lozo_exp.data import Row
from lozo_exp.datacheck import NO_GOLD, Schema, show


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
        return [row[c] for c in self.text_columns]

    def label(self, row: Row) -> str:
        return row["label"]

    @property
    def archive_schema(self) -> Schema:
        """Rows of the LM-BFF archive's files and of k-shot split files."""
        labels = ", ".join(map(repr, self.label_words))

        def check(row: Row) -> str | None:
            if row["label"] not in self.label_words:
                return f"label {show(row['label'])} is not one of {labels}"
            return None

        columns = {**dict.fromkeys(self.text_columns, str), "label": None}
        return Schema(f"{self.name} (LM-BFF format)", columns, check, f"label is one of {labels}")

    @property
    def hub_schema(self) -> Schema:
        """Rows of the hub dataset (or `task.data_files` in its columns): the label is the hub's
        class number, or the archive's label text."""
        column = self.hub_label_column
        numbers = ", ".join(f"{i} ({self.label_words[a]})" for i, a in enumerate(self.hub_labels))
        texts = ", ".join(map(repr, self.label_words))

        def check(row: Row) -> str | None:
            value = row[column]
            if isinstance(value, str) and value in self.label_words:
                return None
            if value == -1 and type(value) is int:
                return NO_GOLD
            if type(value) is not int or not 0 <= value < len(self.hub_labels):
                return f"{column} {show(value)} is not one of {numbers}, nor of {texts}"
            return None

        columns = {**dict.fromkeys(self.hub_text_columns, str), column: None}
        gold = f"{column} is one of {numbers}, or of {texts}, or -1 for no gold"
        return Schema(f"{self.name} (masked)", columns, check, gold)

    def from_hub(self, row: Row) -> tuple[list[str], str]:
        """Texts and archive label of a hub row with a gold label (checked by `hub_schema`)."""
        value = row[self.hub_label_column]
        label = value if isinstance(value, str) else self.hub_labels[value]
        return [row[c] for c in self.hub_text_columns], label
