"""SST-2: `<s>{sentence} It was<mask>.</s>`, label words terrible (0) / great (1)."""

from medium_models.tasks.base import PromptTask


class SST2(PromptTask):
    name = "sst2"
    template = "*cls**sent_0*_It_was*mask*.*sep+*"
    label_words = {"0": "terrible", "1": "great"}
    archive = "SST-2"
    hub_text_columns = ("sentence",)
    hub_labels = ("0", "1")


TASK = SST2()
