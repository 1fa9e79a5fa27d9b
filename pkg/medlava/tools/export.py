"""`medlava export CHECKPOINT --out DIR`: a medlava checkpoint (LoRA adapter, aligned projector or full
fine-tune) as one standalone transformers LLaVA checkpoint with its processor, loadable with
`LlavaForConditionalGeneration.from_pretrained(DIR)` and by every medlava stage (model.name_or_path)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from medlava.artifacts import atomic_dir, checkpoint_of, read_manifest
from medlava.config import ModelConfig
from medlava.models.llava import load_for_inference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    ckpt = checkpoint_of(Path(checkpoint))
    manifest = read_manifest(ckpt)
    with atomic_dir(Path(out)) as tmp:  # refuses an existing --out before the model is loaded
        model, processor, _ = load_for_inference(
            ModelConfig(name_or_path=manifest["base_model"], attn_implementation="sdpa"), ckpt, dtype
        )
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="medlava export", description=__doc__)
    ap.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step-N) or a complete align/sft run")
    ap.add_argument("--out", required=True, help="new directory for the standalone model")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = ap.parse_args(argv)
    try:
        path = export(Path(args.checkpoint), Path(args.out), DTYPES[args.dtype])
    except (FileNotFoundError, FileExistsError) as e:
        print(f"medlava export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {path}")
    return 0
