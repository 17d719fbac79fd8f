"""SQuAD v1.1: `Title: ..\\nContext: ..\\nQuestion: ..\\nAnswer:`, answered by generation; F1/EM
take the best of the gold answers. `task.non_diff=true` trains on -F1 of greedy answers (ZO)."""

from large_models.tasks.base import GenerationTask
from lozo_exp.data import Row


class SQuAD(GenerationTask):
    name = "squad"

    def prompt(self, row: Row) -> str:
        return (
            f"Title: {row['title']}\nContext: {row['context']}\n"
            f"Question: {row['question'].strip()}\nAnswer:"
        )

    def answers(self, row: Row) -> list[str]:
        return list(row["answers"]["text"])


TASK = SQuAD()
