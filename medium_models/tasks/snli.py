"""SNLI (LM-BFF's GLUE-style TSV): the NLI prompt, max length 256, no sentence limit."""

from medium_models.tasks._nli import NLITask


class SNLI(NLITask):
    name = "snli"
    archive = "SNLI"


TASK = SNLI()
