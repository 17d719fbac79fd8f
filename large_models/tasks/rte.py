"""RTE (SuperGLUE): premise, then `Does this mean that "{hypothesis}" is true? Yes or No?`;
label 0 (entailment) -> "Yes", 1 (not_entailment) -> "No"."""

from large_models.tasks.base import LabelTask
from lozo_exp.data import Row


class RTE(LabelTask):
    name = "rte"
    words = ("Yes", "No")
    columns = {"premise": str, "hypothesis": str, "label": None}

    def prompt(self, row: Row) -> str:
        return f'{row["premise"]}\nDoes this mean that "{row["hypothesis"]}" is true? Yes or No?\n'


TASK = RTE()
