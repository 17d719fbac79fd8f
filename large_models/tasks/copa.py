"""COPA (SuperGLUE): the premise without its final period, then " so " (effect) or " because "
(cause), then a choice with its first word lower-cased unless it is "I". Multiple choice: trained
with the LM loss on the correct choice, evaluated by scoring both. Dev is 100 examples."""

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp.data import Row
from lozo_exp.datacheck import integer_label, show

CONJUNCTIONS = {"effect": " so", "cause": " because"}
CHOICES = ("choice1", "choice2")


def _lower_first_word(choice: str) -> str:
    first, *rest = choice.split(" ")
    return " ".join([first if first == "I" else first.lower(), *rest])


class COPA(CausalTask):
    name = "copa"
    objective = "lm"
    columns = {"premise": str, "choice1": str, "choice2": str, "question": str, "label": None}
    gold = "question is cause or effect; label is 0 (choice1) or 1 (choice2), or -1 for no gold"

    def check_row(self, row: Row) -> str | None:
        if row["question"] not in CONJUNCTIONS:
            return f"question {show(row['question'])} is not one of {', '.join(CONJUNCTIONS)}"
        return integer_label(row["label"], CHOICES)

    def render(self, row: Row) -> Prompted:
        premise = row["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        return Prompted(
            premise + CONJUNCTIONS[row["question"]],
            tuple(" " + _lower_first_word(row[c]) for c in CHOICES),
            int(row["label"]),
        )


TASK = COPA()
