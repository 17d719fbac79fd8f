"""DROP: `Passage: ..\\nQuestion: ..\\nAnswer:`, answered by generation; golds are the answer
spans."""

from large_models.tasks.base import GenerationTask
from lozo_exp.data import Row


class DROP(GenerationTask):
    name = "drop"
    columns = {"passage": str, "question": str, "answers_spans": dict}
    answer_column, answer_field = "answers_spans", "spans"

    def prompt(self, row: Row) -> str:
        return f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"


TASK = DROP()
