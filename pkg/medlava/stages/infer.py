"""The `infer` stage: answer one split (or a question file) in chunks, each a job-array task or a loop here
(medlava.infer.answer), then merge them into `answers.jsonl` (LLaVA-Med's answer-file format) and
`predictions.csv`."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from medlava.artifacts import checkpoint_of, step_of
from medlava.config import Config
from medlava.data.samples import load_prepared
from medlava.distributed import Dist
from medlava.infer.answer import Answerer, answer_shares
from medlava.infer.chunks import check_source, chunk_path, merge_chunks
from medlava.infer.questions import read_questions
from medlava.io import atomic_write_jsonl
from medlava.predictions import answers_frame, write_predictions
from medlava.runs import mark_complete, resolve, run_dir, start_run
from medlava.stages import upstream
from medlava.train.runtime import tensorboard

log = logging.getLogger(__name__)


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
    return (
        samples,
        Path(manifest["image_root"]),
        manifest.get("choices"),
        {"samples": str(prepared), "split": cfg.infer.split},
    )


def resolved_checkpoint(cfg: Config) -> str:
    """infer.checkpoint as the checkpoint directory it names now (`latest`: the newest complete sft run's), or base."""
    ref = cfg.infer.checkpoint
    return "base" if ref == "base" else str(checkpoint_of(resolve(cfg, ref, upstream("infer"))).absolute())


def answer_source(cfg: Config, image_root: Path, origin: dict) -> dict:
    """What decides the answers, as flat config keys: the checkpoint `latest` resolves to now, the model
    section, the inputs and the answering settings (not chunks, batch size or workers)."""
    inf = cfg.infer
    ckpt = resolved_checkpoint(cfg)
    model = cfg.vlm("infer").model_dump(mode="json")
    source = {
        "infer.checkpoint": ckpt,
        **{f"model.{k}": v for k, v in model.items()},
        **{
            f"infer.{k}": getattr(inf, k) for k in ("mode", "score_tasks", "max_new_tokens", "num_beams", "temperature")
        },
        "infer.image_root": str(image_root.absolute()),
    }
    if "samples" in origin:
        source |= {"data.samples": str(Path(origin["samples"]).absolute()), "infer.split": origin["split"]}
    else:
        source["infer.questions"] = str(Path(origin["questions"]).absolute())
    return source


def load_answerer(cfg: Config, source: dict, image_root: Path, dist: Dist) -> Answerer:
    """The checkpoint `source` pins, on this rank's device, reading images from `image_root`."""
    ckpt = None if source["infer.checkpoint"] == "base" else Path(source["infer.checkpoint"])
    return Answerer.load(cfg.infer, cfg.vlm("infer"), ckpt, image_root, dist.device)


def run(cfg: Config, dist: Dist, chunk_idx: int | None = None, merge_only: bool = False) -> Path:
    cfg.vlm("infer")
    samples, image_root, classes, origin = load_inputs(cfg)
    source = answer_source(cfg, image_root, origin)
    folder = run_dir(cfg, "infer") / "chunks"
    check_source(folder, source)  # before start_run records a config the chunks were not made with
    run = start_run(cfg, "infer", dist.rank)  # chunk tasks and the merge share it, until it is complete
    todo = [] if merge_only else ([chunk_idx] if chunk_idx is not None else list(range(cfg.infer.chunks)))
    todo = [i for i in todo if not chunk_path(folder, i, cfg.infer.chunks).exists()]
    step = step_of(source["infer.checkpoint"])
    writer = tensorboard(run, None, dist)  # array tasks share the directory: none may purge another's events
    if todo:
        check_source(folder, source, claim=True)
        answerer = load_answerer(cfg, source, image_root, dist)
        for i in todo:
            stats = answerer.answer_chunk(samples, i, folder, source)
            if writer and stats.answers:  # one point per chunk: a slow node shows up
                writer.add_scalar("infer/answers_per_s", stats.answers_per_s, i)
    if chunk_idx is not None and not merge_only:
        if writer:
            writer.close()
        return run
    rows = merge_chunks(folder, cfg.infer.chunks, [s["id"] for s in samples], source)
    atomic_write_jsonl(run / "answers.jsonl", rows)
    write_predictions(run / "predictions.csv", answers_frame(rows))
    normalized = dict(Counter(r["metadata"]["normalized"] for r in rows if "normalized" in r["metadata"]))
    shares = answer_shares(rows)
    if writer:
        for k, v in shares.items():
            writer.add_scalar(f"infer/{k}", v, step)
        writer.close()
    mark_complete(
        run,
        {
            "predictions": "predictions.csv",
            "answers": "answers.jsonl",
            "n": len(rows),
            "chunks": cfg.infer.chunks,
            "classes": classes,
            "normalized": normalized,
            "answers_read": shares,
            "checkpoint": source["infer.checkpoint"],
            "step": step,
            "image_root": str(image_root.absolute()),
            **origin,
        },
    )
    if normalized:
        log.info("infer: free-text answers mapped to choices: %s (unmapped answers score as wrong)", normalized)
    log.info("infer: %d answers merged from %d chunks into %s", len(rows), cfg.infer.chunks, run)
    return run
