"""The `infer` stage: answer one split in chunks (each a job-array task or a loop here), then merge into
`answers.jsonl` (LLaVA-Med's answer-file format) and `predictions.csv`."""

from __future__ import annotations

import io
import logging
import re
import uuid
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from medlava.config import Config
from medlava.data.samples import load_prepared
from medlava.distributed import Dist
from medlava.infer.chunks import ChunkWriter, chunk_of, chunk_path, merge_chunks
from medlava.infer.score import choice_token_ids, generate, score_choices
from medlava.io import atomic_write_jsonl, atomic_write_text
from medlava.models.inputs import Encoder
from medlava.models.llava import choose_dtype, load_for_inference, num_image_tokens
from medlava.runs import mark_complete, resolve, start_run
from medlava.train.checkpoint import checkpoint_of

log = logging.getLogger(__name__)


def question_text(sample: dict) -> str:
    return sample["conversations"][0]["value"].replace("<image>", "").strip()


def reference(sample: dict) -> str:
    meta = sample.get("meta") or {}
    if "answer" in meta:
        return str(meta["answer"])
    gpt = [c["value"] for c in sample["conversations"] if c.get("from") in ("gpt", "assistant")]
    return gpt[-1] if gpt else ""


def match_choice(text: str, choices: list[str]) -> str:
    """Exact choice after case/punctuation folding, else '' (counted as unmapped by eval)."""
    folded = re.sub(r"[^\w\s]", "", text.lower()).strip()
    return next((c for c in choices if c.lower() == folded), "")


def answer_chunk(cfg: Config, samples: list[dict], idx: int, model, processor, encoder: Encoder, model_id: str,
                 folder: Path, device: torch.device) -> None:
    k, inf = cfg.infer.chunks, cfg.infer
    final = chunk_path(folder, idx, k)
    if final.exists():
        return
    writer = ChunkWriter(final)
    todo = [s for s in samples if chunk_of(s["id"], k) == idx and str(s["id"]) not in writer.done_ids]
    tok = processor.tokenizer
    for start in tqdm(range(0, len(todo), inf.batch_size), desc=f"chunk {idx}/{k}", unit="batch"):
        batch = todo[start : start + inf.batch_size]
        prompts = [encoder.prompt_item(s) for s in batch]
        metas = [s.get("meta") or {} for s in batch]
        closed = [m.get("task") == "closed" and m.get("choices") for m in metas]
        texts: list[str] = [""] * len(batch)
        scores: list[dict | None] = [None] * len(batch)
        if inf.mode == "score" and all(closed):
            logps = score_choices(model, prompts, [[choice_token_ids(tok, c) for c in m["choices"]] for m in metas],
                                  tok.pad_token_id, device)
            for i, (m, lp) in enumerate(zip(metas, logps)):
                probs = torch.softmax(torch.tensor(lp), 0).tolist()
                scores[i] = dict(zip(m["choices"], probs))
                texts[i] = m["choices"][max(range(len(probs)), key=probs.__getitem__)]
        else:
            texts = generate(model, prompts, tok, device, inf.max_new_tokens, inf.num_beams, inf.temperature)
        rows = []
        for s, m, text, sc in zip(batch, metas, texts, scores):
            prediction = match_choice(text, m["choices"]) if m.get("choices") else text
            rows.append({"question_id": s["id"], "prompt": question_text(s), "text": text,
                         "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}#{s['id']}").hex,
                         "model_id": model_id,
                         "metadata": {"prediction": prediction, "reference": reference(s),
                                      "task": m.get("task", "open"), "choices": m.get("choices"), "scores": sc,
                                      "chunk": idx, "mode": "score" if sc else "generate"}})
        writer.write(rows)
    writer.finish()


def predictions_frame(rows: list[dict]) -> pd.DataFrame:
    records = []
    for r in rows:
        md = r["metadata"]
        rec = {"id": r["question_id"], "prediction": md["prediction"], "reference": md["reference"],
               "task": md["task"]}
        for choice, p in (md.get("scores") or {}).items():
            rec[f"score_{choice}"] = p
        records.append(rec)
    return pd.DataFrame.from_records(records)


def run_infer(cfg: Config, d: Dist, chunk_idx: int | None = None, merge_only: bool = False) -> Path:
    run = start_run(cfg, "infer", d.rank)
    prepared = resolve(cfg, cfg.data.samples, "prepare")
    samples, manifest = load_prepared(prepared, cfg.infer.split)
    folder = run / "chunks"
    todo = [] if merge_only else ([chunk_idx] if chunk_idx is not None else list(range(cfg.infer.chunks)))
    todo = [i for i in todo if not chunk_path(folder, i, cfg.infer.chunks).exists()]
    if todo:
        ref = cfg.infer.checkpoint
        ckpt = None if ref == "base" else checkpoint_of(resolve(cfg, ref, "sft"))
        model, processor, model_id = load_for_inference(cfg.model, ckpt, choose_dtype("auto"))
        model.to(d.device)
        encoder = Encoder(processor, cfg.model.template, num_image_tokens(model), cfg.model.model_max_length,
                          Path(manifest["image_root"]))
        for i in todo:
            answer_chunk(cfg, samples, i, model, processor, encoder, model_id, folder, d.device)
    if chunk_idx is not None and not merge_only:
        return run
    rows = merge_chunks(folder, cfg.infer.chunks, [s["id"] for s in samples])
    atomic_write_jsonl(run / "answers.jsonl", rows)
    buf = io.StringIO()
    predictions_frame(rows).to_csv(buf, index=False)
    atomic_write_text(run / "predictions.csv", buf.getvalue())
    mark_complete(run, {"predictions": "predictions.csv", "answers": "answers.jsonl", "n": len(rows),
                        "split": cfg.infer.split, "chunks": cfg.infer.chunks, "classes": manifest.get("choices")})
    log.info("infer: %d answers merged from %d chunks into %s", len(rows), cfg.infer.chunks, run)
    return run
