"""Build `lozo_exp/assets/multirc_long/`, the MultiRC-length inputs of the memory preset.

MeZO's memory table (Table 22) runs MultiRC, about 400 tokens per example. The bundled MultiRC
sample's paragraphs are short (about 150-190 tokens rendered), so each row here keeps its
question and answer and gets a paragraph made of the sample's distinct paragraphs (of both
splits), starting from its own, until the rendered prompt reaches TARGET tokens with the
bundled stand-in tokenizer (what the memory runs use offline). Weight and data values do not
change memory; lengths do.
Run once from the repository root; the output is committed.
"""

import json
from pathlib import Path

from large_models.tasks.multirc import TASK
from lozo_exp.models import stand_in_tokenizer

TARGET = 400
SAMPLE = Path("lozo_exp/samples/multirc")
OUT = Path("lozo_exp/assets/multirc_long")


def lengthen(rows: list[dict], paragraphs: list[str], tokenizer) -> list[dict]:
    """Each row with as many paragraphs (its own first) as bring it closest to TARGET tokens."""

    def length(row: dict) -> int:
        return len(tokenizer(TASK.render(row).context).input_ids)

    longer = []
    for row in rows:
        start = paragraphs.index(row["paragraph"])
        order = paragraphs[start:] + paragraphs[:start]
        candidates = [{**row, "paragraph": " ".join(order[: n + 1])} for n in range(len(order))]
        longer.append(min(candidates, key=lambda r: abs(length(r) - TARGET)))
    return longer


def main() -> None:
    tokenizer = stand_in_tokenizer("causal")
    OUT.mkdir(parents=True, exist_ok=True)
    splits = {
        split: [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "validation")
    }
    paragraphs = list(dict.fromkeys(row["paragraph"] for rows in splits.values() for row in rows))
    for split, rows in splits.items():
        longer = lengthen(rows, paragraphs, tokenizer)
        lengths = [len(tokenizer(TASK.render(r).context).input_ids) for r in longer]
        (OUT / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in longer))
        print(
            f"{split}: {len(longer)} rows, {min(lengths)}-{max(lengths)} tokens, "
            f"mean {sum(lengths) / len(lengths):.0f}"
        )


if __name__ == "__main__":
    main()
