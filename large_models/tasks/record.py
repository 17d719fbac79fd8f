"""ReCoRD (SuperGLUE): the passage with "@highlight\\n" turned into "- ", then "\\n- " and the
query with "@placeholder" replaced by each candidate entity. Trained with the LM loss on the first
answer; a prediction is correct if its entity is any of the answers."""

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp.data import Row


class ReCoRD(CausalTask):
    name = "record"
    objective = "lm"

    def render(self, row: Row) -> Prompted:
        entities, answers = list(row["entities"]), list(row["answers"])
        query = row["query"]
        return Prompted(
            row["passage"].replace("@highlight\n", "- ") + "\n-",
            tuple(" " + query.replace("@placeholder", e) for e in entities),
            entities.index(answers[0]),
            correct=tuple(i for i, e in enumerate(entities) if e in answers),
        )


TASK = ReCoRD()
