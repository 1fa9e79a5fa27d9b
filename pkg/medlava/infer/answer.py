"""Answering one chunk of the questions, what `infer` and `suite` tasks run: questions of `infer.score_tasks` with
choices (closed ones, multiple choice) by option likelihood (infer.mode=score: nothing to parse, so nothing fails
to parse), the rest by generation; rows in LLaVA-Med's answer-file format, appended to the chunk's partial file as
each batch is answered, so a killed task loses at most one batch (infer/chunks.py).

A generated answer to a question with choices is mapped: a closed one to its choice (eval/normalize.py), a
multiple-choice one to the letter it names (eval/multiple_choice.py, MMMU's parser); an answer naming none stays
unmapped and scores wrong."""

from __future__ import annotations

import copy
import logging
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from medlava.config import InferConfig, ModelConfig
from medlava.eval.multiple_choice import parse_letter
from medlava.eval.normalize import map_answer
from medlava.infer.chunks import ChunkWriter, chunk_of, chunk_path
from medlava.infer.score import generate, score_choices
from medlava.models.inputs import Encoder, SampleDataset, raise_batch_error
from medlava.models.llava import load_for_inference, num_image_tokens
from medlava.precision import choose_dtype
from medlava.predictions import scalar_meta

log = logging.getLogger(__name__)


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


def answer_shares(rows: list[dict]) -> dict[str, float | int]:
    """How the answers were read: by option likelihood, generated and mapped to a choice, generated and unmapped
    (scored wrong), or free text (open questions); counts and shares of all answers."""
    kinds = {"scored": 0, "mapped": 0, "unmapped": 0, "free_text": 0}
    for r in rows:
        md = r["metadata"]
        kinds[
            "scored"
            if md.get("scores")
            else "free_text"
            if "normalized" not in md
            else "mapped"
            if md.get("prediction")
            else "unmapped"
        ] += 1
    n = max(len(rows), 1)
    return {**{f"n_{k}": v for k, v in kinds.items()}, **{f"share_{k}": v / n for k, v in kinds.items()}}


@dataclass
class ChunkStats:
    answers: int = 0
    seconds: float = 0.0

    @property
    def answers_per_s(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0


@dataclass
class Answerer:
    """A loaded model and how it answers (infer.* settings)."""

    settings: InferConfig
    model: torch.nn.Module
    tokenizer: object
    encoder: Encoder
    model_id: str
    device: torch.device

    @classmethod
    def load(
        cls,
        settings: InferConfig,
        model_cfg: ModelConfig,
        checkpoint: Path | None,
        image_root: Path,
        device: torch.device,
    ) -> Answerer:
        """The base model (checkpoint None) or a medlava checkpoint, on `device`, in the precision it has here."""
        model, processor, model_id = load_for_inference(model_cfg, checkpoint, choose_dtype("auto"))
        model.to(device)
        encoder = Encoder(
            processor, model_cfg.template, num_image_tokens(model), model_cfg.model_max_length, image_root
        )
        return cls(settings, model, processor.tokenizer, encoder, model_id, device)

    def for_images(self, image_root: Path) -> Answerer:
        """The same model reading images from another folder (one benchmark after another)."""
        encoder = copy.copy(self.encoder)
        encoder.image_root = Path(image_root)
        return replace(self, encoder=encoder)

    def answer_chunk(self, samples: list[dict], idx: int, folder: Path, source: dict) -> ChunkStats:
        """Answer the samples of chunk `idx` not answered yet, then publish the chunk; it records `source` (what
        decides the answers, stages.infer.answer_source)."""
        inf = self.settings
        final = chunk_path(folder, idx, inf.chunks)
        stats = ChunkStats()
        if final.exists():
            return stats
        writer = ChunkWriter(final, source)
        todo = [s for s in samples if chunk_of(s["id"], inf.chunks) == idx and str(s["id"]) not in writer.done_ids]
        # Workers decode and preprocess the next batches while the model answers this one.
        loader = torch.utils.data.DataLoader(
            SampleDataset(todo, self.encoder, prompts=True),
            batch_size=inf.batch_size,
            num_workers=inf.num_workers,
            collate_fn=list,
        )
        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"chunk {idx}/{inf.chunks}", unit="answer")  # the rate is answers/s
        for lo, prompts in zip(range(0, len(todo), inf.batch_size), loader, strict=True):
            raise_batch_error(prompts)
            writer.write(self.answer_batch(todo[lo : lo + inf.batch_size], prompts, idx))
            bar.update(len(prompts))
        bar.close()
        writer.finish()
        stats.answers, stats.seconds = len(todo), time.perf_counter() - start
        log.info(
            "chunk %d/%d: %d answers in %.1f s (%.2f answers/s)",
            idx,
            inf.chunks,
            stats.answers,
            stats.seconds,
            stats.answers_per_s,
        )
        return stats

    def answer_batch(self, batch: list[dict], prompts: list[dict], idx: int) -> list[dict]:
        inf = self.settings
        metas = [s.get("meta") or {} for s in batch]
        scored = [
            i
            for i, m in enumerate(metas)
            if inf.mode == "score" and m.get("task") in inf.score_tasks and m.get("choices")
        ]
        free = [i for i in range(len(batch)) if i not in scored]
        texts: list[str] = [""] * len(batch)
        scores: list[dict | None] = [None] * len(batch)
        if scored:
            logps = score_choices(
                self.model,
                [prompts[i] for i in scored],
                [[self.encoder.answer_ids(batch[i], c) for c in metas[i]["choices"]] for i in scored],
                self.tokenizer.pad_token_id,
                self.device,
            )
            for i, lp in zip(scored, logps):
                probs = torch.softmax(torch.tensor(lp), 0).tolist()
                scores[i] = dict(zip(metas[i]["choices"], probs))
                texts[i] = metas[i]["choices"][max(range(len(probs)), key=probs.__getitem__)]
        if free:
            out = generate(
                self.model,
                [prompts[i] for i in free],
                self.tokenizer,
                self.device,
                inf.max_new_tokens,
                inf.num_beams,
                inf.temperature,
                inf.compile,
            )
            for i, text in zip(free, out):
                texts[i] = text
        return [self.row(s, m, text, sc, idx) for s, m, text, sc in zip(batch, metas, texts, scores)]

    def row(self, sample: dict, meta: dict, text: str, scores: dict | None, idx: int) -> dict:
        md = {
            "reference": reference(sample),
            "task": meta.get("task", "open"),
            "choices": meta.get("choices"),
            "scores": scores,
            "chunk": idx,
            "mode": "score" if scores else "generate",
            "image": sample.get("image"),
            "meta": scalar_meta(meta),
        }
        md.update(mapped_answer(text, meta) if meta.get("choices") and scores is None else {"prediction": text})
        # question_id as the question file has it (int or str): LLaVA-Med's eval compares ids with ==.
        return {
            "question_id": sample.get("question_id", sample["id"]),
            "prompt": question_text(sample),
            "text": text,
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{self.model_id}#{sample['id']}").hex,
            "model_id": self.model_id,
            "metadata": md,
        }
