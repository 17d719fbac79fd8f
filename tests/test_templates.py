"""The six LM-BFF templates render fixed examples to the token sequences the published
scripts produce (checked as text and as ids) on a RoBERTa-style tokenizer."""

from __future__ import annotations

import pytest

from lozo_exp.adapter import load_task
from lozo_exp.config import ConfigError
from lozo_exp.models import stand_in_tokenizer
from medium_models.template import encode_template, label_word_ids

TOK = stand_in_tokenizer("masked")
CLS, MASK, SEP = TOK.cls_token_id, TOK.mask_token_id, TOK.sep_token_id


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def render(name: str, row: dict) -> list[int]:
    task = load_task("masked", name)
    limits = (task.first_sent_limit, task.other_sent_limit)
    return encode_template(task.template, task.sentences(row), TOK, task.max_length, *limits)


NLI_ROW = {"sentence1": "A man plays a guitar.", "sentence2": "Someone makes music.", "label": "x"}
CASES = {
    "sst2": (
        {"sentence": "a gorgeous , witty movie . ", "label": "1"},
        "<s>a gorgeous , witty movie .  It was<mask>.</s>",
        [CLS, *enc("a gorgeous , witty movie . "), *enc(" It was"), MASK, *enc("."), SEP],
    ),
    "sst5": (
        {"sentence": "a stirring , funny film .", "label": "3"},
        "<s>a stirring , funny film . It was<mask>.</s>",
        [CLS, *enc("a stirring , funny film ."), *enc(" It was"), MASK, *enc("."), SEP],
    ),
    "trec": (
        {"sentence": "What does NASA stand for ?", "label": "2"},
        "<s><mask>: What does NASA stand for ?</s>",
        [CLS, MASK, *enc(":"), *enc(" What does NASA stand for ?"), SEP],
    ),
}
for _name in ("snli", "mnli", "rte"):
    CASES[_name] = (
        NLI_ROW,
        "<s>A man plays a guitar?<mask>, someone makes music.</s>",
        [
            *(CLS, *enc("A man plays a guitar"), *enc("?"), MASK, *enc(",")),
            *(*enc(" someone makes music."), SEP),
        ],
    )


@pytest.mark.parametrize("name", list(CASES))
def test_template_renders_the_published_sequence(name):
    row, text, ids = CASES[name]
    got = render(name, row)
    assert TOK.decode(got) == text
    assert got == ids
    assert got[0] == 0 and got[-1] == 2  # RoBERTa's <s> and </s>


def test_label_words_and_limits_as_in_the_scripts():
    words = {n: load_task("masked", n).label_words for n in CASES}
    assert words["sst2"] == {"0": "terrible", "1": "great"}
    assert list(words["sst5"].values()) == ["terrible", "bad", "okay", "good", "great"]
    assert (
        words["snli"]
        == words["mnli"]
        == {
            "contradiction": "No",
            "entailment": "Yes",
            "neutral": "Maybe",
        }
    )
    assert words["rte"] == {"not_entailment": "No", "entailment": "Yes"}
    assert list(words["trec"].values()) == [
        *("Description", "Entity", "Expression", "Human", "Location", "Number")
    ]
    limits = {
        n: (t.first_sent_limit, t.max_length) for n in CASES for t in [load_task("masked", n)]
    }
    assert limits == {
        "sst2": (None, 128),
        "sst5": (110, 128),
        "trec": (110, 128),
        "snli": (None, 256),
        "mnli": (240, 256),
        "rte": (240, 256),
    }
    for name, task_words in words.items():  # one token each on a RoBERTa-style tokenizer
        assert len(set(label_word_ids(task_words, TOK).values())) == len(task_words), name


def test_sentence_limits_cut_the_sentence_part():
    long = " ".join(["word"] * 300)
    sst5 = render("sst5", {"sentence": long, "label": "0"})
    assert sst5 == [CLS, *enc(long)[:110], *enc(" It was"), MASK, *enc("."), SEP]
    trec = render("trec", {"sentence": long, "label": "0"})
    assert trec == [CLS, MASK, *enc(":"), *enc(" " + long)[:110], SEP]
    mnli = render("mnli", {**NLI_ROW, "sentence1": long + "."})
    assert mnli[:241] == [CLS, *enc(long)[:240]] and mnli[241:243] == [*enc("?"), MASK]


def test_a_mask_beyond_max_length_is_an_error():
    long = " ".join(["word"] * 300)  # SNLI has no sentence limit: the tail cut drops <mask>
    with pytest.raises(ValueError, match="fell beyond max length 256"):
        render("snli", {**NLI_ROW, "sentence1": long + "."})


def test_grammar_variants():
    ids = encode_template(
        "*cls**sentl-_0**+sentu-_1*_is*mask*", ["Hello world", "second one"], TOK, 64
    )
    assert TOK.decode(ids) == "<s>hello worl Second on is<mask>"


def test_a_label_word_of_several_tokens_is_a_clear_error():
    with pytest.raises(
        ConfigError, match=r"label word 'Xylophonically' .* one token per label word"
    ):
        label_word_ids({"0": "great", "1": "Xylophonically"}, TOK)
