"""MNLI: the NLI prompt, max length 256, premise cut to 240 tokens; two test sets (the
original matched and mismatched dev sets)."""

from medium_models.tasks._nli import NLITask


class MNLI(NLITask):
    name = "mnli"
    first_sent_limit = 240
    archive = "MNLI"
    eval_splits = {
        "dev_matched": "validation_matched",
        "dev_mismatched": "validation_mismatched",
    }


TASK = MNLI()
