"""LM-BFF's prompt-template grammar, as the published RoBERTa scripts write templates.

A template is a sequence of `*part*` items: `cls`, `mask`, `sep`/`sep+` (special tokens),
`sent_i` (sentence i), `sent-_i` (sentence i minus its last character), `+sent_i` (a space,
then sentence i), `sentl_i`/`+sentl_i` (first letter lower-cased), `sentu_i`/`+sentu_i`
(first letter upper-cased); anything else is literal text with `_` for a space. Each part is
tokenised on its own and the ids are concatenated, as LM-BFF does.
"""

from __future__ import annotations

import re

from lozo_exp.config import ConfigError

_SENT = re.compile(r"^(\+?)sent(-|l|u)?_(\d+)$")


def _sentence_text(part: str, sentences: list[str]) -> tuple[int, str]:
    space, variant, index = _SENT.match(part).groups()
    text = sentences[int(index)]
    if variant == "-":
        text = text[:-1]
    elif variant == "l" and text:
        text = text[0].lower() + text[1:]
    elif variant == "u" and text:
        text = text[0].upper() + text[1:]
    return int(index), (" " if space else "") + text


def encode_template(
    template: str,
    sentences: list[str],
    tokenizer,
    max_length: int,
    first_sent_limit: int | None = None,
    other_sent_limit: int | None = None,
) -> list[int]:
    """Token ids of the rendered template; sentence i is cut to its limit in tokens."""
    special = {
        "cls": tokenizer.cls_token_id,
        "mask": tokenizer.mask_token_id,
        "sep": tokenizer.sep_token_id,
        "sep+": tokenizer.sep_token_id,
    }
    ids: list[int] = []
    for part in template.split("*"):
        if not part:
            continue
        if part in special:
            ids.append(special[part])
        elif _SENT.match(part):
            index, text = _sentence_text(part, sentences)
            tokens = tokenizer.encode(text, add_special_tokens=False)
            limit = first_sent_limit if index == 0 else other_sent_limit
            ids += tokens[:limit] if limit is not None else tokens
        else:
            ids += tokenizer.encode(part.replace("_", " "), add_special_tokens=False)
    ids = ids[:max_length]  # LM-BFF truncates the tail
    if tokenizer.mask_token_id not in ids:
        raise ValueError(
            f"the <mask> of template {template!r} fell beyond max length "
            f"{max_length}: lower the sentence limit or raise the max length"
        )
    return ids


def label_word_ids(words: dict, tokenizer) -> dict:
    """Each label word, with its leading space, must be a single token of the tokenizer."""
    ids = {}
    for label, word in words.items():
        tokens = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ConfigError(
                f"label word {word!r} (label {label!r}) is {len(tokens)} tokens "
                f"for this tokenizer, but prompt-based fine-tuning needs one "
                f"token per label word; choose another word or tokenizer"
            )
        ids[label] = tokens[0]
    return ids
