"""COPA (SuperGLUE): the premise without its final period, then " so " (effect) or " because "
(cause), then a choice with its first word lower-cased unless it is "I". Multiple choice: trained
with the LM loss on the correct choice, evaluated by scoring both. Dev is 100 examples."""

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp.data import Row

CONJUNCTIONS = {"effect": " so", "cause": " because"}


def _lower_first_word(choice: str) -> str:
    first, *rest = choice.split(" ")
    return " ".join([first if first == "I" else first.lower(), *rest])


class COPA(CausalTask):
    name = "copa"
    objective = "lm"

    def render(self, row: Row) -> Prompted:
        premise = row["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        choices = (row["choice1"], row["choice2"])
        return Prompted(
            premise + CONJUNCTIONS[row["question"]],
            tuple(" " + _lower_first_word(c) for c in choices),
            int(row["label"]),
        )


TASK = COPA()
