"""MultiRC (SuperGLUE): one row per (paragraph, question, candidate answer); whether the answer
is correct, label 0 "No", 1 "Yes"."""

from large_models.tasks.base import LabelTask
from lozo_exp.data import Row


class MultiRC(LabelTask):
    name = "multirc"
    words = ("No", "Yes")
    columns = {"paragraph": str, "question": str, "answer": str, "label": None}

    def prompt(self, row: Row) -> str:
        return (
            f"{row['paragraph']}\nQuestion: {row['question']}\nI found this answer "
            f'"{row["answer"]}". Is that correct? Yes or No?\n'
        )


TASK = MultiRC()
