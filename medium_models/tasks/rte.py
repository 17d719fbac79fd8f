"""RTE: the NLI prompt with Yes (entailment) / No (not_entailment), max length 256, premise
cut to 240 tokens. The archive has GLUE's string labels; the hub's SuperGLUE RTE has
0 = entailment, 1 = not_entailment."""

from medium_models.tasks._nli import NLITask


class RTE(NLITask):
    name = "rte"
    label_words = {"not_entailment": "No", "entailment": "Yes"}
    first_sent_limit = 240
    archive = "RTE"
    hub_labels = ("entailment", "not_entailment")


TASK = RTE()
