"""LM-BFF's prompt-template grammar, as the published RoBERTa scripts write templates.

A template is a `*`-separated sequence of parts: `cls`, `bos`, `eos`, `mask`, `sep`, `sep+`
(special tokens); `sent_i` (sentence i); `+sent_i` (a space, then sentence i); `sent-_i`
(sentence i minus its last character); `sentl_i`, `+sentl_i`, `sentl-_i` (first letter
lower-cased); `sentu_i`, `+sentu_i`, `+sentu-_i` (first letter upper-cased); anything else is
literal text with `_` for a space. Each part is tokenised on its own and the ids concatenated,
as LM-BFF's `tokenize_multipart_input` does: a sentence part is cut to its limit in tokens
(`first_sent_limit` for sentence 0, `other_sent_limit` for the others), a one-character
literal is looked up as a single token, and the whole sequence is cut at the tail.
"""

from __future__ import annotations

import logging
import re

from lozo_exp.config import ConfigError

log = logging.getLogger(__name__)

# The sentence variants LM-BFF knows: (leading space, case change, drop the last character).
_SENT = re.compile(r"^(?P<space>\+?)sent(?P<case>[lu]?)(?P<cut>-?)_(?P<index>\d+)$")
_SENT_VARIANTS = {
    ("", "", ""),
    ("+", "", ""),
    ("", "", "-"),
    ("", "l", ""),
    ("+", "l", ""),
    ("", "l", "-"),
    ("", "u", ""),
    ("+", "u", ""),
    ("+", "u", "-"),
}


def _sentence_part(part: str) -> re.Match | None:
    match = _SENT.match(part)
    if match and (match["space"], match["case"], match["cut"]) in _SENT_VARIANTS:
        return match
    return None


def _render_sentence(match: re.Match, sentences: list[str]) -> str:
    text = sentences[int(match["index"])]
    if match["case"] == "l":
        text = text[:1].lower() + text[1:]
    elif match["case"] == "u":
        text = text[:1].upper() + text[1:]
    if match["cut"]:
        text = text[:-1]
    return (" " if match["space"] else "") + text


def encode_template(
    template: str,
    sentences: list[str],
    tokenizer,
    max_length: int,
    first_sent_limit: int | None = None,
    other_sent_limit: int | None = None,
) -> list[int]:
    """Token ids of one example rendered into the template (no padding)."""
    special = {
        "cls": tokenizer.cls_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
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
        elif match := _sentence_part(part):
            tokens = tokenizer.encode(_render_sentence(match, sentences), add_special_tokens=False)
            limit = first_sent_limit if match["index"] == "0" else other_sent_limit
            ids += tokens[:limit] if limit is not None else tokens
        else:
            text = part.replace("_", " ")
            if len(text) == 1:  # LM-BFF reads one character as one token, e.g. "." or "?"
                ids.append(tokenizer.convert_tokens_to_ids(text))
            else:
                ids += tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > max_length:
        if first_sent_limit is not None:
            log.warning("input exceeds max length %d even with the sentence limit", max_length)
        ids = ids[:max_length]  # LM-BFF truncates the tail
    if tokenizer.mask_token_id not in ids:
        raise ValueError(
            f"the <mask> of template {template!r} fell beyond max length "
            f"{max_length}: lower the sentence limit or raise the max length"
        )
    return ids


def label_word_ids(words: dict, tokenizer) -> dict:
    """Token id of each label word. As LM-BFF, a word gets a leading space (unless it starts
    with `<`, `[`, `.` or `,`) and must then be a single token of the tokenizer."""
    ids = {}
    for label, word in words.items():
        if word[:1] in ("<", "[", ".", ","):
            tokens = [tokenizer.convert_tokens_to_ids(word)]
        else:
            tokens = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ConfigError(
                f"label word {word!r} (label {label!r}) is {len(tokens)} tokens "
                f"for this tokenizer, but prompt-based fine-tuning needs one "
                f"token per label word; choose another word or tokenizer"
            )
        ids[label] = tokens[0]
    return ids
