"""SST-5: `<s>{sentence} It was<mask>.</s>` with five label words; sentence cut to 110 tokens."""

from medium_models.tasks.base import PromptTask


class SST5(PromptTask):
    name = "sst5"
    template = "*cls**sent_0*_It_was*mask*.*sep+*"
    label_words = {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}
    first_sent_limit = 110
    other_sent_limit = 20  # only reaches demonstrations, which this suite does not use
    archive = "sst-5"
    archive_format = "csv"
    eval_splits = {"test": "test"}  # LM-BFF tests on the original SST-5 test set
    hub_text_columns = ("text",)
    hub_labels = ("0", "1", "2", "3", "4")


TASK = SST5()
