"""Causal-LM adapter (OPT): options scored by their log-probability after the context.

Sequences are left-truncated to `model.max_length` keeping BOS and left-padded, so every
option ends at the last position and only the last `max option length + 1` logits are
computed (`logits_to_keep`), which keeps the vocabulary projection small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from large_models.tasks.base import CausalTask, Prompted
from lozo_exp.adapter import Adapter, Batch
from lozo_exp.config import TaskConfig
from lozo_exp.data import Row, Splits, load_rows, sample_opt_protocol


class CausalLMAdapter(Adapter):
    family = "causal"
    task: CausalTask

    @staticmethod
    def build_splits(task: CausalTask, cfg: TaskConfig) -> Splits:
        return sample_opt_protocol(cfg, load_rows(cfg, "train"), load_rows(cfg, "validation"))

    # -- encoding ---------------------------------------------------------------------------
    def _encode(self, prompted: Prompted, option: str) -> tuple[list[int], int]:
        """Token ids of context + option (left-truncated, BOS kept) and the option's length."""
        context = self.tokenizer(prompted.context)["input_ids"]
        ids = self.tokenizer(prompted.context + option)["input_ids"]
        option_len = max(1, len(ids) - len(context))
        if len(ids) > self.max_length:
            ids = ids[:1] + ids[len(ids) - self.max_length + 1 :]
        return ids, min(option_len, len(ids) - 1)

    def _pad(self, seqs: list[tuple[list[int], int]]) -> Batch:
        width = max(len(ids) for ids, _ in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (ids, _) in enumerate(seqs):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        option_lens = torch.tensor([n for _, n in seqs])
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "option_lens": option_lens.to(self.device),
        }

    def _candidate_batch(self, rows: list[Row]) -> Batch:
        """Every option of every row, with group sizes and the correct option per row."""
        prompted = [self.task.render(row) for row in rows]
        batch = self._pad([self._encode(p, o) for p in prompted for o in p.options])
        batch["num_options"] = [len(p.options) for p in prompted]
        batch["labels"] = torch.tensor([p.label for p in prompted], device=self.device)
        return batch

    def collate(self, rows: list[Row]) -> Batch:
        if self.task.objective == "classification":
            return self._candidate_batch(rows)
        prompted = [self.task.render(row) for row in rows]
        return self._pad([self._encode(p, p.options[p.label]) for p in prompted])

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

    def loss(self, batch: Batch) -> torch.Tensor:
        if self.task.objective == "classification":
            return F.cross_entropy(self._option_scores(batch), batch["labels"])
        token_logp, mask = self._option_logprobs(batch)
        return -(token_logp * mask).sum() / mask.sum()

    def score_batch(self, rows: list[Row]) -> list[dict[str, float]]:
        batch = self._candidate_batch(rows)
        hits = self._option_scores(batch).argmax(-1) == batch["labels"]
        return [{"accuracy": float(h)} for h in hits.tolist()]


ADAPTER = CausalLMAdapter
