"""ReCoRD (SuperGLUE): the passage with "@highlight\\n" turned into "- ", then "\\n- " and the
query with "@placeholder" replaced by each candidate entity. Trained with the LM loss on the first
answer; a prediction is correct if its entity is any of the answers."""

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp.data import Row
from lozo_exp.datacheck import NO_GOLD, show


class ReCoRD(CausalTask):
    name = "record"
    objective = "lm"
    columns = {"passage": str, "query": str, "entities": list, "answers": list}
    gold = "answers lists the entities that fill @placeholder (an empty list: no gold)"

    def check_row(self, row: Row) -> str | None:
        entities, answers = row["entities"], row["answers"]
        if not entities or not all(isinstance(e, str) for e in entities):
            return f"entities {show(entities)} is not a list of candidate texts"
        if not answers:
            return NO_GOLD
        if answers[0] not in entities:
            return f"its first answer {show(answers[0])} is not one of its entities"
        return None

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
