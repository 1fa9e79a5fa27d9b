"""Answering one chunk of samples into LLaVA-Med answer-file rows, what `infer` and `suite` tasks run.

Closed questions with choices and multiple-choice questions are answered by option likelihood (mode score: no
parsing, so nothing can fail to parse); the rest, and everything in mode generate, by generation. Generated answers
to questions with choices are mapped: a closed answer to its choice (eval/normalize.py), a multiple-choice answer to
the letter it names (eval/multiple_choice.py, MMMU's parser); an answer naming none stays unmapped and scores wrong.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from medlava.config import InferConfig
from medlava.eval.multiple_choice import parse_letter
from medlava.eval.normalize import map_answer
from medlava.infer.chunks import ChunkWriter, chunk_of, chunk_path
from medlava.infer.score import generate, score_choices
from medlava.models.inputs import Encoder, SampleDataset, raise_batch_error
from medlava.predictions import scalar_meta

log = logging.getLogger(__name__)


@dataclass
class Model:
    """A loaded model and what answering needs beside it."""

    model: torch.nn.Module
    processor: object
    encoder: Encoder
    model_id: str
    device: torch.device

    def for_images(self, image_root: Path) -> Model:
        """The same model reading images from another folder (one benchmark after another)."""
        encoder = copy.copy(self.encoder)
        encoder.image_root = Path(image_root)
        return replace(self, encoder=encoder)


@dataclass
class ChunkStats:
    answers: int = 0
    seconds: float = 0.0

    @property
    def answers_per_s(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0


def question_text(sample: dict) -> str:
    return sample["conversations"][0]["value"].replace("<image>", "").strip()


def reference(sample: dict) -> str:
    meta = sample.get("meta") or {}
    if "answer" in meta:
        return str(meta["answer"])
    gpt = [c["value"] for c in sample["conversations"] if c.get("from") in ("gpt", "assistant")]
    return gpt[-1] if gpt else ""


def mapped_answer(text: str, meta: dict) -> dict:
    """prediction and how it was read (`normalized`) for a generated answer to a question with choices."""
    if meta.get("task") == "multiple_choice":
        letter = parse_letter(text, meta.get("options") or dict.fromkeys(meta["choices"], ""))
        return {"prediction": letter or "", "normalized": "letter" if letter else "unmapped"}
    mapped = map_answer(text, meta["choices"])
    return {"prediction": mapped.choice or "", "normalized": mapped.status}


def _answer_batch(inf: InferConfig, m: Model, batch: list[dict], prompts: list[dict]) -> tuple[list[str], list]:
    metas = [s.get("meta") or {} for s in batch]
    scored = [i for i, meta in enumerate(metas)
              if inf.mode == "score" and meta.get("task") in inf.score_tasks and meta.get("choices")]
    free = [i for i in range(len(batch)) if i not in scored]
    texts: list[str] = [""] * len(batch)
    scores: list[dict | None] = [None] * len(batch)
    tok = m.processor.tokenizer
    if scored:
        logps = score_choices(m.model, [prompts[i] for i in scored],
                              [[m.encoder.answer_ids(batch[i], c) for c in metas[i]["choices"]] for i in scored],
                              tok.pad_token_id, m.device)
        for i, lp in zip(scored, logps):
            probs = torch.softmax(torch.tensor(lp), 0).tolist()
            scores[i] = dict(zip(metas[i]["choices"], probs))
            texts[i] = metas[i]["choices"][max(range(len(probs)), key=probs.__getitem__)]
    if free:
        out = generate(m.model, [prompts[i] for i in free], tok, m.device, inf.max_new_tokens, inf.num_beams,
                       inf.temperature)
        for i, text in zip(free, out):
            texts[i] = text
    return texts, scores


def _row(sample: dict, text: str, sc: dict | None, idx: int, model_id: str) -> dict:
    meta = sample.get("meta") or {}
    md = {"reference": reference(sample), "task": meta.get("task", "open"), "choices": meta.get("choices"),
          "scores": sc, "chunk": idx, "mode": "score" if sc else "generate", "image": sample.get("image"),
          "meta": scalar_meta(meta)}
    md.update(mapped_answer(text, meta) if meta.get("choices") and sc is None else {"prediction": text})
    # question_id as the question file has it (int or str): LLaVA-Med's eval compares ids with ==.
    return {"question_id": sample.get("question_id", sample["id"]), "prompt": question_text(sample), "text": text,
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}#{sample['id']}").hex, "model_id": model_id,
            "metadata": md}


def answer_chunk(inf: InferConfig, samples: list[dict], idx: int, chunks: int, m: Model, folder: Path) -> ChunkStats:
    """Answer the samples of chunk `idx` of `chunks` into its file in `folder`, continuing a partial one."""
    final = chunk_path(folder, idx, chunks)
    stats = ChunkStats()
    if final.exists():
        return stats
    writer = ChunkWriter(final)
    todo = [s for s in samples if chunk_of(s["id"], chunks) == idx and str(s["id"]) not in writer.done_ids]
    # Workers decode and preprocess the next batches while the model answers this one.
    loader = torch.utils.data.DataLoader(SampleDataset(todo, m.encoder, prompts=True), batch_size=inf.batch_size,
                                         num_workers=inf.num_workers, collate_fn=list)
    start = time.perf_counter()
    for lo, prompts in zip(range(0, len(todo), inf.batch_size),
                           tqdm(loader, desc=f"chunk {idx}/{chunks}", unit="batch"), strict=True):
        raise_batch_error(prompts)
        batch = todo[lo : lo + inf.batch_size]
        texts, scores = _answer_batch(inf, m, batch, prompts)
        writer.write([_row(s, t, sc, idx, m.model_id) for s, t, sc in zip(batch, texts, scores)])
    writer.finish()
    stats.answers, stats.seconds = len(todo), time.perf_counter() - start
    log.info("chunk %d/%d: %d answers in %.1f s (%.2f answers/s)", idx, chunks, stats.answers, stats.seconds,
             stats.answers_per_s)
    return stats


def answer_shares(rows: list[dict]) -> dict[str, float | int]:
    """How the answers were read: by option likelihood, generated and mapped to a choice, generated and unmapped
    (scored wrong), or free text (open questions); counts and shares of all answers."""
    kinds = {"scored": 0, "mapped": 0, "unmapped": 0, "free_text": 0}
    for r in rows:
        md = r["metadata"]
        kinds["scored" if md.get("scores") else "unmapped" if md.get("normalized") == "unmapped"
              else "mapped" if "normalized" in md else "free_text"] += 1
    n = max(len(rows), 1)
    return {**{f"n_{k}": v for k, v in kinds.items()}, **{f"share_{k}": v / n for k, v in kinds.items()}}
