"""RadEval's report metrics in medlava, offline on tiny random weights in each metric's real file format
(tests/fixtures/metric_weights.py): every number equals RadEval called directly on the same reports and cache,
chunked equals unchunked, a killed chunk resumes with no report lost or scored twice, and bad input or a
missing or damaged weight is refused with the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import submitit  # noqa: F401  (configures logging when imported, closing every handler: absl's, made when RadEval

# loads ROUGE, would close pytest's capture stream if the submit test imported submitit after it)
from fixtures.metric_weights import build
from medlava.cli import main
from medlava.config import EvalConfig
from medlava.eval import radeval_scorers
from medlava.eval.radeval_scorers import SCORERS, import_radeval, use_cache
from medlava.eval.weights import MANIFEST, verify_staged

STAGED = ["bertscore", "f1chexbert", "radgraph", "radcliq", "green"]
ALL = ["bleu", "rouge", *STAGED]
REFS = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small right pleural effusion, unchanged.",
    "Left lower lobe opacity may represent atelectasis.",
    "Lungs are clear without focal consolidation.",
    "Possible pneumonia in the right lower lobe.",
    "No acute cardiopulmonary process.",
    "Moderate pulmonary edema with bilateral pleural effusion.",
    "Right IJ catheter tip in the mid SVC.",
]
HYPS = [
    "No pleural effusion. The heart size is normal.",
    "Moderate cardiomegaly with bilateral pleural effusion.",
    "Left lower lobe atelectasis.",
    "",
    "Right lower lobe consolidation, possible pneumonia.",
    "Mediastinal contours are stable.",
    "Mild pulmonary edema. Small left effusion.",
    "Chest tube in place.",
]
IDS = [f"s{i}" for i in range(len(REFS))]
SCORED = [i for i, h in enumerate(HYPS) if h]  # s3's generated report is empty: counted, not scored


def hold_cache_env(mp: pytest.MonkeyPatch) -> None:
    """Register what use_cache() changes, so the module's end restores it for the other tests."""
    import os

    from huggingface_hub import constants

    for var in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(var, os.environ[var]) if var in os.environ else mp.delenv(var, raising=False)
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE"):
        mp.setattr(constants, name, getattr(constants, name))
    import_radeval()
    from radeval.metrics.f1chexbert import f1chexbert
    from radeval.metrics.radgraph._vendor import core

    for module in (f1chexbert, core):
        mp.setattr(module, "CACHE_DIR", module.CACHE_DIR)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        hold_cache_env(mp)
        yield build(tmp_path_factory.mktemp("metric-weights"), STAGED)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reports")
    pd.DataFrame({"study_id": IDS, "report": REFS}).to_csv(folder / "gt.csv", index=False)
    pd.DataFrame({"study_id": IDS, "report": HYPS}).iloc[::-1].to_csv(folder / "pred.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def direct(cache):
    """RadEval itself, as its README calls it, on the pairs medlava scores, reading the same cache."""
    use_cache(cache)
    from radeval import RadEval
    from radeval.metrics.f1chexbert.adapter import F1CheXbertMetric
    from radeval.metrics.f1chexbert.f1chexbert import F1CheXbert

    refs, hyps = [REFS[i] for i in SCORED], [HYPS[i] for i in SCORED]
    out = {}
    for name in ALL:
        evaluator = RadEval(metrics=[name] if name != "f1chexbert" else [], detailed=True, show_progress=False)
        if name == "f1chexbert":  # RadEval's adapter hard-codes device="cuda"; this machine has none
            metric = F1CheXbertMetric.__new__(F1CheXbertMetric)
            metric._scorer = F1CheXbert(device="cpu")
            evaluator._active_metrics = [metric]
        detailed = evaluator(refs=refs, hyps=hyps)
        evaluator.detailed, evaluator.per_sample = False, True
        out[name] = (detailed, evaluator(refs=refs, hyps=hyps))
    if "green" in out:
        out["green_analysis"] = evaluator._active_metrics[0]._scorer.completions
    return out


@pytest.fixture(scope="module")
def unchunked(cache, reports):
    out = reports / "unchunked"
    assert (
        main(
            [
                "metrics",
                "--gt",
                str(reports / "gt.csv"),
                "--pred",
                str(reports / "pred.csv"),
                "--out",
                str(out),
                "--metric-cache",
                str(cache),
                "--report-metrics",
                ",".join(ALL),
                "--n-bootstrap",
                "200",
            ]
        )
        == 0
    )
    return json.loads((out / "metrics.json").read_text()), pd.read_csv(out / "per_sample.csv")


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return math.isclose(a, b, abs_tol=1e-6)


def test_every_number_equals_radeval_called_directly(direct, unchunked):
    metrics, per = unchunked
    assert metrics["radeval_metrics"] == ALL and metrics["radeval_pairs"] == len(SCORED)
    assert metrics["radeval_skipped"] == {"empty_report": 1, "ids": ["s3"]}
    for name in ALL:
        detailed, per_sample = direct[name]
        for key, want in detailed.items():
            assert _close(metrics["radeval"][key], want), (name, key, metrics["radeval"][key], want)
        for col, values in per_sample.items():
            got = per.set_index("id").loc[[IDS[i] for i in SCORED], col].to_numpy(float)
            assert got == pytest.approx(np.array(values, dtype=float), abs=1e-6), (name, col)
    assert per.set_index("id").loc["s3", ["bleu", "radgraph_partial", "green"]].isna().all()
    assert (
        per.set_index("id").loc[[IDS[i] for i in SCORED], "green_analysis"].fillna("").tolist()
        == direct["green_analysis"]
    )
    # the tiny weights give informative numbers, not constants
    assert 0 < metrics["radeval"]["radgraph_partial"] < 1 and 0 < metrics["radeval"]["f1chexbert_all_macro_f1"] < 1
    assert per["radcliq_v1"].nunique() == len(SCORED)
    for key, (low, high) in metrics["radeval_ci95"].items():
        assert low - 1e-9 <= metrics["radeval"][key] <= high + 1e-9 or key == "radcliq_v1", key


def test_bootstrap_statistics_reproduce_radeval_at_unit_weights(direct, unchunked):
    """The vectorised statistics the intervals resample (corpus BLEU, 1/RadCliQ, means) equal RadEval's results
    at unit weights: BLEU against RadEval's unrounded scorer, the rest against its results (rounded to 4 places)."""
    _, per = unchunked
    rows = per.set_index("id").loc[[IDS[i] for i in SCORED]]
    refs, hyps = [REFS[i] for i in SCORED], [HYPS[i] for i in SCORED]
    ones = np.ones((1, len(SCORED)))
    raw = radeval_scorers.adapter("bleu")._compute_raw(refs, hyps)["bleu"]
    unrounded = {"bleu": raw["aggregate"], **raw["detailed"]}
    for name in ("bleu", "radcliq", "radgraph", "rouge", "bertscore", "green"):
        columns = list(SCORERS[name].columns)
        scores = [dict(zip(columns, r)) for r in rows[columns].itertuples(index=False)]
        for key, value in SCORERS[name].resampled(scores, refs, hyps, ones).items():
            want, tol = (unrounded[key], 1e-12) if name == "bleu" else (direct[name][0][key], 5e-5 + 1e-12)
            assert value[0] == pytest.approx(want, abs=tol), key


def test_f1chexbert_resampled_f1s_match_radeval_on_labels():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 2, (40, 14)).tolist(), rng.integers(0, 2, (40, 14)).tolist()
    truth[0] = [0] * 14  # a report with no positive label, and a label nobody has
    for row in truth:
        row[3] = 0
    scores = [{"ref_labels": t, "hyp_labels": p} for t, p in zip(truth, pred)]
    want = radeval_scorers.F1CheXbert.from_labels(truth, pred)
    got = radeval_scorers.F1CheXbert.resampled(scores, [], [], np.ones((1, 40)))
    for key in radeval_scorers.F1CheXbert.RESULTS:
        assert got[key][0] == pytest.approx(want[key], abs=1e-12), key


def test_chunked_equals_unchunked_and_a_killed_chunk_resumes(cache, reports, unchunked, monkeypatch):
    from medlava.eval.radiology import evaluate_reports, join_reports, read_reports
    from medlava.eval.report_radeval import chunk_file, merge_scores, scorable, select_metrics

    df = join_reports(read_reports(reports / "gt.csv"), read_reports(reports / "pred.csv"), "gt", "pred")
    cfg = EvalConfig(report_metrics=ALL, metric_cache=str(cache), chunks=3, batch_size=2, n_bootstrap=200)
    out, folder = reports / "chunked", reports / "chunked" / "radeval-chunks"
    calls = {"n": 0}
    score = SCORERS["radgraph"].score

    def killed_after_one_batch(self, refs, hyps):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("the task was killed")
        return score(self, refs, hyps)

    monkeypatch.setattr(SCORERS["radgraph"], "score", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_reports(df, out, cfg, "test")
    partial = sorted(folder.glob("*.partial.jsonl"))
    written = [line for f in folder.glob("scores-*.jsonl") for line in f.read_text().splitlines()]
    assert len(partial) == 1 and len(written) == 2  # the batch before the kill survived (2 reports a batch)
    with partial[0].open("a") as f:
        f.write('{"id": "s')  # torn mid-write
    monkeypatch.setattr(SCORERS["radgraph"], "score", score)
    metrics = evaluate_reports(df, out, cfg, "test")
    rows = [json.loads(line) for i in range(3) for line in chunk_file(folder, i, 3).read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(IDS[i] for i in SCORED)  # each scored report exactly once
    want, want_per = unchunked
    assert _close(metrics["radeval"], want["radeval"])
    per = pd.read_csv(out / "per_sample.csv").set_index("id")
    numeric = [c for c in want_per.columns if c != "green_analysis"]
    assert np.allclose(
        per.loc[want_per["id"], numeric[1:]].to_numpy(float),
        want_per.set_index("id")[numeric[1:]].to_numpy(float),
        atol=1e-6,
        equal_nan=True,
    )
    # a report present twice across chunks is refused at the merge, naming it
    with chunk_file(folder, 0, 3).open("a") as f:
        f.write(json.dumps(rows[-1]) + "\n")
    pairs, _ = scorable(df)
    with pytest.raises(ValueError, match=f"1 scored twice \\['{rows[-1]['id']}'\\]"):
        merge_scores(pairs, select_metrics(cfg), 3, folder, 0)


def test_bad_input_and_missing_or_damaged_weights_are_refused(cache, reports, tmp_path, capsys):
    gt, pred = reports / "gt.csv", reports / "pred.csv"
    (tmp_path / "latin1.csv").write_bytes("study_id,report\ns0,Cardiomégalie\n".encode("latin-1"))
    assert (
        main(["metrics", "--gt", str(tmp_path / "latin1.csv"), "--pred", str(pred), "--out", str(tmp_path / "o")]) == 2
    )
    assert "latin1.csv: not a readable reports CSV ('utf-8' codec can't decode" in capsys.readouterr().err
    assert verify_staged(cache, STAGED) == []
    damaged = tmp_path / "cache"
    import shutil

    shutil.copytree(cache, damaged, symlinks=True)
    weights = next((damaged / "radgraph").rglob("weights.th"))
    weights.write_bytes(weights.read_bytes()[:100])
    config = next((damaged / "hub").glob("models--distilbert-base-uncased/snapshots/*/config.json"))
    config.unlink()
    problems = verify_staged(damaged, STAGED)
    assert any(
        p.startswith(f"radgraph: {weights} is damaged (100 bytes")
        and f"medlava weights fetch --metrics radgraph --cache {damaged}" in p
        for p in problems
    ), problems
    assert any(p.startswith(f"bertscore: {config} is missing") for p in problems), problems
    out = tmp_path / "refused"
    assert (
        main(
            [
                "metrics",
                "--gt",
                str(gt),
                "--pred",
                str(pred),
                "--out",
                str(out),
                "--metric-cache",
                str(damaged),
                "--report-metrics",
                "bleu,radgraph",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "eval.report_metrics: cannot run radgraph:" in err and "weights.th is damaged" in err and not out.exists()
    (damaged / MANIFEST).unlink()
    assert (
        main(
            [
                "metrics",
                "--gt",
                str(gt),
                "--pred",
                str(pred),
                "--out",
                str(out),
                "--metric-cache",
                str(damaged),
                "--report-metrics",
                "f1chexbert",
            ]
        )
        == 2
    )
    assert f"no staged weights in {damaged}" in capsys.readouterr().err


def test_default_metrics_run_what_can_run_and_say_why_not_the_rest(reports, tmp_path, capsys):
    out = tmp_path / "default"
    assert (
        main(
            [
                "metrics",
                "--gt",
                str(reports / "gt.csv"),
                "--pred",
                str(reports / "pred.csv"),
                "--out",
                str(out),
                "--metric-cache",
                str(tmp_path / "nothing-staged"),
                "--n-bootstrap",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["radeval_metrics"] == ["bleu", "rouge"] and "chexpert_rules_f1_micro_14" in metrics
    assert set(metrics["radeval_unavailable"]) == {"bertscore", "f1chexbert", "radgraph", "radcliq", "ratescore"}
    assert "medlava weights fetch --metrics f1chexbert" in metrics["radeval_unavailable"]["f1chexbert"]
    assert "not run" in capsys.readouterr().out
    why = radeval_scorers.importable("ratescore")
    if why:  # this environment: medspacy cannot import under numpy 2 on Python 3.11
        assert "medspacy" in metrics["radeval_unavailable"]["ratescore"] and "Python >= 3.12" in why


def test_eval_stage_array_tasks_then_one_merge(cache, reports, unchunked, tmp_path):
    """The eval job of a report run: chunk tasks score into the run's radeval-chunks, the merge refuses until
    every chunk is there, then writes metrics equal to the one-process run, TensorBoard and published.png."""
    from conftest import TINY
    from medlava.config import load_config
    from medlava.runs import is_complete
    from medlava.stages.eval import run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    preds = pd.DataFrame({"id": IDS, "reference": REFS, "prediction": HYPS, "task": "report"})
    preds.to_csv(tmp_path / "predictions.csv", index=False)
    metrics = ["bleu", "f1chexbert", "radgraph"]
    cfg = load_config(
        TINY,
        [
            f"output_root={tmp_path / 'runs'}",
            "run_id=e",
            f"eval.predictions={tmp_path}/predictions.csv",
            f"eval.report_metrics=[{','.join(metrics)}]",
            f"eval.metric_cache={cache}",
            "eval.chunks=2",
            "eval.n_bootstrap=50",
        ],
    )
    with pytest.raises(FileNotFoundError, match="2 of 2 chunks are not finished"):
        run(cfg, merge_only=True)
    for idx in (1, 0):
        run(cfg, chunk_idx=idx)
    out = run(cfg, merge_only=True)
    got = json.loads((out / "metrics.json").read_text())
    want = unchunked[0]["radeval"]
    assert got["radeval_metrics"] == metrics and is_complete(out)
    for key, value in got["radeval"].items():
        assert _close(value, want[key]), key
    assert (out / "published.png").stat().st_size > 10_000
    board = EventAccumulator(str(out / "tensorboard")).Reload()
    assert board.Scalars("eval/radeval/radgraph_partial")[0].value == pytest.approx(want["radgraph_partial"], abs=1e-6)
    assert board.Scalars("eval/chexpert_rules_f1_micro_14")
    (text,) = board.Tags()["tensors"]
    assert text.startswith("eval/worst_reports_by_radgraph_partial")


def test_submit_checks_the_weights_before_queueing_and_arrays_the_metric_job(cache, tmp_path, capsys):
    from conftest import TINY
    from medlava.cluster.submit import main as submit

    (tmp_path / "p.csv").write_text("id,reference,prediction\n")  # the launcher checks that the input exists
    common = [
        "eval",
        "--config",
        str(TINY),
        "--executor",
        "slurm",
        "--dry-run",
        "--gpus",
        "0",
        "--cpus-per-task",
        "1",
        "--output-root",
        str(tmp_path / "o"),
        "run_id=s",
        f"eval.predictions={tmp_path / 'p.csv'}",
        "eval.report_metrics=[f1chexbert,radgraph]",
    ]
    assert submit([*common, "--chunks", "3", f"eval.metric_cache={cache}"]) == 0
    jobs = capsys.readouterr().out.split("# ---- job ")[1:]
    assert [j.split()[1].rstrip(";") for j in jobs] == ["eval-chunks", "eval-merge"]
    assert "#SBATCH --array=0-2%3" in jobs[0] and "eval.chunks=3" in jobs[0]
    assert '--chunk-idx "${SLURM_ARRAY_TASK_ID}"' in jobs[0] and "--merge-only" in jobs[1]
    assert "#SBATCH --dependency='afterok:<eval-chunks job id>'" in jobs[1]
    empty = tmp_path / "empty"
    assert submit([*common, f"eval.metric_cache={empty}"]) == 2
    out, err = capsys.readouterr()
    assert "# ---- job" not in out
    assert (
        f"submit: refused: eval.report_metrics: cannot run f1chexbert: no staged weights in {empty} "
        f"(no medlava-metric-weights.json); where there is internet run `medlava weights fetch --metrics "
        f"f1chexbert --cache {empty}`; radgraph: no staged weights in {empty}"
    ) in err


def test_weights_fetch_stages_exactly_what_each_metric_loads(cache, tmp_path, capsys):
    """`medlava weights fetch` against a hub serving the tiny repos (plus files no metric needs): the staged
    cache holds the same files with the same hashes as the one the metrics were tested on."""
    import shutil
    import tarfile

    from medlava.eval.weights import RRG_SCORERS, radgraph_dir, repo_folder, snapshot_dir
    from medlava.tools.weights import fetch
    from medlava.tools.weights import main as weights_main

    archives = tmp_path / "archives"
    archives.mkdir()
    for model in ("radgraph", "radgraph-xl"):
        with tarfile.open(archives / f"{model}.tar.gz", "w:gz") as tar:
            for f in sorted(radgraph_dir(cache, model).rglob("*")):
                tar.add(f, arcname=str(f.relative_to(radgraph_dir(cache, model))), recursive=False)
    decoys = ["pytorch_model.bin", "onnx/model.onnx", "flax_model.msgpack", "README.md"]

    class Hub:  # the tiny repos as a hub would list and serve them, with files no metric loads
        def source(self, repo):
            if repo == RRG_SCORERS:
                return {
                    "chexbert.pth": snapshot_dir(cache / "chexbert", repo) / "chexbert.pth",
                    **{p.name: p for p in archives.iterdir()},
                }
            return {p.name: p for p in snapshot_dir(cache / "hub", repo).iterdir()}

        def files(self, repo):
            return [*self.source(repo), *decoys]

        def download(self, repo, filename, cache_dir):
            assert filename not in decoys, f"{repo}/{filename} is not needed"
            rev = (
                (
                    repo_folder(cache / ("chexbert" if filename == "chexbert.pth" else "hub"), repo) / "refs" / "main"
                ).read_text()
                if repo != RRG_SCORERS or filename == "chexbert.pth"
                else "0" * 40
            )
            root = repo_folder(Path(cache_dir), repo)
            (root / "refs").mkdir(parents=True, exist_ok=True)
            (root / "refs" / "main").write_text(rev)
            (root / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
            return Path(shutil.copy(self.source(repo)[filename], root / "snapshots" / rev / filename))

    staged = tmp_path / "staged"
    manifest = fetch(STAGED, staged, Hub())
    original = json.loads((cache / MANIFEST).read_text())["metrics"]
    assert manifest["metrics"] == original
    assert not list((staged / "hub").rglob("pytorch_model.bin"))
    assert weights_main(["check", "--metrics", ",".join(STAGED), "--cache", str(staged)]) == 0
    next((staged / "hub").rglob("models--bert-base-uncased/snapshots/*/tokenizer.json")).write_text("{}")
    assert weights_main(["check", "--metrics", "f1chexbert,bertscore", "--cache", str(staged)]) == 1
    out = capsys.readouterr().out
    assert "f1chexbert: " in out and "tokenizer.json is damaged" in out and "bertscore" not in out.split("\n")[-2]


def test_doctor_verifies_the_metrics_a_job_will_run(cache, tmp_path):
    from medlava.tools.doctor import check_metric_weights

    (ok,) = check_metric_weights(cache, ["radgraph"])
    assert ok.status == "OK" and "verified" in ok.detail
    (staged,) = check_metric_weights(cache, None)
    assert staged.status == "OK" and "bertscore, f1chexbert, green, radcliq, radgraph" in staged.detail
    (none,) = check_metric_weights(tmp_path, None)
    assert (
        none.status == "WARN" and "medlava weights fetch --metrics bertscore,f1chexbert,radgraph,radcliq," in none.fix
    )
    failed = check_metric_weights(tmp_path, ["f1chexbert", "ratescore"])
    assert [c.status for c in failed] == ["FAIL", "FAIL"] and "no staged weights" in failed[0].detail


def test_readme_table_is_the_published_data_and_published_png_draws_it(tmp_path):
    """README's table of published results is medlava.eval.published_reports's, number for number."""
    from conftest import ROOT
    from medlava.eval.published_reports import LABELS, PUBLISHED, plot_published

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| model | F1-CheXbert macro-14") :].split("\n\n")[0].splitlines()[2:]
    keys = list(LABELS)
    for row, result in zip(table, PUBLISHED, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert result.model.startswith(cells[0])
        assert {k: float(v) for k, v in zip(keys, cells[1:8]) if v} == pytest.approx(result.values), cells[0]
    assert plot_published({"ratescore": 0.5, "bleu": 0.1}, tmp_path / "p.png").stat().st_size > 5_000
    assert plot_published({"bleu": 0.1}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@pytest.mark.skipif(
    radeval_scorers.importable("ratescore") is not None,
    reason="RaTEScore needs medspacy, which imports only on Python >= 3.12 with numpy 2 (README)",
)
def test_ratescore_equals_radeval_called_directly(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        hold_cache_env(mp)
        cache = build(tmp_path_factory.mktemp("rate-weights"), ["ratescore"])
        use_cache(cache)
        from radeval import RadEval

        refs, hyps = [REFS[i] for i in SCORED], [HYPS[i] for i in SCORED]
        want = RadEval(metrics=["ratescore"], detailed=True, show_progress=False)(refs=refs, hyps=hyps)
        scores = SCORERS["ratescore"]("ratescore", refs).score(refs, hyps)
        assert SCORERS["ratescore"].result(scores, refs, hyps) == pytest.approx(want, abs=1e-6)
