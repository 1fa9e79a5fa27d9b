"""The `infer` stage: answer one split in chunks (each a job-array task or a loop here), then merge into
`answers.jsonl` (LLaVA-Med's answer-file format) and `predictions.csv`."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from medlava.artifacts import checkpoint_of
from medlava.config import Config
from medlava.data.samples import load_prepared
from medlava.distributed import Dist
from medlava.eval.normalize import map_answer
from medlava.infer.chunks import (
    ChunkWriter,
    check_source,
    chunk_of,
    chunk_path,
    merge_chunks,
)
from medlava.infer.questions import read_questions
from medlava.infer.score import generate, score_choices
from medlava.io import atomic_write_jsonl
from medlava.models.inputs import Encoder, SampleDataset, raise_batch_error
from medlava.models.llava import load_for_inference, num_image_tokens
from medlava.precision import choose_dtype
from medlava.predictions import answers_frame, scalar_meta, write_predictions
from medlava.runs import mark_complete, resolve, run_dir, start_run
from medlava.stages import upstream

log = logging.getLogger(__name__)


def question_text(sample: dict) -> str:
    return sample["conversations"][0]["value"].replace("<image>", "").strip()


def reference(sample: dict) -> str:
    meta = sample.get("meta") or {}
    if "answer" in meta:
        return str(meta["answer"])
    gpt = [c["value"] for c in sample["conversations"] if c.get("from") in ("gpt", "assistant")]
    return gpt[-1] if gpt else ""


def answer_chunk(cfg: Config, samples: list[dict], idx: int, model, processor, encoder: Encoder, model_id: str,
                 folder: Path, device: torch.device) -> None:
    k, inf = cfg.infer.chunks, cfg.infer
    final = chunk_path(folder, idx, k)
    if final.exists():
        return
    writer = ChunkWriter(final)
    todo = [s for s in samples if chunk_of(s["id"], k) == idx and str(s["id"]) not in writer.done_ids]
    tok = processor.tokenizer
    # Workers decode and preprocess the next batches while the model answers this one.
    loader = torch.utils.data.DataLoader(SampleDataset(todo, encoder, prompts=True), batch_size=inf.batch_size,
                                         num_workers=inf.num_workers, collate_fn=list)
    for start, prompts in zip(range(0, len(todo), inf.batch_size),
                              tqdm(loader, desc=f"chunk {idx}/{k}", unit="batch"), strict=True):
        raise_batch_error(prompts)
        batch = todo[start : start + inf.batch_size]
        metas = [s.get("meta") or {} for s in batch]
        # Closed questions with choices are scored by option likelihood (mode score); the rest generate.
        scored = [i for i, m in enumerate(metas) if inf.mode == "score" and m.get("task") == "closed" and m.get("choices")]
        free = [i for i in range(len(batch)) if i not in scored]
        texts: list[str] = [""] * len(batch)
        scores: list[dict | None] = [None] * len(batch)
        if scored:
            logps = score_choices(model, [prompts[i] for i in scored],
                                  [[encoder.answer_ids(batch[i], c) for c in metas[i]["choices"]] for i in scored],
                                  tok.pad_token_id, device)
            for i, lp in zip(scored, logps):
                probs = torch.softmax(torch.tensor(lp), 0).tolist()
                scores[i] = dict(zip(metas[i]["choices"], probs))
                texts[i] = metas[i]["choices"][max(range(len(probs)), key=probs.__getitem__)]
        if free:
            out = generate(model, [prompts[i] for i in free], tok, device, inf.max_new_tokens,
                           inf.num_beams, inf.temperature)
            for i, text in zip(free, out):
                texts[i] = text
        rows = []
        for s, m, text, sc in zip(batch, metas, texts, scores):
            md = {"reference": reference(s), "task": m.get("task", "open"), "choices": m.get("choices"), "scores": sc,
                  "chunk": idx, "mode": "score" if sc else "generate", "meta": scalar_meta(m)}
            if m.get("choices") and sc is None:  # free text mapped to a choice, or left unmapped ("")
                mapped = map_answer(text, m["choices"])
                md.update(prediction=mapped.choice or "", normalized=mapped.status)
            else:
                md["prediction"] = text
            # question_id as the question file has it (int or str): LLaVA-Med's eval compares ids with ==.
            rows.append({"question_id": s.get("question_id", s["id"]), "prompt": question_text(s), "text": text,
                         "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}#{s['id']}").hex,
                         "model_id": model_id, "metadata": md})
        writer.write(rows)
    writer.finish()


def load_inputs(cfg: Config) -> tuple[list[dict], Path, list[str] | None, dict]:
    """(samples, image root, class list, where they came from) for a question file or a prepared split."""
    if cfg.infer.questions:
        path = Path(cfg.infer.questions)
        samples = read_questions(path)
        choice_sets = {tuple(s["meta"].get("choices") or ()) for s in samples}
        classes = list(choice_sets.pop()) if len(choice_sets) == 1 and () not in choice_sets else None
        root = Path(cfg.infer.image_root) if cfg.infer.image_root else path.parent
        return samples, root, classes, {"questions": str(path)}
    prepared = resolve(cfg, cfg.data.samples, "prepare")
    samples, manifest = load_prepared(prepared, cfg.infer.split)
    return samples, Path(manifest["image_root"]), manifest.get("choices"), {"samples": str(prepared),
                                                                          "split": cfg.infer.split}


def answer_source(cfg: Config, image_root: Path, origin: dict) -> dict:
    """What decides the answers, as flat config keys: the checkpoint `latest` resolves to now, the model
    section, the inputs and the answering settings (not chunks, batch size or workers)."""
    ref, inf = cfg.infer.checkpoint, cfg.infer
    ckpt = "base" if ref == "base" else str(checkpoint_of(resolve(cfg, ref, upstream("infer"))).absolute())
    model = cfg.vlm("infer").model_dump(mode="json")
    source = {"infer.checkpoint": ckpt, **{f"model.{k}": v for k, v in model.items()},
              **{f"infer.{k}": getattr(inf, k) for k in ("mode", "max_new_tokens", "num_beams", "temperature")},
              "infer.image_root": str(image_root.absolute())}
    if "samples" in origin:
        source |= {"data.samples": str(Path(origin["samples"]).absolute()), "infer.split": origin["split"]}
    else:
        source["infer.questions"] = str(Path(origin["questions"]).absolute())
    return source


def run(cfg: Config, d: Dist, chunk_idx: int | None = None, merge_only: bool = False) -> Path:
    m = cfg.vlm("infer")
    samples, image_root, classes, origin = load_inputs(cfg)
    source = answer_source(cfg, image_root, origin)
    folder = run_dir(cfg, "infer") / "chunks"
    check_source(folder, source)  # before start_run records a config the chunks were not made with
    run = start_run(cfg, "infer", d.rank, "always")  # chunk tasks and the merge share it
    todo = [] if merge_only else ([chunk_idx] if chunk_idx is not None else list(range(cfg.infer.chunks)))
    todo = [i for i in todo if not chunk_path(folder, i, cfg.infer.chunks).exists()]
    if todo:
        check_source(folder, source, claim=True)
        ckpt = None if source["infer.checkpoint"] == "base" else Path(source["infer.checkpoint"])
        model, processor, model_id = load_for_inference(m, ckpt, choose_dtype("auto"))
        model.to(d.device)
        encoder = Encoder(processor, m.template, num_image_tokens(model), m.model_max_length,
                          image_root)
        for i in todo:
            answer_chunk(cfg, samples, i, model, processor, encoder, model_id, folder, d.device)
    if chunk_idx is not None and not merge_only:
        return run
    rows = merge_chunks(folder, cfg.infer.chunks, [s["id"] for s in samples])
    atomic_write_jsonl(run / "answers.jsonl", rows)
    write_predictions(run / "predictions.csv", answers_frame(rows))
    normalized = dict(Counter(r["metadata"]["normalized"] for r in rows if "normalized" in r["metadata"]))
    mark_complete(run, {"predictions": "predictions.csv", "answers": "answers.jsonl", "n": len(rows),
                        "chunks": cfg.infer.chunks, "classes": classes, "normalized": normalized, **origin})
    if normalized:
        log.info("infer: free-text answers mapped to choices: %s (unmapped answers score as wrong)", normalized)
    log.info("infer: %d answers merged from %d chunks into %s", len(rows), cfg.infer.chunks, run)
    return run
