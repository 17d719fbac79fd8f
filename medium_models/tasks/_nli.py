"""NLI as LM-BFF prompts it: `<s>{premise minus last char}?<mask>, {hypothesis, first letter
lower-cased}</s>`, with Yes / Maybe / No as label words (shared by SNLI, MNLI and RTE)."""

from medium_models.tasks.base import PromptTask


class NLITask(PromptTask):
    template = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
    label_words = {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}
    max_length = 256
    text_columns = ("sentence1", "sentence2")
    hub_text_columns = ("premise", "hypothesis")
    hub_labels = ("entailment", "neutral", "contradiction")
