"""TREC (coarse): `<s><mask>: {question}</s>`, question cut to 110 tokens.

LM-BFF's archive numbers the classes 0 DESC, 1 ENTY, 2 ABBR, 3 HUM, 4 LOC, 5 NUM (label
words Description, Entity, Expression, Human, Location, Number); the hub's `coarse_label`
numbers them ABBR, ENTY, DESC, HUM, LOC, NUM.
"""

from medium_models.tasks.base import PromptTask


class TREC(PromptTask):
    name = "trec"
    template = "*cls**mask*:*+sent_0**sep+*"
    label_words = {
        "0": "Description",
        "1": "Entity",
        "2": "Expression",
        "3": "Human",
        "4": "Location",
        "5": "Number",
    }
    first_sent_limit = 110
    archive = "trec"
    archive_format = "csv"
    eval_splits = {"test": "test"}
    hub_text_columns = ("text",)
    hub_label_column = "coarse_label"
    hub_labels = ("2", "1", "0", "3", "4", "5")  # ABBR, ENTY, DESC, HUM, LOC, NUM


TASK = TREC()
