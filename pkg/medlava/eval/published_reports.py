"""Published report-generation results on the MIMIC-CXR official test split (findings section), keyed by the
RadEval result that computes the same metric, and `published.png`: a run's numbers beside them.

Only metrics with the same definition are set side by side: F1-CheXbert (the f1chexbert package's CheXbert
labels, uncertain counted as positive), 1/RadCliQ-v1, RaTEScore and GREEN. ReXrank's BLEU (BLEU-2 after
CXR-Report-Metric's tokenisation), BERTScore (distilroberta-base; RadEval's `bertscore` uses
distilbert-base-uncased) and RadGraph (entity+relation F1 of RadGraph v1; RadEval's `radgraph` is
F1-RadGraph of RadGraph-XL) are other computations and are left out. README.md prints the same table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medlava.eval.plots import figure
from medlava.io import atomic_savefig

LABELS = {
    "f1chexbert_all_macro_f1": "F1-CheXbert macro-14",
    "f1chexbert_all_micro_f1": "F1-CheXbert micro-14",
    "f1chexbert_5_macro_f1": "F1-CheXbert macro-5",
    "f1chexbert_5_micro_f1": "F1-CheXbert micro-5",
    "radcliq_v1": "1/RadCliQ-v1",
    "ratescore": "RaTEScore",
    "green": "GREEN",
}
REXRANK = (
    "https://github.com/rajpurkarlab/ReXrank/blob/0b9b62e445307688f685d686cf6ef117d1cc4a2e/"
    "results/findings_result_mimiccxr.csv"
)


@dataclass(frozen=True)
class Result:
    model: str
    source: str
    values: dict[str, float]


def _chexbert(macro14: float, micro14: float, macro5: float, micro5: float) -> dict[str, float]:
    return {
        "f1chexbert_all_macro_f1": macro14 / 100,
        "f1chexbert_all_micro_f1": micro14 / 100,
        "f1chexbert_5_macro_f1": macro5 / 100,
        "f1chexbert_5_micro_f1": micro5 / 100,
    }


def _rexrank(radcliq_inv: float, ratescore: float, green: float) -> dict[str, float]:
    return {"radcliq_v1": radcliq_inv, "ratescore": ratescore, "green": green}


PUBLISHED = (
    Result(
        "CheXagent-2-3b",
        "https://github.com/Stanford-AIMI/CheXagent/blob/03a39c6dbcf62d10188632b4f002f9e3434d12f3/"
        "README.md (Evaluation)",
        _chexbert(44.9, 58.0, 55.3, 62.5),
    ),
    Result(
        "MAIRA-2", "Bannur et al. 2024, arXiv:2406.04449 (MIMIC-CXR findings table)", _chexbert(41.6, 58.1, 50.4, 59.1)
    ),
    Result(
        "LLaVA-Rad",
        "Bannur et al. 2024, arXiv:2406.04449 (MIMIC-CXR findings table)",
        _chexbert(39.5, 57.3, 47.7, 57.4),
    ),
    Result("MedVersa (ReXrank)", REXRANK, _rexrank(1.103, 0.550, 0.374)),
    Result("Libra (ReXrank)", REXRANK, _rexrank(0.898, 0.523, 0.356)),
    Result("CXRMate-RRG24 (ReXrank)", REXRANK, _rexrank(0.870, 0.521, 0.338)),
    Result("MedGemma (ReXrank)", REXRANK, _rexrank(0.744, 0.549, 0.293)),
    Result("CheXagent (ReXrank)", REXRANK, _rexrank(0.741, 0.474, 0.257)),
    Result("MAIRA-2 (ReXrank)", REXRANK, _rexrank(0.694, 0.517, 0.224)),
)


def plot_published(run: dict[str, float], path: str | os.PathLike, label: str = "this run") -> Path | None:
    """One panel per metric the run has and some publication reports: the published values and the run's,
    on one axis. None (nothing written) when no metric is shared."""
    keys = [k for k in LABELS if isinstance(run.get(k), (int, float)) and any(k in r.values for r in PUBLISHED)]
    if not keys:
        return None
    rows = max(sum(k in r.values for r in PUBLISHED) for k in keys) + 1
    fig = figure(4.2 * min(len(keys), 4), (0.32 * rows + 1.2) * ((len(keys) + 3) // 4))
    for i, key in enumerate(keys):
        ax = fig.add_subplot((len(keys) + 3) // 4, min(len(keys), 4), i + 1)
        bars = [(r.model, r.values[key]) for r in PUBLISHED if key in r.values] + [(label, float(run[key]))]
        colours = ["#9aa5b1"] * (len(bars) - 1) + ["#d1495b"]
        ax.barh(range(len(bars)), [v for _, v in bars], color=colours)
        ax.set_yticks(range(len(bars)), [m for m, _ in bars], fontsize=7)
        ax.invert_yaxis()
        for y, (_, v) in enumerate(bars):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=6)
        ax.set_xlim(0, max(v for _, v in bars) * 1.25)
        ax.set_title(LABELS[key], fontsize=9)
    fig.suptitle("MIMIC-CXR test, findings: published results (grey) and this run", fontsize=10)
    return atomic_savefig(fig, path, dpi=130)
