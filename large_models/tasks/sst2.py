"""SST-2 (GLUE): `{sentence} It was` followed by " terrible" (0) or " great" (1)."""

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp.data import Row


class SST2(CausalTask):
    name = "sst2"

    def render(self, row: Row) -> Prompted:
        return Prompted(
            f"{row['sentence'].strip()} It was", (" terrible", " great"), int(row["label"])
        )


TASK = SST2()
