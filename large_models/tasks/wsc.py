"""WSC (SuperGLUE wsc.fixed): the text, then whether the pronoun (lower-cased) refers to span 1;
label 0 "No", 1 "Yes"."""

from large_models.tasks.base import LabelTask
from lozo_exp.data import Row


class WSC(LabelTask):
    name = "wsc"
    words = ("No", "Yes")
    columns = {"text": str, "span1_text": str, "span2_text": str, "label": None}

    def prompt(self, row: Row) -> str:
        return (
            f"{row['text']}\nIn the previous sentence, does the pronoun "
            f'"{row["span2_text"].lower()}" refer to {row["span1_text"]}? Yes or No?\n'
        )


TASK = WSC()
