"""The `suite` stage: every benchmark of `suite.benchmarks` prepared (once: a complete prepare run with the same data
settings is reused), answered with `infer:`'s model and settings in `infer.chunks` chunks per benchmark (resumable,
merged exactly once, as `infer`), scored by its published protocol, and one leaderboard.

Three steps, which a launch runs as three jobs: `--prepare-only`, an array of `infer.chunks` answering tasks (task c
answers chunk c of every benchmark, so each task loads the model once and the tasks share the work evenly however
unequal the benchmarks' sizes) and `--merge-only` (merge, score, leaderboard). Run without options it does all three
in this process.

    <run>/<benchmark>/chunks/        the answers, as infer's
    <run>/<benchmark>/answers.jsonl, predictions.csv
    <run>/<benchmark>/eval/          metrics.json, per_sample.csv, plots, tensorboard/
    <run>/leaderboard.{csv,md,png}, tensorboard/ (each leaderboard row as a scalar at the checkpoint's step)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pydantic import ValidationError

from medlava.config import Config, ConfigError, DataConfig, SuiteBenchmark, format_errors
from medlava.runs import is_complete, mark_complete, stage_root, start_run

log = logging.getLogger(__name__)

COMMON_DATA = ("skip", "verify_images", "workers", "seed")
"""data.* settings a suite passes on to every benchmark's prepare."""


def data_config(cfg: Config, i: int, b: SuiteBenchmark) -> DataConfig:
    root = Path(b.root) if Path(b.root).is_absolute() else Path(cfg.data.root) / b.root
    common = {k: v for k, v in cfg.data.model_dump(mode="json").items() if k in COMMON_DATA}
    try:
        return DataConfig.model_validate(
            {**common, "dataset": b.dataset, "root": str(root), "image_root": b.image_root, b.dataset: b.options}
        )
    except ValidationError as e:
        raise ConfigError(format_errors(e, f"suite.benchmarks[{i}] ({b.label})")) from None


def prepare_id(data: DataConfig, label: str) -> str:
    """The prepare run a benchmark's data settings always map to, so a complete one is found and reused."""
    digest = hashlib.sha1(json.dumps(data.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:10]
    return f"suite-{label}-{digest}"


def benchmark_cfg(cfg: Config, i: int) -> Config:
    """The suite's config as one benchmark sees it: its data section, its prepare run, its split."""
    b = cfg.suite.benchmarks[i]
    data = data_config(cfg, i, b)
    prepared = stage_root(cfg, "prepare") / prepare_id(data, b.label)
    data.samples = str(prepared)
    return cfg.model_copy(update={"data": data, "infer": cfg.infer.model_copy(update={"split": b.split})})


def prepare(cfg: Config, i: int) -> Path:
    from medlava.stages.prepare import run as run_prepare

    bcfg = benchmark_cfg(cfg, i)
    path = Path(bcfg.data.samples)
    if is_complete(path):
        log.info("suite: %s is prepared (%s)", cfg.suite.benchmarks[i].label, path)
        return path
    return run_prepare(bcfg.model_copy(update={"run_id": path.name}))


def _inputs(cfg: Config, i: int, run: Path):
    from medlava.infer.chunks import check_source
    from medlava.stages.infer import answer_source, load_inputs

    bcfg = benchmark_cfg(cfg, i)
    if not is_complete(Path(bcfg.data.samples)):
        raise FileNotFoundError(
            f"{bcfg.data.samples} is not a complete prepare run: run the suite's prepare step "
            "first (`medlava suite --prepare-only`)"
        )
    samples, image_root, _, origin = load_inputs(bcfg)
    source = answer_source(bcfg, image_root, origin)
    folder = run / cfg.suite.benchmarks[i].label / "chunks"
    check_source(folder, source)
    return samples, image_root, source, folder


def answer(cfg: Config, dist, run: Path, chunks: list[int]) -> None:
    """Answer the given chunks of every benchmark; the model is loaded once, when there is work left."""
    from medlava.infer.chunks import check_source, chunk_path
    from medlava.stages.infer import load_answerer
    from medlava.train.runtime import tensorboard

    model, writer = None, tensorboard(run, None, dist)
    inputs = [_inputs(cfg, i, run) for i in range(len(cfg.suite.benchmarks))]  # read once, not once per chunk
    for i, c in ((i, c) for c in chunks for i in range(len(cfg.suite.benchmarks))):
        samples, image_root, source, folder = inputs[i]
        if chunk_path(folder, c, cfg.infer.chunks).exists():
            continue
        check_source(folder, source, claim=True)
        model = model or load_answerer(cfg, source, image_root, dist)
        stats = model.for_images(image_root).answer_chunk(samples, c, folder, source)
        if writer and stats.answers:
            writer.add_scalar(f"infer/{cfg.suite.benchmarks[i].label}/answers_per_s", stats.answers_per_s, c)
    if writer:
        writer.close()


def merge(cfg: Config, run: Path, writer) -> list[dict]:
    """Each benchmark's answers merged, scored into <benchmark>/eval, and its leaderboard rows."""
    from medlava.artifacts import step_of
    from medlava.eval.closed import read_predictions
    from medlava.eval.leaderboard import benchmark_rows
    from medlava.eval.run import evaluate
    from medlava.eval.tensorboard import write_eval_tensorboard
    from medlava.eval.vqa import load_closed_vocab
    from medlava.infer.answer import answer_shares
    from medlava.infer.chunks import merge_chunks
    from medlava.io import atomic_write_jsonl
    from medlava.predictions import answers_frame, write_predictions

    rows = []
    for i, b in enumerate(cfg.suite.benchmarks):
        samples, image_root, source, folder = _inputs(cfg, i, run)
        out = run / b.label
        answers = merge_chunks(folder, cfg.infer.chunks, [s["id"] for s in samples], source)
        atomic_write_jsonl(out / "answers.jsonl", answers)
        step = step_of(source["infer.checkpoint"])
        if writer:
            for k, v in answer_shares(answers).items():
                writer.add_scalar(f"infer/{b.label}/{k}", v, step)
        write_predictions(out / "predictions.csv", answers_frame(answers))
        train = Path(source["data.samples"]) / "train.jsonl"
        vocab = load_closed_vocab(train) if train.exists() else []
        metrics = evaluate(
            out / "predictions.csv",
            out / "eval",
            cfg.eval.model_copy(update={"family": "vqa"}),
            vocab=vocab,
            vocab_source=str(train) if vocab else None,
        )
        write_eval_tensorboard(out / "eval", metrics, read_predictions(out / "predictions.csv"), step, image_root)
        rows += benchmark_rows(
            b.label, b.dataset, out / "eval" / "per_sample.csv", cfg.suite.n_bootstrap, cfg.suite.seed
        )
    return rows


def run(
    cfg: Config, dist=None, chunk_idx: int | None = None, merge_only: bool = False, prepare_only: bool = False
) -> Path:
    from medlava.artifacts import step_of
    from medlava.eval.leaderboard import write_leaderboard
    from medlava.stages.infer import resolved_checkpoint
    from medlava.train.runtime import tensorboard

    if not cfg.suite.benchmarks:
        raise ConfigError("suite.benchmarks is empty: list the benchmarks to score (jobs/configs/medvqa_suite.yaml)")
    rank = dist.rank if dist is not None else 0
    if cfg.suite.synthetic and (prepare_only or (chunk_idx is None and not merge_only)):
        from medlava.data.synthetic_benchmarks import ensure_synthetic_suite

        ensure_synthetic_suite(Path(cfg.data.root))
    if prepare_only:
        for i in range(len(cfg.suite.benchmarks)):
            prepare(cfg, i)
        return stage_root(cfg, "prepare")
    cfg.vlm("suite")
    run = start_run(cfg, "suite", rank)  # answering tasks and the merge share it, until it is complete
    if chunk_idx is None and not merge_only:
        for i in range(len(cfg.suite.benchmarks)):
            prepare(cfg, i)
    if not merge_only:
        answer(cfg, dist, run, [chunk_idx] if chunk_idx is not None else list(range(cfg.infer.chunks)))
    if chunk_idx is not None and not merge_only:
        return run
    writer = tensorboard(run, None, dist)
    rows = merge(cfg, run, writer)
    checkpoint = resolved_checkpoint(cfg)
    step = step_of(checkpoint)
    df = write_leaderboard(rows, run, f"{cfg.name}: {checkpoint}")
    if writer:
        for r in rows:
            writer.add_scalar(f"suite/{r['benchmark']}/{r['row']}", r["score"], step)
        writer.close()
    mark_complete(
        run,
        {
            "leaderboard": "leaderboard.csv",
            "checkpoint": checkpoint,
            "step": step,
            "benchmarks": [b.label for b in cfg.suite.benchmarks],
            "rows": len(df),
        },
    )
    log.info("suite: %d benchmarks scored; leaderboard -> %s", len(cfg.suite.benchmarks), run / "leaderboard.md")
    print((run / "leaderboard.md").read_text(), flush=True)
    return run
