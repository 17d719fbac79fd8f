"""Causal-LM adapter (OPT, Llama, ...): options scored by their log-probability after the
context, answers generated greedily, as in the published MeZO/LOZO OPT code but batched.

Sequences are left-truncated to `model.max_length`, keeping the special tokens the tokenizer
puts before the text (OPT's BOS; none for Llama-style tokenizers such as SmolLM2's), and
left-padded, so every option ends at the last position and only the last
`max option length + 1` logits are computed (`logits_to_keep`), which keeps the vocabulary
projection small. Generation runs `model.generate` on the left-padded batch (greedy, KV cache, at
most 50 new tokens, stopping at a newline or EOS); prompts leave room for those 50 tokens.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp.adapter import Adapter, Batch
from lozo_exp.config import ConfigError, RunConfig, TaskConfig
from lozo_exp.data import Row, Splits, load_rows, sample_opt_protocol
from lozo_exp.metrics import exact_match, f1

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 50
DEMO_SEPARATOR = "\n\n"  # between ICL demonstrations, and before the evaluated example


class CausalLMAdapter(Adapter):
    family = "causal"
    task: CausalTask
    demonstrations: str = ""  # ICL: solved training examples prepended to every prompt
    non_diff: bool = False  # the ZO loss is -F1 of greedy generations (task.non_diff)

    @staticmethod
    def build_splits(task: CausalTask, cfg: TaskConfig) -> Splits:
        if cfg.non_diff and not task.generation:
            raise ConfigError(
                f"task.non_diff=true makes the loss -F1 of generated answers, so it needs a "
                f"generation task (squad, drop); task {task.name!r} is scored by {task.metric}"
            )
        return sample_opt_protocol(cfg, load_rows(cfg, "train"), load_rows(cfg, "validation"))

    def prepare(self, cfg: RunConfig, splits: Splits) -> None:
        self.non_diff = cfg.task.non_diff
        if cfg.method.name == "icl":
            demos = splits.train[: cfg.method.num_demos]
            if len(demos) < cfg.method.num_demos:
                log.warning(
                    "ICL: asked for %d demonstrations, the training sample has %d",
                    cfg.method.num_demos,
                    len(demos),
                )
            self.demonstrations = DEMO_SEPARATOR.join(self._solved(row) for row in demos).strip()

    # -- prompts ----------------------------------------------------------------------------
    def _solved(self, row: Row) -> str:
        """A demonstration: the prompt followed by its correct option (or first gold answer)."""
        p = self.task.render(row)
        return (p.context + p.options[p.label]).strip()

    def _render(self, row: Row) -> Prompted:
        p = self.task.render(row)
        context = p.context.lstrip(" ")
        if self.demonstrations:
            context = self.demonstrations + DEMO_SEPARATOR + context
        return replace(p, context=context)

    # -- encoding ---------------------------------------------------------------------------
    @functools.cached_property
    def _prefix(self) -> int:
        """How many special tokens the tokenizer puts before the text (OPT: BOS; Llama-style
        tokenizers may put none)."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a")["input_ids"]
        return next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)

    def _truncate(self, ids: list[int], limit: int) -> list[int]:
        """Left-truncate to `limit` tokens, keeping the special tokens before the text."""
        keep = self._prefix
        return ids if len(ids) <= limit else ids[:keep] + ids[len(ids) - limit + keep :]

    def _encode(self, prompted: Prompted, options: tuple[str, ...]) -> list[tuple[list[int], int]]:
        """Token ids of context + each option (left-truncated, prefix kept) and option lengths.
        A generation task's sequences leave room for an answer, as its prompts do (published)."""
        context, *full = self.tokenizer(
            [prompted.context, *(prompted.context + o for o in options)]
        )["input_ids"]
        limit = self.max_length - (MAX_NEW_TOKENS if self.task.generation else 0)
        seqs = []
        for ids in full:
            option_len = max(1, len(ids) - len(context))
            ids = self._truncate(ids, limit)
            seqs.append((ids, min(option_len, len(ids) - 1)))
        return seqs

    def _pad(self, seqs: list[tuple[list[int], int]]) -> Batch:
        """Left-padded sequences (options end at the last position) and their option lengths."""
        input_ids, attention_mask = self.pad([ids for ids, _ in seqs], left=True)
        option_lens = torch.tensor([n for _, n in seqs], device=self.device)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "option_lens": option_lens,
        }

    def _candidate_batch(self, prompted: list[Prompted]) -> Batch:
        """Every option of every example, with group sizes and the correct option per example."""
        batch = self._pad([s for p in prompted for s in self._encode(p, p.options)])
        batch["num_options"] = [len(p.options) for p in prompted]
        batch["labels"] = torch.tensor([p.label for p in prompted], device=self.device)
        return batch

    def _prompt_batch(self, prompted: list[Prompted]) -> Batch:
        """Prompts alone, left-truncated to leave room for the generated answer."""
        ids = self.tokenizer([p.context for p in prompted])["input_ids"]
        batch = self._pad([(self._truncate(x, self.max_length - MAX_NEW_TOKENS), 0) for x in ids])
        batch["answers"] = [p.answers for p in prompted]
        return batch

    def _objective_batch(self, prompted: list[Prompted]) -> Batch:
        """Teacher-forced batch: every candidate (classification) or the gold answer."""
        if self.task.objective == "classification":
            return self._candidate_batch(prompted)
        return self._pad([self._encode(p, (p.options[p.label],))[0] for p in prompted])

    def collate(self, rows: list[Row]) -> Batch:
        prompted = [self._render(row) for row in rows]
        if self.non_diff:
            return self._prompt_batch(prompted)
        return self._objective_batch(prompted)

    # -- scoring ----------------------------------------------------------------------------
    def _option_logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of the last k positions and the mask of option tokens."""
        option_lens = batch["option_lens"]
        k = int(option_lens.max())
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=k + 1,
            use_cache=False,
        ).logits
        logp = logits[:, :-1].float().log_softmax(-1)
        token_logp = logp.gather(-1, batch["input_ids"][:, -k:, None]).squeeze(-1)
        mask = torch.arange(k, device=option_lens.device) >= (k - option_lens)[:, None]
        return token_logp, mask

    def _option_scores(self, batch: Batch) -> torch.Tensor:
        """Length-normalised log-probability of each option, grouped as [rows, max options]."""
        token_logp, mask = self._option_logprobs(batch)
        scores = (token_logp * mask).sum(-1) / mask.sum(-1)
        sizes = batch["num_options"]
        grouped = scores.new_full((len(sizes), max(sizes)), float("-inf"))
        for i, group in enumerate(torch.split(scores, sizes)):
            grouped[i, : len(group)] = group
        return grouped

    def _generate(self, batch: Batch) -> list[str]:
        """Greedy answers of a prompt batch: decoded new tokens up to a newline, stripped."""
        width = batch["input_ids"].shape[1]
        newline = self.tokenizer.encode("\n", add_special_tokens=False)[-1]
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            do_sample=False,
            num_beams=1,
            max_new_tokens=min(MAX_NEW_TOKENS, self.max_length - width),
            eos_token_id=[newline, self.tokenizer.eos_token_id],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def _objective_loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy over the candidates, or the gold answer's mean token NLL."""
        if self.task.objective == "classification":
            return F.cross_entropy(self._option_scores(batch), batch["labels"])
        token_logp, mask = self._option_logprobs(batch)
        return -(token_logp * mask).sum() / mask.sum()

    def loss(self, batch: Batch) -> torch.Tensor:
        if self.non_diff:
            answers = self._generate(batch)
            scores = [f1(a, golds) for a, golds in zip(answers, batch["answers"], strict=True)]
            return -torch.tensor(sum(scores) / len(scores))
        return self._objective_loss(batch)

    def objective_loss(self, rows: list[Row]) -> torch.Tensor:
        return self._objective_loss(self._objective_batch([self._render(row) for row in rows]))

    def _predict(self, prompted: list[Prompted]) -> list[int] | list[str]:
        if self.task.generation:
            return self._generate(self._prompt_batch(prompted))
        return self._option_scores(self._candidate_batch(prompted)).argmax(-1).tolist()

    @torch.inference_mode()
    def predict(self, rows: list[Row]) -> list[int] | list[str]:
        """Generated answers (generation tasks) or the index of the best-scoring option."""
        return self._predict([self._render(row) for row in rows])

    def score_batch(self, rows: list[Row]) -> list[dict[str, float]]:
        prompted = [self._render(row) for row in rows]
        predictions = self._predict(prompted)
        if self.task.generation:
            return [
                {"f1": f1(a, p.answers), "em": exact_match(a, p.answers)}
                for a, p in zip(predictions, prompted, strict=True)
            ]
        return [
            {"accuracy": float(p.is_correct(i))} for i, p in zip(predictions, prompted, strict=True)
        ]


ADAPTER = CausalLMAdapter
