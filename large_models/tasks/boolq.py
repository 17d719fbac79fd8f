"""BoolQ: `{passage} {Question?}` and a newline (the published template version 3, its default),
then "Yes" (answer true) or "No"."""

from large_models.tasks.base import LabelTask
from lozo_exp.data import Row


class BoolQ(LabelTask):
    name = "boolq"
    words = ("Yes", "No")
    columns = {"question": str, "passage": str, "answer": bool}
    gold = "answer is true or false"

    def prompt(self, row: Row) -> str:
        question = row["question"]
        if not question.endswith("?"):
            question += "?"
        return f"{row['passage']} {question[0].upper() + question[1:]}\n"

    def label(self, row: Row) -> int:
        return 0 if row["answer"] else 1

    def check_row(self, row: Row) -> str | None:
        return None  # the column's type says it all


TASK = BoolQ()
