"""Validation while align/sft train (`<stage>.eval_every`): the loss on the prepared validation split, and for
closed questions the option-scored accuracy on a fixed subset of at most `<stage>.eval_closed_samples` (infer's
scoring, so it is the accuracy `infer` + `eval` report on those questions). Logged as `val/loss` and
`val/closed_accuracy` to TensorBoard and the console.

Every rank scores an equal share (ZeRO-3 gathers weights in each forward pass, so every rank must make the same
passes); the repeats that even out the shares weigh nothing. The loss is token-weighted over the whole split:
the sum of every answer token's negative log-likelihood over the number of answer tokens, as one batch would
give it, whatever the batch size or the number of ranks."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medlava import precision
from medlava.config import TrainConfig
from medlava.distributed import Dist, sum_over_ranks
from medlava.infer.answer import reference
from medlava.infer.score import score_choices
from medlava.models.inputs import Encoder, SampleDataset, collate, raise_batch_error
from medlava.models.templates import IGNORE_INDEX

log = logging.getLogger(__name__)


def share(n: int, dist: Dist) -> list[tuple[int, float]]:
    """This rank's (index, weight) pairs of n items: strided, padded to equal shares with weight-0 repeats."""
    padded = n + (-n) % dist.world_size
    return [(i % n, float(i < n)) for i in range(dist.rank, padded, dist.world_size)]


def closed_questions(samples: list[dict]) -> list[dict]:
    """Closed questions with their choices, in an order that depends on their ids only (the capped subset stays
    the same whatever the file order)."""
    closed = [s for s in samples if (s.get("meta") or {}).get("task") == "closed" and s["meta"].get("choices")]
    return sorted(closed, key=lambda s: hashlib.sha1(str(s["id"]).encode()).hexdigest())


@dataclass
class Validation:
    items: SampleDataset
    """The split's training items (ids, labels, pixels), for the loss."""
    closed: list[dict]
    """The subset whose accuracy is scored (empty: loss only)."""
    prompts: SampleDataset
    """Their prompts."""
    encoder: Encoder
    batch_size: int

    @classmethod
    def of(cls, samples: list[dict], encoder: Encoder, t: TrainConfig, template: str) -> Validation:
        """`plain` (alignment) prompts ask no question: the loss only."""
        closed = closed_questions(samples)[: t.eval_closed_samples] if template != "plain" else []
        return cls(
            SampleDataset(samples, encoder), closed, SampleDataset(closed, encoder, prompts=True), encoder, t.batch_size
        )

    def measure(self, model: torch.nn.Module, dist: Dist, amp: torch.dtype | None = None) -> dict[str, float]:
        """{"loss": ..., "closed_accuracy": ... (when there are closed questions), "closed_n": ...}, the same on
        every rank; the model is left in the mode it was in."""
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), precision.autocast(dist.device, amp):
                out = {"loss": self.loss(model, dist)}
                if self.closed:
                    out["closed_accuracy"] = self.accuracy(model, dist)
                    out["closed_n"] = len(self.closed)
        finally:
            model.train(training)
        return out

    def _batches(self, n: int, dist: Dist):
        mine = share(n, dist)
        for lo in range(0, len(mine), self.batch_size):
            yield mine[lo : lo + self.batch_size]

    def loss(self, model: torch.nn.Module, dist: Dist) -> float:
        nll, tokens = sum_over_ranks(self.loss_sums(model, dist), dist)
        return nll / max(tokens, 1.0)

    @torch.no_grad()
    def loss_sums(self, model: torch.nn.Module, dist: Dist) -> list[float]:
        """This rank's [summed negative log-likelihood, answer tokens] over its share of the split."""
        nll, tokens = 0.0, 0.0
        for part in self._batches(len(self.items), dist):
            batch = collate([self.items[i] for i, _ in part], self.encoder.tokenizer.pad_token_id, side="right")
            raise_batch_error(batch)
            labels = batch.pop("labels").to(dist.device)
            logits = model(**{k: v.to(dist.device) for k, v in batch.items()}, use_cache=False).logits
            target = labels[:, 1:]
            per_token = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
            )
            weights = torch.tensor([w for _, w in part], device=dist.device)
            nll += float((per_token.sum(1) * weights).sum())
            tokens += float(((target != IGNORE_INDEX).sum(1) * weights).sum())
        return [nll, tokens]

    def accuracy(self, model: torch.nn.Module, dist: Dist) -> float:
        (right,) = sum_over_ranks([self.right(model, dist)], dist)
        return right / len(self.closed)

    @torch.no_grad()
    def right(self, model: torch.nn.Module, dist: Dist) -> float:
        """How many of this rank's share of the closed questions the highest-likelihood option answers right."""
        right = 0.0
        for part in self._batches(len(self.closed), dist):
            samples = [self.closed[i] for i, _ in part]
            prompts = [self.prompts[i] for i, _ in part]
            raise_batch_error(prompts)
            options = [[self.encoder.answer_ids(s, c) for c in s["meta"]["choices"]] for s in samples]
            logps = score_choices(model, prompts, options, self.encoder.tokenizer.pad_token_id, dist.device)
            for s, lp, (_, w) in zip(samples, logps, part):
                right += w * (s["meta"]["choices"][max(range(len(lp)), key=lp.__getitem__)] == reference(s))
        return right


def log_validation(step: int, result: dict[str, float], writer, write=log.info) -> None:
    """`val/loss` (and `val/closed_accuracy`) at `step` to TensorBoard (rank 0's writer) and the console."""
    if writer is not None:
        writer.add_scalar("val/loss", result["loss"], step)
        if "closed_accuracy" in result:
            writer.add_scalar("val/closed_accuracy", result["closed_accuracy"], step)
        writer.flush()
    closed = (
        (f", closed-question accuracy {result['closed_accuracy']:.3f} on {result['closed_n']} (option likelihood)")
        if "closed_accuracy" in result
        else ""
    )
    write(f"step {step}: validation loss {result['loss']:.4f}{closed}")
