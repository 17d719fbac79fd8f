"""The model-family interface: what the shared runner needs from OPT-style or RoBERTa-style code.

A family package (`large_models`, `medium_models`) provides one `Adapter` subclass and a
`tasks/` folder with one module per task, each exposing `TASK`. Adding a task touches that
module and its `conf/task/<name>.yaml`.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lozo_exp import distributed
from lozo_exp.config import ConfigError, ModelConfig, RunConfig, TaskConfig
from lozo_exp.data import Row, Splits
from lozo_exp.tracking import Progress

FAMILY_PACKAGES = {"causal": "large_models", "masked": "medium_models"}
ContextPrefix = Callable[[Row], str]
"""Text to put before one example's prompt (e.g. in-context demonstrations)."""


@dataclass
class TokenBatch:
    """Padded token ids and attention mask of one batch, on the model's device. A family's
    batches extend it with what their objective needs (one type per objective)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class Adapter(ABC):
    """Turns rows into batches, batches into a loss, and rows into evaluation metrics.

    Methods reach a family only through this interface. `context_prefix` is the hook for a
    method that puts text before each example's prompt (ICL); `answered` renders an example
    with its answer (an ICL demonstration). Families whose prompts cannot take a prefix
    (masked) leave `answered` unimplemented.
    """

    family: ClassVar[str]
    context_prefix: ContextPrefix | None = None

    def __init__(self, model: nn.Module, tokenizer, task: Any, model_cfg: ModelConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = model_cfg.max_length

    @staticmethod
    @abstractmethod
    def data_splits(task: Any) -> tuple[str, ...]:
        """The splits the family reads for `task`: the keys of `task.data_files` it honours."""

    @staticmethod
    @abstractmethod
    def build_splits(task: Any, cfg: TaskConfig) -> Splits:
        """Read the task's data, check it (`lozo_exp.datacheck`) and sample train/dev/test by
        the family's protocol."""

    @abstractmethod
    def collate(self, rows: list[Row]) -> TokenBatch:
        """Tensors of one training batch (on the model's device)."""

    @abstractmethod
    def loss(self, batch: TokenBatch) -> torch.Tensor:
        """Scalar training loss of a batch at the current parameters."""

    @abstractmethod
    def loss_count(self, batch: TokenBatch) -> torch.Tensor | int:
        """How many units `loss` is the mean of (examples, or answer tokens for a language-model
        objective): the batch's weight when the means of several batches are merged
        (`distributed.global_mean`)."""

    @abstractmethod
    def score_batch(self, rows: list[Row]) -> list[dict[str, float]]:
        """Per-row metric values (e.g. `{"accuracy": 1.0}`) at the current parameters."""

    @classmethod
    def check(cls, task: Any, tokenizer) -> None:
        """Reject a task the tokenizer cannot serve, before the model is loaded."""

    def prepare(self, cfg: RunConfig, splits: Splits) -> None:
        """Run-specific setup once the model is built (causal: task.non_diff)."""

    def answered(self, row: Row) -> str:
        """The example's prompt followed by its correct answer, as text."""
        raise NotImplementedError(f"the {self.family} family renders no answered prompts")

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode (dropout off) and no autograd, restoring the mode afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _each_batch(self, fn: Callable[[list[Row]], Any], rows: list[Row], batch_size: int) -> list:
        """`fn` of each batch of rows in eval mode, in order; the run's processes split the
        batches and each gets every result."""
        batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
        progress = Progress("evaluated batches", len(batches), every_s=30.0)
        with self._evaluating():
            results = distributed.map_batches(fn, batches, progress.update)
        distributed.reshard(self.model)
        return results

    def evaluate(self, rows: list[Row], batch_size: int) -> dict[str, float]:
        """Mean metrics over rows (eval mode); include `self.task.metric`, the paper's number."""
        per_batch = self._each_batch(self.score_batch, rows, batch_size)
        scores = [s for batch in per_batch for s in batch]
        return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]} if scores else {}

    def objective_loss(self, rows: list[Row]) -> torch.Tensor:
        """The differentiable training objective of rows (for a non-differentiable training loss,
        the teacher-forced loss it stands in for): what the dev loss measures."""
        return self.loss(self.collate(rows))

    def dev_loss(self, rows: list[Row], batch_size: int) -> float:
        """Mean objective over rows in eval mode, batch losses weighted by their rows (as HF
        Trainer's eval loss, which the published OPT code selects the tested state by)."""

        def weighted(chunk: list[Row]) -> float:
            return float(self.objective_loss(chunk)) * len(chunk)

        return sum(self._each_batch(weighted, rows, batch_size)) / max(1, len(rows))

    def pad(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of `seqs` padded to one width, on the model's device."""
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, ids in enumerate(seqs):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention_mask[i, span] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def family_package(family: str) -> str:
    return FAMILY_PACKAGES[family]


def adapter_class(family: str) -> type[Adapter]:
    return importlib.import_module(f"{family_package(family)}.adapter").ADAPTER


def available_tasks(family: str) -> list[str]:
    pkg = importlib.import_module(f"{family_package(family)}.tasks")
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_") and m.name != "base"
    )


def load_task(family: str, name: str) -> Any:
    """The family's task object for `name`, or a ConfigError listing the family's tasks."""
    tasks = available_tasks(family)
    if name not in tasks:
        raise ConfigError(
            f"task {name!r} is not available for the {family} model family "
            f"({FAMILY_PACKAGES[family]}); choose one of: {', '.join(tasks)}"
        )
    module = f"{family_package(family)}.tasks.{name.replace('-', '_')}"
    return importlib.import_module(module).TASK
