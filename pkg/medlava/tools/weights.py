"""`medlava weights`: stage the report metrics' weights where there is internet, check them where there is not.

    medlava weights fetch --metrics f1chexbert,radgraph,radcliq,bertscore [--cache DIR]   # a login node
    medlava weights check --metrics f1chexbert,radgraph [--cache DIR]                     # anywhere: exit 1 if bad

`fetch` downloads exactly what each metric loads into DIR (default $MEDLAVA_CACHE/metric-weights), laid out as
RadEval reads it with HF_HOME=DIR and XDG_CACHE_HOME=DIR: each Hugging Face repo's config, tokenizer and weight
files (safetensors, else PyTorch .bin; none for repos only configured from: bert-base-uncased under CheXbert,
RadGraph's transformer), f1chexbert's chexbert.pth, and RadGraph's archive extracted as RadEval extracts it. It
then records every file's size and sha256 in DIR/medlava-metric-weights.json, which `check`, `medlava doctor`,
`launch/submit.py eval` and the eval jobs verify before they score. Point eval.metric_cache (or --metric-cache)
at DIR; the jobs read it with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import re
import sys
import tarfile
from pathlib import Path
from typing import Protocol

from medlava.eval.weights import (
    NEEDS,
    RRG_SCORERS,
    default_cache,
    radgraph_dir,
    radgraph_embedder,
    record_staged,
    verify_staged,
)

CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spm.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
CONFIG_ONLY = {"bert-base-uncased"}
"""Repos a metric builds from their config and tokenizer only (CheXbert's weights are chexbert.pth)."""
_SHARDS = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


class Hub(Protocol):
    def files(self, repo: str) -> list[str]: ...

    def download(self, repo: str, filename: str, cache_dir: Path) -> Path: ...


class HuggingFace:
    """The Hugging Face Hub through huggingface_hub (honours HF_ENDPOINT and HF_TOKEN)."""

    def files(self, repo: str) -> list[str]:
        from huggingface_hub import list_repo_files

        return list_repo_files(repo)

    def download(self, repo: str, filename: str, cache_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=str(cache_dir)))


def wanted(files: list[str], weights: bool) -> list[str]:
    """A repo's top-level config, tokenizer and remote-code files, and with `weights` its weights: safetensors
    (with their index) when it has them, else the PyTorch .bin files."""
    top = [f for f in files if "/" not in f]
    out = [f for f in top if f in CONFIG_FILES or f.endswith(".py")]
    if weights:
        shards = [f for f in top if _SHARDS.fullmatch(f)]
        safetensors = [f for f in shards if ".safetensors" in f]
        out += safetensors or [f for f in shards if ".bin" in f]
    return out


def fetch_repo(hub: Hub, repo: str, cache: Path, weights: bool = True) -> list[str]:
    names = wanted(hub.files(repo), weights)
    if "config.json" not in names:
        raise FileNotFoundError(
            f"{repo}: no config.json on the hub; is the repo name right and readable "
            "(a gated repo needs `huggingface-cli login`)?"
        )
    for name in names:
        hub.download(repo, name, cache / "hub")
    return names


def fetch_radgraph(hub: Hub, model: str, cache: Path) -> None:
    """RadGraph's archive from StanfordAIMI/RRG_scorers, extracted where RadEval extracts it, and the config and
    tokenizer of the transformer it names."""
    folder = radgraph_dir(cache, model)
    if not (folder / "config.json").exists():
        archive = hub.download(RRG_SCORERS, f"{model}.tar.gz", folder.parent)
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(folder, filter="data")
    fetch_repo(hub, radgraph_embedder(cache, model), cache, weights=False)


def fetch(metrics: list[str], cache: Path, hub: Hub | None = None) -> dict:
    """Stage `metrics` into `cache` and record them; returns the manifest."""
    hub = hub or HuggingFace()
    for metric in metrics:
        needs = NEEDS[metric]
        for repo in needs.repos:
            fetch_repo(hub, repo, cache, weights=repo not in CONFIG_ONLY)
        if needs.chexbert:
            hub.download(RRG_SCORERS, "chexbert.pth", cache / "chexbert")
        if needs.radgraph:
            fetch_radgraph(hub, needs.radgraph, cache)
        print(f"{metric}: staged in {cache}", flush=True)
    return record_staged(cache, metrics)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="medlava weights", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("action", choices=["fetch", "check"])
    p.add_argument("--metrics", required=True, help=f"comma-separated, from {', '.join(NEEDS)}")
    p.add_argument("--cache", type=Path, help="the staged cache (default: $MEDLAVA_CACHE/metric-weights)")
    args = p.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    unknown = sorted(set(metrics) - set(NEEDS))
    if unknown:
        print(f"medlava weights: unknown metric(s) {unknown}; choose from {', '.join(NEEDS)}", file=sys.stderr)
        return 2
    cache = (args.cache or default_cache()).expanduser().absolute()
    if args.action == "fetch":
        cache.mkdir(parents=True, exist_ok=True)
        manifest = fetch(metrics, cache)
        files = {f for m in metrics for f in manifest["metrics"][m]}
        print(f"recorded {len(files)} files of {', '.join(metrics)} in {cache}; use eval.metric_cache={cache}")
        return 0
    problems = verify_staged(cache, metrics)
    print("\n".join(problems) if problems else f"{', '.join(metrics)}: every weight file in {cache} verified")
    return 1 if problems else 0
