#!/usr/bin/env python
"""The training data path's throughput: decode + pad/resize + normalise + tokenise + collate of 600x450 JPEGs to
336x336 (LLaVA-Med v1.5's CLIP-336 input, 576 image tokens), in DataLoader workers, as samples/s per worker.

    python bench/data.py [--workers 0 1 2] [--samples 480] [--batch-size 16]

Two image paths side by side: `processor` (the transformers LLaVA image processor called per image, the
baseline) and `medlava` (models.inputs.Encoder, i.e. medlava.data.images.pixel_values: the processor's geometry,
torch's uint8 antialiased resize, one normalising pass). Target: 200 samples/s per core. Workers run one torch
thread each, so samples/s per worker is per core.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from medlava.data.ham10000 import QUESTION
from medlava.data.images import load_image, pixel_values, resolve_image
from medlava.models.inputs import Encoder, SampleDataset, collate
from medlava.models.tiny import build_tokenizer
from PIL import Image, ImageDraw
from transformers import LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

IMAGE_TOKENS = (336 // 14) ** 2


class ProcessorEncoder(Encoder):
    """The baseline: Encoder with the transformers image processor called per image."""

    def pixel_values(self, sample: dict) -> torch.Tensor | None:
        image = load_image(resolve_image(self.image_root, sample["image"]), sample_id=str(sample["id"]))
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def make_images(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        a = rng.normal(170, 25, (450, 600, 3)).clip(0, 255).astype(np.uint8)  # skin-like noise, as dermoscopy
        im = Image.fromarray(a)
        ImageDraw.Draw(im).ellipse((200, 120, 200 + int(rng.integers(80, 200)), 320), fill=(90, 60, 40))
        im.save(root / f"img{i:03d}.jpg", quality=90)
        names.append(f"img{i:03d}.jpg")
    return names


def processor() -> LlavaProcessor:
    image = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True)
    return LlavaProcessor(
        image_processor=image,
        tokenizer=build_tokenizer(512),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def stage_times(root: Path, name: str, proc: LlavaProcessor, sample: dict, n: int = 50) -> dict[str, float]:
    """Milliseconds per sample of each step on one image, best of 3 runs (the least disturbed by other load)."""
    encoder = Encoder(proc, "mistral_instruct", IMAGE_TOKENS, 2048, root)
    image = load_image(root / name)
    steps = {
        "decode": lambda: load_image(root / name),
        "pad+resize+normalise (processor)": lambda: proc.image_processor(images=[image], return_tensors="pt"),
        "pad+resize+normalise (medlava)": lambda: pixel_values(image, proc.image_processor),
        "tokenise": lambda: encoder.train_item(
            {
                **sample,
                "image": None,
                "conversations": [
                    {"from": "human", "value": sample["conversations"][0]["value"].replace("<image>\n", "")},
                    sample["conversations"][1],
                ],
            }
        ),
    }
    out = {}
    for step, fn in steps.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - start) / n * 1e3)
        out[step] = best
    return out


def run(dataset: SampleDataset, workers: int, batch_size: int, pad_id: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=partial(collate, pad_id=pad_id)
    )
    it = iter(loader)
    next(it)  # the first batch pays for worker start-up: not timed
    start = time.perf_counter()
    n = 0
    for batch in it:
        assert batch["pixel_values"].shape[1:] == (3, 336, 336)
        n += len(batch["input_ids"])
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)  # the main process (workers=0) on one core too
    proc = processor()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_images(root, 64)
        samples = [
            {
                "id": str(i),
                "image": names[i % len(names)],
                "conversations": [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "nv"}],
            }
            for i in range(args.samples)
        ]
        for step, ms in stage_times(root, names[0], proc, samples[0]).items():
            print(f"# {step}: {ms:.2f} ms")
        print(
            f"# {platform.node()}: {torch.get_num_threads()} torch thread(s) per process, {len(samples)} samples, "
            f"batch {args.batch_size}, 600x450 JPEG -> 3x336x336, {IMAGE_TOKENS} image tokens"
        )
        print("| image path | workers | samples/s | samples/s per worker | vs processor |\n|---|---:|---:|---:|---:|")
        for w in args.workers:
            base = None
            for name, cls in (("processor", ProcessorEncoder), ("medlava", Encoder)):
                dataset = SampleDataset(samples, cls(proc, "mistral_instruct", IMAGE_TOKENS, 2048, root))
                rate = run(dataset, w, args.batch_size, proc.tokenizer.pad_token_id)
                base = base or rate
                print(f"| {name} | {w} | {rate:.0f} | {rate / max(w, 1):.0f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
