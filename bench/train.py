#!/usr/bin/env python
"""Training throughput with and without length grouping / padding-free packing, side by side.

    python bench/train.py [--steps 30] [--batch-size 8]

Tiny LLaVA on this machine's CPU (or the GPU if there is one), LoRA + projector as the sft stage trains,
on synthetic HAM10000 images with answers of 1-60 words (so lengths vary as in report/VQA data).
Prints real tokens/s, the padded-token fraction per batch, and each variant's speed as a ratio to the
plain padded baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from medlava.config import LoraConfig, TinyModelConfig, TrainConfig
from medlava.data.synthetic import make_synthetic_ham10000
from medlava.distributed import Dist
from medlava.models.inputs import Encoder, SampleDataset, collate, collate_packed
from medlava.models.llava import num_image_tokens
from medlava.models.tiny import build_tiny
from medlava.train.loop import epoch_indices, param_groups
from medlava.train.stages import _lora, set_trainable

WORDS = "the lesion shows an irregular pigmented border with asymmetric colour and no regression".split()


def samples(root: Path, n: int) -> list[dict]:
    rng = random.Random(0)
    images = sorted(root.glob("HAM10000_images_part_*/*.jpg"))
    return [{"id": str(i), "image": str(images[i % len(images)].relative_to(root)),
             "conversations": [{"from": "human", "value": "<image>\nDescribe the lesion."},
                               {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))}]}
            for i in range(n)]


def run(dataset: SampleDataset, grouped: bool, packed: bool, steps: int, bs: int, pad_id: int, device) -> dict:
    torch.manual_seed(0)
    model, _ = build_tiny(TinyModelConfig())
    t = TrainConfig(lora=LoraConfig(r=16, alpha=32, dropout=0.0), lr=1e-3)
    set_trainable(model, vision=False, projector=True, llm=False)
    model = _lora(model, t).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, t))
    d = Dist(0, 1, 0, device)
    order = epoch_indices(len(dataset), 0, 0, d, 0, bs, dataset.lengths() if grouped else None)
    fn = collate_packed if packed else partial(collate, pad_id=pad_id, side="right")
    batches = [fn([dataset[j] for j in order[k : k + bs]]) for k in range(0, steps * bs, bs)]  # decode outside timing
    real = slots = 0
    for batch in batches:
        slots += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    for warm in batches[:2]:  # allocator and kernel warm-up
        model(**{k: v.to(device) for k, v in warm.items()}, use_cache=False).loss.backward()
        opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for batch in batches:
        model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    return {"tokens_per_s": real / seconds, "pad_fraction": 1 - real / slots, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_ham10000(Path(tmp) / "ham", n_lesions=100, image_size=64)
        _, processor = build_tiny(TinyModelConfig())
        model, _ = build_tiny(TinyModelConfig())
        enc = Encoder(processor, "mistral_instruct", num_image_tokens(model), 1024, root)
        dataset = SampleDataset(samples(root, args.steps * args.batch_size * 4), enc)
        pad_id = processor.tokenizer.pad_token_id
        variants = [("padded (baseline)", False, False), ("length-grouped", True, False),
                    ("packed", False, True), ("grouped + packed", True, True)]
        results = {name: run(dataset, g, p, args.steps, args.batch_size, pad_id, device) for name, g, p in variants}
    base = results["padded (baseline)"]["tokens_per_s"]
    print(f"tiny LLaVA LoRA sft, {args.steps} steps x batch {args.batch_size}, device {device}, torch {torch.__version__}")
    print(f"{'variant':20s} {'tokens/s':>10s} {'pad fraction':>13s} {'speed vs baseline':>18s}")
    for name, r in results.items():
        print(f"{name:20s} {r['tokens_per_s']:10.0f} {r['pad_fraction']:13.3f} {r['tokens_per_s'] / base:17.2f}x")


if __name__ == "__main__":
    main()
