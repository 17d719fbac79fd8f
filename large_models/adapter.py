"""Causal-LM adapter (OPT, Llama, ...): options scored by their log-probability after the
context, answers generated greedily, as in the published MeZO/LOZO OPT code but batched.

Each objective has its batch type: `CandidateBatch` (classification: every option of every
example), `AnswerBatch` (language modelling: the gold answer after the context) and
`PromptBatch` (generation: prompts alone, for `task.non_diff`'s -F1 and for evaluation).
Sequences are left-truncated to `model.max_length`, keeping the special tokens the tokenizer
puts before the text (OPT's BOS; none for Llama-style tokenizers such as SmolLM2's), and
left-padded, so every option ends at the last position and only the last
`max option length + 1` logits are computed (`logits_to_keep`), which keeps the vocabulary
projection small. Generation runs `model.generate` on the left-padded batch (greedy, KV cache, at
most 50 new tokens, stopping at a newline or EOS); prompts leave room for those 50 tokens. A
method may put text before each example's prompt through the adapter's `context_prefix` hook
(ICL's demonstrations).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp import distributed
from lozo_exp.adapter import Adapter, TokenBatch
from lozo_exp.config import ConfigError, RunConfig, TaskConfig
from lozo_exp.data import Row, Splits, load_rows, sample_opt_protocol, source_of
from lozo_exp.datacheck import check_rows
from lozo_exp.metrics import exact_match, f1

MAX_NEW_TOKENS = 50


@dataclass
class ScoredBatch(TokenBatch):
    """Sequences that end in an option (left-padded), with each option's length in tokens."""

    option_lens: torch.Tensor


@dataclass
class CandidateBatch(ScoredBatch):
    """Classification: every option of every example, grouped by example (`num_options` rows
    each), and the index of each example's correct option."""

    num_options: list[int]
    labels: torch.Tensor


@dataclass
class AnswerBatch(ScoredBatch):
    """Language modelling: each example's context followed by its gold answer (the option)."""


@dataclass
class PromptBatch(TokenBatch):
    """Generation: prompts alone (room left for the answer) and each example's gold answers."""

    answers: list[tuple[str, ...]]


class CausalLMAdapter(Adapter):
    family = "causal"
    task: CausalTask
    non_diff: bool = False  # train on -F1 of greedy generations (task.non_diff)

    @staticmethod
    def data_splits(task: CausalTask) -> tuple[str, ...]:
        return ("train", "validation")

    @staticmethod
    def build_splits(task: CausalTask, cfg: TaskConfig) -> Splits:
        if cfg.non_diff and not task.generation:
            raise ConfigError(
                f"task.non_diff=true makes the loss -F1 of generated answers, so it needs a "
                f"generation task (squad, drop); task {task.name!r} is scored by {task.metric}"
            )
        train, evaluation = (
            check_rows(load_rows(cfg, split), task.schema, source_of(cfg, split))
            for split in ("train", "validation")
        )
        # Dev is never empty (it is drawn first); a training method refuses an empty train.
        return sample_opt_protocol(cfg, train, evaluation)

    def prepare(self, cfg: RunConfig, splits: Splits) -> None:
        self.non_diff = cfg.task.non_diff

    # -- prompts ----------------------------------------------------------------------------
    def answered(self, row: Row) -> str:
        """The prompt followed by its correct option (or first gold answer), stripped."""
        p = self.task.render(row)
        return (p.context + p.options[p.label]).strip()

    def render(self, row: Row) -> Prompted:
        """The example in the task's template, after the method's context prefix, if any."""
        p = self.task.render(row)
        context = p.context.lstrip(" ")
        if self.context_prefix is not None:
            context = self.context_prefix(row) + context
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

    def _scored(
        self, prompted: list[Prompted], options: Callable[[Prompted], tuple[str, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of context + option for each example's `options`
        (left-truncated, prefix kept, left-padded) and each option's length in tokens. A generation
        task's sequences leave room for an answer, as its prompts do (published)."""
        texts = [t for p in prompted for t in (p.context, *(p.context + o for o in options(p)))]
        ids = iter(self.tokenizer(texts)["input_ids"])
        limit = self.max_length - (MAX_NEW_TOKENS if self.task.generation else 0)
        seqs, option_lens = [], []
        for p in prompted:
            context = next(ids)
            for _ in options(p):
                full = next(ids)
                seq = self._truncate(full, limit)
                seqs.append(seq)
                option_lens.append(min(max(1, len(full) - len(context)), len(seq) - 1))
        input_ids, attention_mask = self.pad(seqs, left=True)
        return input_ids, attention_mask, torch.tensor(option_lens, device=self.device)

    def _candidate_batch(self, prompted: list[Prompted]) -> CandidateBatch:
        return CandidateBatch(
            *self._scored(prompted, lambda p: p.options),
            num_options=[len(p.options) for p in prompted],
            labels=torch.tensor([p.label for p in prompted], device=self.device),
        )

    def _answer_batch(self, prompted: list[Prompted]) -> AnswerBatch:
        return AnswerBatch(*self._scored(prompted, lambda p: (p.options[p.label],)))

    def _prompt_batch(self, prompted: list[Prompted]) -> PromptBatch:
        ids = self.tokenizer([p.context for p in prompted])["input_ids"]
        limit = self.max_length - MAX_NEW_TOKENS
        input_ids, attention_mask = self.pad([self._truncate(x, limit) for x in ids], left=True)
        return PromptBatch(input_ids, attention_mask, answers=[p.answers for p in prompted])

    def _teacher_forced_batch(self, prompted: list[Prompted]) -> CandidateBatch | AnswerBatch:
        if self.task.objective == "classification":
            return self._candidate_batch(prompted)
        return self._answer_batch(prompted)

    def collate(self, rows: list[Row]) -> CandidateBatch | AnswerBatch | PromptBatch:
        prompted = [self.render(row) for row in rows]
        if self.non_diff:
            return self._prompt_batch(prompted)
        return self._teacher_forced_batch(prompted)

    # -- scoring ----------------------------------------------------------------------------
    def _option_logprobs(self, batch: ScoredBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of the last k positions and the mask of option tokens."""
        option_lens = batch.option_lens
        k = int(option_lens.max())
        logits = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            logits_to_keep=k + 1,
            use_cache=False,
        ).logits
        wide = torch.promote_types(logits.dtype, torch.float32)  # float64 (tests) stays float64
        logp = logits[:, :-1].to(wide).log_softmax(-1)
        token_logp = logp.gather(-1, batch.input_ids[:, -k:, None]).squeeze(-1)
        mask = torch.arange(k, device=option_lens.device) >= (k - option_lens)[:, None]
        return token_logp, mask

    def _option_scores(self, batch: CandidateBatch) -> torch.Tensor:
        """Length-normalised log-probability of each option, grouped as [rows, max options]
        (-inf where an example has fewer options)."""
        token_logp, mask = self._option_logprobs(batch)
        scores = (token_logp * mask).sum(-1) / mask.sum(-1)
        sizes = torch.tensor(batch.num_options, device=scores.device)
        example = torch.repeat_interleave(torch.arange(len(sizes), device=scores.device), sizes)
        first = torch.cumsum(sizes, 0) - sizes  # each example's first row
        grouped = scores.new_full((len(sizes), int(sizes.max())), float("-inf"))
        grouped[example, torch.arange(len(scores), device=scores.device) - first[example]] = scores
        return grouped

    def _generate(self, batch: PromptBatch) -> list[str]:
        """Greedy answers of a prompt batch: decoded new tokens up to a newline, stripped."""
        width = batch.input_ids.shape[1]
        newline = self.tokenizer.encode("\n", add_special_tokens=False)[-1]
        out = self.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=min(MAX_NEW_TOKENS, self.max_length - width),
            eos_token_id=[newline, self.tokenizer.eos_token_id],
            pad_token_id=self.tokenizer.pad_token_id,
            synced_gpus=distributed.sharded(self.model),  # FSDP: every process steps together
        )
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        """Cross-entropy over the candidates, the gold answer's mean token NLL, or -F1 of the
        greedy answers (task.non_diff), by the batch's objective."""
        match batch:
            case CandidateBatch():
                return F.cross_entropy(self._option_scores(batch), batch.labels)
            case AnswerBatch():
                token_logp, mask = self._option_logprobs(batch)
                return -(token_logp * mask).sum() / mask.sum()
            case PromptBatch():
                answers = self._generate(batch)
                scores = [f1(a, golds) for a, golds in zip(answers, batch.answers, strict=True)]
                return -torch.tensor(sum(scores) / len(scores))
        raise TypeError(f"{type(self).__name__} has no loss for a {type(batch).__name__}")

    def loss_count(self, batch: TokenBatch) -> torch.Tensor | int:
        """Examples (classification, -F1), or the gold answers' tokens (their mean NLL)."""
        match batch:
            case CandidateBatch():
                return len(batch.labels)
            case AnswerBatch():
                return batch.option_lens.sum()
            case PromptBatch():
                return len(batch.answers)
        raise TypeError(f"{type(self).__name__} has no loss for a {type(batch).__name__}")

    def objective_loss(self, rows: list[Row]) -> torch.Tensor:
        return self.loss(self._teacher_forced_batch([self.render(row) for row in rows]))

    def _predict(self, prompted: list[Prompted]) -> list[int] | list[str]:
        if self.task.generation:
            return self._generate(self._prompt_batch(prompted))
        return self._option_scores(self._candidate_batch(prompted)).argmax(-1).tolist()

    @torch.inference_mode()
    def predict(self, rows: list[Row]) -> list[int] | list[str]:
        """Generated answers (generation tasks) or the index of the best-scoring option."""
        return self._predict([self.render(row) for row in rows])

    def score_batch(self, rows: list[Row]) -> list[dict[str, float]]:
        prompted = [self.render(row) for row in rows]
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
