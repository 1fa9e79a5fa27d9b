"""The suite's leaderboard from per-sample results: rows by each benchmark's published protocol, bootstrap
intervals, published scores only where the metric matches (with sources), and two runs compared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from medlava.eval.leaderboard import (
    benchmark_rows,
    bootstrap_ci,
    compare_leaderboards,
    comparison_markdown,
    leaderboard,
    markdown,
    published,
    write_leaderboard,
)


def _per_sample(tmp, name, rows):
    path = tmp / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture()
def rows(tmp_path):
    rad = _per_sample(
        tmp_path,
        "rad",
        [
            {
                "id": i,
                "task": t,
                "llava_med_closed_hit": h if t == "closed" else False,
                "llava_med_open_recall": r,
                "correct": False,
                "mmmu_correct": None,
            }
            for i, (t, h, r) in enumerate(
                [
                    ("closed", True, 0),
                    ("closed", True, 0),
                    ("closed", False, 0),
                    ("closed", True, 0),
                    ("open", False, 0.5),
                    ("open", False, 1.0),
                ]
            )
        ],
    )
    mmmu = _per_sample(
        tmp_path,
        "mmmu",
        [
            {
                "id": i,
                "task": "multiple_choice" if i < 4 else "open",
                "subject": s,
                "correct": c,
                "mmmu_correct": c,
                "llava_med_closed_hit": False,
                "llava_med_open_recall": 0,
            }
            for i, (s, c) in enumerate(
                [
                    ("Pharmacy", True),
                    ("Pharmacy", False),
                    ("Clinical_Medicine", True),
                    ("Clinical_Medicine", True),
                    ("Pharmacy", True),
                ]
            )
        ],
    )
    return benchmark_rows("vqa_rad", "vqa_rad", rad, n_bootstrap=200) + benchmark_rows(
        "mmmu_med", "mmmu_med", mmmu, n_bootstrap=200
    )


def test_rows_follow_each_published_protocol(rows):
    got = [(r["benchmark"], r["row"], r["metric"], r["n"], r["score"]) for r in rows]
    assert got == [
        ("vqa_rad", "closed", "llava_med_closed_accuracy", 4, 75.0),
        ("vqa_rad", "open", "llava_med_open_recall", 2, 75.0),
        ("mmmu_med", "all", "mmmu_accuracy", 5, 80.0),
        ("mmmu_med", "Clinical_Medicine", "mmmu_accuracy", 2, 100.0),
        ("mmmu_med", "Pharmacy", "mmmu_accuracy", 3, pytest.approx(66.67)),
    ]
    closed = rows[0]
    assert 0 <= closed["ci_low"] <= 75.0 <= closed["ci_high"] <= 100


def test_bootstrap_ci_by_hand():
    lo, hi = bootstrap_ci(np.array([1.0] * 50 + [0.0] * 50), 2000)
    assert lo == pytest.approx(0.4, abs=0.03) and hi == pytest.approx(0.6, abs=0.03)  # +-1.96 * 0.05
    assert bootstrap_ci(np.array([1.0]), 100) == (None, None)


def test_published_scores_only_on_rows_with_the_same_metric(rows, tmp_path):
    df, used = leaderboard(rows)
    by = df.set_index(["benchmark", "row"])
    assert by.loc[("vqa_rad", "closed"), "LLaVA-Med (from LLaVA), fine-tuned"] == 84.19
    assert by.loc[("vqa_rad", "open"), "LLaVA-Med (from LLaVA), fine-tuned"] == 61.52
    assert by.loc[("mmmu_med", "all"), "Lingshu-7B"] == 54.0 and by.loc[("mmmu_med", "all"), "HuatuoGPT-V-7B"] == 47.3
    assert pd.isna(by.loc[("mmmu_med", "Pharmacy"), "Lingshu-7B"])  # no per-subject number was published
    assert pd.isna(by.loc[("vqa_rad", "closed"), "Lingshu-7B"])  # MedEvalKit's VQA-RAD is another protocol
    assert used == ["lingshu_report", "llava_med_paper"]
    text = markdown(df, used, "suite")
    sources, _ = published()
    assert sources["llava_med_paper"] in text and "run_eval_batch.py" in text
    assert (
        "Published with other protocols" in text and "medevalkit_accuracy: Lingshu-7B 67.9 (`lingshu_report`)" in text
    )
    write_leaderboard(rows, tmp_path, "suite")
    assert {p.name for p in tmp_path.glob("leaderboard.*")} == {"leaderboard.csv", "leaderboard.md", "leaderboard.png"}


def test_two_runs_side_by_side(rows):
    a, _ = leaderboard(rows)
    b = a.assign(score=a["score"] + 5.0)
    both = compare_leaderboards({"zero-shot": a, "fine-tuned": b})
    assert (both["fine-tuned - zero-shot"] == 5.0).all() and len(both) == len(a)
    text = comparison_markdown(both, ["zero-shot", "fine-tuned"])
    assert "| VQA-RAD | closed | llava_med_closed_accuracy | 75.00 [" in text and "+5.00" in text
