"""Masked-LM adapter (RoBERTa, BERT, ...): the label is read from the MLM head at <mask>.

Only the hidden state at <mask> goes through the LM head (as LM-BFF does), and the logits are
restricted to the label words; the loss is cross-entropy over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lozo_exp.adapter import Adapter, TokenBatch
from lozo_exp.config import ConfigError, ModelConfig, TaskConfig
from lozo_exp.data import Row, Splits
from medium_models.kshot import kshot_splits
from medium_models.tasks.base import PromptTask
from medium_models.template import encode_template, label_word_ids


def mlm_head(net: nn.Module, encoder: nn.Module) -> nn.Module:
    """The MLM head: the model's one submodule besides the encoder that holds its output
    embeddings (RoBERTa's `lm_head`, BERT's `cls`), mapping hidden states to vocabulary logits."""
    out = net.get_output_embeddings()
    heads = [
        m
        for m in net.children()
        if m is not encoder and m is not out and any(s is out for s in m.modules())
    ]
    if len(heads) != 1:
        raise ConfigError(
            f"{type(net).__name__}: its masked-LM head is not one submodule holding the output "
            f"embeddings next to the encoder (as RoBERTa's lm_head or BERT's cls), so the "
            f"label words cannot be read at <mask>; use a RoBERTa- or BERT-style masked LM."
        )
    return heads[0]


@dataclass
class MaskBatch(TokenBatch):
    """Prompts with one <mask> each: its position and the class index of each example."""

    mask_pos: torch.Tensor
    labels: torch.Tensor


class MaskedLMAdapter(Adapter):
    family = "masked"
    task: PromptTask

    def __init__(self, model, tokenizer, task: PromptTask, model_cfg: ModelConfig):
        super().__init__(model, tokenizer, task, model_cfg)
        self.max_length = min(model_cfg.max_length, task.max_length)
        words = label_word_ids(task.label_words, tokenizer)
        self.labels = list(words)  # label value -> class index by position
        self.word_ids = torch.tensor(list(words.values()), device=self.device)
        net = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.encoder = getattr(net, net.base_model_prefix)
        self.lm_head = mlm_head(net, self.encoder)

    @staticmethod
    def data_splits(task: PromptTask) -> tuple[str, ...]:
        return ("train", *task.eval_splits.values())

    @staticmethod
    def build_splits(task: PromptTask, cfg: TaskConfig) -> Splits:
        return kshot_splits(task, cfg)

    def collate(self, rows: list[Row]) -> MaskBatch:
        t = self.task
        seqs = [
            encode_template(
                t.template,
                t.sentences(r),
                self.tokenizer,
                self.max_length,
                t.first_sent_limit,
                t.other_sent_limit,
            )
            for r in rows
        ]
        input_ids, attention_mask = self.pad(seqs, left=False)
        mask_pos = (input_ids == self.tokenizer.mask_token_id).int().argmax(-1)
        labels = torch.tensor([self.labels.index(t.label(r)) for r in rows], device=self.device)
        return MaskBatch(input_ids, attention_mask, mask_pos, labels)

    def _label_logits(self, batch: MaskBatch) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        at_mask = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.mask_pos]
        logits = self.lm_head(at_mask)[:, self.word_ids]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays

    def loss(self, batch: MaskBatch) -> torch.Tensor:
        return F.cross_entropy(self._label_logits(batch), batch.labels)

    def loss_count(self, batch: MaskBatch) -> int:
        return len(batch.labels)

    @classmethod
    def check(cls, task: PromptTask, tokenizer) -> None:
        label_word_ids(task.label_words, tokenizer)

    def score_batch(self, rows: list[Row]) -> list[dict[str, float]]:
        batch = self.collate(rows)
        hits = self._label_logits(batch).argmax(-1) == batch.labels
        return [{"accuracy": float(h)} for h in hits.tolist()]


ADAPTER = MaskedLMAdapter
