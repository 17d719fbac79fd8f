"""DROP: `Passage: ..\\nQuestion: ..\\nAnswer:`, answered by generation; golds are the answer
spans."""

from large_models.tasks.base import GenerationTask
from lozo_exp.data import Row


class DROP(GenerationTask):
    name = "drop"

    def prompt(self, row: Row) -> str:
        return f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"

    def answers(self, row: Row) -> list[str]:
        return list(row["answers_spans"]["spans"])


TASK = DROP()
