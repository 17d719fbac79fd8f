"""SST-2 (GLUE): `{sentence} It was` followed by " terrible" (0) or " great" (1)."""

from large_models.tasks.base import LabelTask
from lozo_exp.data import Row


class SST2(LabelTask):
    name = "sst2"
    words = (" terrible", " great")
    columns = {"sentence": str, "label": None}

    def prompt(self, row: Row) -> str:
        return f"{row['sentence'].strip()} It was"


TASK = SST2()
