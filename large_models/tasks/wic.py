"""WiC (SuperGLUE): whether the word means the same in two sentences; label 0 "No", 1 "Yes"."""

from large_models.tasks.base import LabelTask
from lozo_exp.data import Row


class WiC(LabelTask):
    name = "wic"
    words = ("No", "Yes")
    columns = {"word": str, "sentence1": str, "sentence2": str, "label": None}

    def prompt(self, row: Row) -> str:
        return (
            f'Does the word "{row["word"]}" have the same meaning in these two sentences? '
            f"Yes, No?\n{row['sentence1']}\n{row['sentence2']}\n"
        )


TASK = WiC()
