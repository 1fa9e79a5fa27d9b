"""The weights of the model-based report metrics: where each one lives in a staged cache, the manifest that
records their sizes and hashes, and the check that refuses a missing or damaged file before a job starts.

A staged cache DIR is both HF_HOME and XDG_CACHE_HOME for the metrics, because RadEval finds its weights in
three places: Hugging Face repos in DIR/hub, f1chexbert's checkpoint in DIR/chexbert (appdirs' user cache of
"chexbert") and RadGraph's extracted archives in DIR/radgraph/0.1.18/<model>. `medlava weights fetch` fills
it where there is internet; compute nodes only read it (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from medlava.io import file_sha256

MANIFEST = "medlava-metric-weights.json"
VERIFIED = ".medlava-verified.json"  # size/mtime of files whose hash matched, so a re-check does not re-hash
RRG_SCORERS = "StanfordAIMI/RRG_scorers"
RADGRAPH_VERSION = "0.1.18"  # the cache folder RadEval's vendored RadGraph reads


@dataclass(frozen=True)
class Needs:
    repos: tuple[str, ...] = ()
    """Hugging Face repos read through the hub cache (config, tokenizer, weights)."""
    chexbert: bool = False
    """chexbert.pth of StanfordAIMI/RRG_scorers in the `chexbert` cache."""
    radgraph: str | None = None
    """A RadGraph archive (radgraph, radgraph-xl), extracted; it names the transformer whose config and tokenizer
    it also needs."""


NEEDS: dict[str, Needs] = {
    "bleu": Needs(),
    "rouge": Needs(),
    "bertscore": Needs(repos=("distilbert-base-uncased",)),
    "f1chexbert": Needs(repos=("bert-base-uncased",), chexbert=True),
    "radgraph": Needs(radgraph="radgraph-xl"),
    "radcliq": Needs(repos=("bert-base-uncased", "distilroberta-base"), chexbert=True, radgraph="radgraph"),
    "ratescore": Needs(repos=("Angelakeke/RaTE-NER-Deberta", "FremyCompany/BioLORD-2023-C")),
    "green": Needs(repos=("StanfordAIMI/GREEN-radllama2-7b",)),
}


def default_cache() -> Path:
    return Path(os.environ.get("MEDLAVA_CACHE", Path.home() / ".cache" / "medlava")) / "metric-weights"


def fetch_command(metrics: list[str], cache: Path) -> str:
    return f"medlava weights fetch --metrics {','.join(metrics)} --cache {cache}"


def repo_folder(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}"


def snapshot_dir(cache: Path, repo: str) -> Path | None:
    """The snapshot refs/main points at in a Hugging Face cache, None when the repo is not there."""
    ref = repo_folder(cache, repo) / "refs" / "main"
    return repo_folder(cache, repo) / "snapshots" / ref.read_text().strip() if ref.exists() else None


def radgraph_dir(cache: Path, model: str) -> Path:
    return cache / "radgraph" / RADGRAPH_VERSION / model


def radgraph_embedder(cache: Path, model: str) -> str | None:
    """The transformer a RadGraph archive embeds with, from its config.json (None before it is extracted)."""
    config = radgraph_dir(cache, model) / "config.json"
    if not config.exists():
        return None
    return json.loads(config.read_text())["dataset_reader"]["token_indexers"]["bert"]["model_name"]


def locations(cache: Path, metric: str) -> list[Path]:
    """The folders (or files) in `cache` holding what `metric` loads; missing ones included, as they should be."""
    needs = NEEDS[metric]
    repos = list(needs.repos)
    out: list[Path] = []
    if needs.radgraph:
        out.append(radgraph_dir(cache, needs.radgraph))
        embedder = radgraph_embedder(cache, needs.radgraph)
        repos += [embedder] if embedder else []
    for repo in repos:
        out.append(snapshot_dir(cache / "hub", repo) or repo_folder(cache / "hub", repo))
    if needs.chexbert:
        snap = snapshot_dir(cache / "chexbert", RRG_SCORERS)
        out.append(snap / "chexbert.pth" if snap else repo_folder(cache / "chexbert", RRG_SCORERS))
    return out


def _files(location: Path) -> list[Path]:
    if location.is_file():
        return [location]
    return sorted(p for p in location.rglob("*") if p.is_file() and not p.name.startswith("."))


def record_staged(cache: Path, metrics: list[str]) -> dict:
    """Add `metrics` with the size and sha256 of every file they load to the cache's manifest (the fetch tool
    and the test fixture call this once the files are in place)."""
    cache = Path(cache)
    path = cache / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"metrics": {}}
    for metric in metrics:
        files = {}
        for location in locations(cache, metric):
            if not location.exists():
                raise FileNotFoundError(f"{metric}: {location} is missing; nothing to record")
            for f in _files(location):
                files[str(f.relative_to(cache))] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
        manifest["metrics"][metric] = files
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return manifest


def verify_staged(cache: Path, metrics: list[str]) -> list[str]:
    """Every problem with the staged weights of `metrics`, each naming the metric, the file and the fix; [] when
    all are there with their recorded size and hash."""
    cache = Path(cache)
    need = [m for m in metrics if NEEDS[m] != Needs()]
    if not need:
        return []
    fix = fetch_command(need, cache)
    path = cache / MANIFEST
    if not path.exists():
        return [f"{', '.join(need)}: no staged weights in {cache} (no {MANIFEST}); where there is internet run `{fix}`"]
    recorded = json.loads(path.read_text())["metrics"]
    stamps = _read_stamps(cache / VERIFIED)
    problems = []
    for metric in need:
        if metric not in recorded:
            problems.append(f"{metric}: not staged in {cache}; run `{fetch_command([metric], cache)}`")
            continue
        for rel, want in recorded[metric].items():
            problem = _check_file(cache / rel, want, stamps)
            if problem:
                problems.append(f"{metric}: {cache / rel} {problem}; run `{fetch_command([metric], cache)}` again")
    try:  # array tasks check at once: each replaces the file whole
        tmp = cache / f"{VERIFIED}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, cache / VERIFIED)
    except OSError:  # a read-only cache is checked all the same, only not remembered
        pass
    return problems


def _read_stamps(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: hash again
        return {}


def _check_file(path: Path, want: dict, stamps: dict) -> str | None:
    if not path.exists():
        return "is missing"
    st = path.stat()
    if st.st_size != want["size"]:
        return f"is damaged ({st.st_size} bytes, {want['size']} recorded)"
    key = str(path)
    if stamps.get(key) == [st.st_size, st.st_mtime_ns, want["sha256"]]:
        return None
    if file_sha256(path) != want["sha256"]:
        return "is damaged (its sha256 differs from the one recorded when it was fetched)"
    stamps[key] = [st.st_size, st.st_mtime_ns, want["sha256"]]
    return None
