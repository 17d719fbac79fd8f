"""CB (SuperGLUE): `Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?`;
label 0 (entailment) "Yes", 1 (contradiction) "No", 2 (neutral) "Maybe". Dev is 100 examples."""

from large_models.tasks.base import LabelTask
from lozo_exp.data import Row


class CB(LabelTask):
    name = "cb"
    words = ("Yes", "No", "Maybe")
    columns = {"premise": str, "hypothesis": str, "label": None}

    def prompt(self, row: Row) -> str:
        return (
            f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? '
            f"Yes, No, or Maybe?\n"
        )


TASK = CB()
