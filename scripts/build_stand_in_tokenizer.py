"""Build `lozo_exp/assets/stand_in_tokenizer.json`, the offline tokenizer of the tiny models.

A byte-level BPE (any text encodes) with the special tokens of OPT and RoBERTa at their real
ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4), trained on the bundled samples plus the
label words of the paper's prompts, so each label word with a leading space is one token.
Run once from the repository root; the output is committed.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

LABEL_WORDS = [
    "terrible",
    "great",
    "bad",
    "okay",
    "good",
    "Yes",
    "No",
    "Maybe",
    "Description",
    "Entity",
    "Expression",
    "Human",
    "Location",
    "Number",
    "It",
    "was",
    "so",
    "because",
    "Question",
    "Answer",
    "Title",
    "Context",
    "Passage",
    "true",
    "correct",
]


def corpus() -> list[str]:
    lines = [" ".join(" " + w for w in LABEL_WORDS)] * 50
    for path in sorted(Path("lozo_exp/samples").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            lines += [v for v in json.loads(line).values() if isinstance(v, str)]
    return lines


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save("lozo_exp/assets/stand_in_tokenizer.json")
    print(f"vocab size {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
