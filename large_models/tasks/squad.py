"""SQuAD v1.1: `Title: ..\\nContext: ..\\nQuestion: ..\\nAnswer:`, answered by generation; F1/EM
take the best of the gold answers. `task.non_diff=true` trains on -F1 of greedy answers (ZO)."""

from large_models.tasks.base import GenerationTask
from lozo_exp.data import Row


class SQuAD(GenerationTask):
    name = "squad"
    columns = {"title": str, "context": str, "question": str, "answers": dict}
    answer_column, answer_field = "answers", "text"

    def prompt(self, row: Row) -> str:
        return (
            f"Title: {row['title']}\nContext: {row['context']}\n"
            f"Question: {row['question'].strip()}\nAnswer:"
        )


TASK = SQuAD()
