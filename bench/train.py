#!/usr/bin/env python
"""Training throughput with and without length grouping / padding-free packing, side by side.

    python bench/train.py [--steps 30] [--batch-size 8]                                # tiny LLaVA, CPU
    python bench/train.py --preset llava-med-v1.5 --steps 12 --batch-size 8 --repeats 2  # GPU, real shapes

LoRA + projector as the sft stage trains (trainable weights in fp32 under bf16 autocast on a GPU, frozen ones in
the model's dtype), on answers of 1-60 words (so lengths vary as in report/VQA data). `tiny`: the tiny LLaVA on
synthetic HAM10000 images through the real Encoder, LoRA r=16. `llava-med-v1.5`: a random-initialised model of
LLaVA-Med v1.5's shapes (CLIP ViT-L/14-336, 576 image tokens, Mistral-7B) in bf16, LoRA r=128/alpha 256 on every
projection of the LLM, as the recipes set it. Prints real tokens/s, samples/s, the padded-token fraction, peak GPU
memory, each variant's speed as a ratio to the plain padded baseline measured in the same process and, on a GPU,
model FLOPs utilisation against the H100/H200 dense bf16 peak and against the matmul rate measured here.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

from medlava.config import LoraConfig, TinyModelConfig, TrainConfig  # noqa: E402
from medlava.data.synthetic import make_synthetic_ham10000  # noqa: E402
from medlava.distributed import Dist  # noqa: E402
from medlava.models.inputs import Encoder, SampleDataset, collate, collate_packed  # noqa: E402
from medlava.models.llava import enable_activation_checkpointing, num_image_tokens  # noqa: E402
from medlava.models.templates import encode, render  # noqa: E402
from medlava.models.tiny import build_tiny  # noqa: E402
from medlava.train.optim import param_groups  # noqa: E402
from medlava.train.sampling import epoch_indices  # noqa: E402
from medlava.train.vlm import _lora, set_trainable  # noqa: E402
from sizing import (  # noqa: E402
    HOPPER_BF16_PEAK,
    llava_med_v15,
    lm_params,
    matmul_rate,
    vision_params,
)

WORDS = "the lesion shows an irregular pigmented border with asymmetric colour and no regression".split()
PROMPT = "<image>\nDescribe the lesion."


def conversations(n: int) -> list[list[dict]]:
    rng = random.Random(0)
    return [[{"from": "human", "value": PROMPT},
             {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))}] for _ in range(n)]


def tiny_items(root: Path, n: int) -> tuple[list[dict], int]:
    """Samples through the real Encoder (decode, pad, resize, tokenise) of the tiny preset."""
    images = sorted(root.glob("HAM10000_images_part_*/*.jpg"))
    model, processor = build_tiny(TinyModelConfig())
    enc = Encoder(processor, "mistral_instruct", num_image_tokens(model), 1024, root)
    samples = [{"id": str(i), "image": str(images[i % len(images)].relative_to(root)), "conversations": c}
               for i, c in enumerate(conversations(n))]
    dataset = SampleDataset(samples, enc)
    return [dataset[i] for i in range(n)], processor.tokenizer.pad_token_id


def llava_med_items(model, tok, size: int, n: int) -> list[dict]:
    """Token ids and random pixels at LLaVA-Med v1.5's shapes (the pixel path is bench/data.py's subject)."""
    image_id = tok.convert_tokens_to_ids("<image>")
    g = torch.Generator().manual_seed(0)
    items = []
    for conv in conversations(n):
        e = encode(render("mistral_instruct", conv), tok, image_id, num_image_tokens(model), 2048)
        items.append({"input_ids": e.input_ids, "labels": e.labels, "pixel_values": torch.randn(3, size, size, generator=g)})
    return items


def flops_per_sample(model, n_tokens: int, lora: int) -> float:
    """Model FLOPs of one training sample (PaLM's convention: 6 per parameter per token for what runs forward and
    backward, attention's causal T^2 term, recomputation not counted). The frozen vision tower only runs forward."""
    vision, projector = vision_params(model)
    cfg = model.config.text_config
    n_img = num_image_tokens(model)
    attention = 6 * cfg.num_hidden_layers * cfg.hidden_size * n_tokens**2  # QK^T and AV, causal half, x3 for backward
    return 2 * vision * (n_img + 1) + 6 * projector * n_img + 6 * (lm_params(model) + lora) * n_tokens + attention


def run(build, items: list[dict], variant: dict, steps: int, bs: int, pad_id: int, device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build()
    t = TrainConfig(lora=variant["lora"], lr=1e-4)
    set_trainable(model, vision=False, projector=True, llm=False)
    model = _lora(model, t)
    for p in model.parameters():  # as train/loop.py: fp32 master copies of what trains
        if p.requires_grad:
            p.data = p.data.float()
    model.to(device).train()
    if variant["checkpointing"]:
        enable_activation_checkpointing(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    opt = torch.optim.AdamW(param_groups(model, t.lr, t.weight_decay, t.projector_lr))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    lengths = [len(it["input_ids"]) for it in items]
    order = epoch_indices(len(items), 0, 0, Dist(0, 1, 0, device), 0, bs, lengths if variant["grouped"] else None)
    fn = collate_packed if variant["packed"] else partial(collate, pad_id=pad_id, side="right")
    batches = [fn([items[j] for j in order[k : k + bs]]) for k in range(0, steps * bs, bs)]
    real = slots = flops = 0
    for batch in batches:
        slots += batch["input_ids"].numel()
    for j in order[: steps * bs]:
        real += lengths[j]
        flops += flops_per_sample(model.get_base_model(), lengths[j], lora)

    def step(batch: dict) -> None:
        with amp:
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for warm in batches[:2]:  # allocator and kernel warm-up
        step(warm)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = float("inf")
    for _ in range(repeats):  # the fastest pass counts: a shared machine's noise only ever slows one down
        sync()
        tic = time.perf_counter()
        for batch in batches:
            step(batch)
        sync()
        seconds = min(seconds, time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": real / seconds, "samples_per_s": steps * bs / seconds, "pad_fraction": 1 - real / slots,
            "flops_per_s": flops / seconds, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "llava-med-v1.5"], default="tiny")
    ap.add_argument("--layers", type=int, help="llava-med-v1.5: fewer layers per stack (a smoke run)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per variant; the fastest counts")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.steps * args.batch_size * 4
    with tempfile.TemporaryDirectory() as tmp:
        if args.preset == "tiny":
            root = make_synthetic_ham10000(Path(tmp) / "ham", n_lesions=100, image_size=64)
            items, pad_id = tiny_items(root, n)
            lora = LoraConfig(r=16, alpha=32, dropout=0.0)
            build = lambda: build_tiny(TinyModelConfig())[0]  # noqa: E731
            variants = {"padded (baseline)": {}, "length-grouped": {"grouped": True}, "packed": {"packed": True},
                        "grouped + packed": {"grouped": True, "packed": True}}
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            shape_model, tok, size = llava_med_v15(args.layers, torch.device("meta"), dtype)
            items, pad_id = llava_med_items(shape_model, tok, size, n), tok.pad_token_id
            lora = LoraConfig(r=128, alpha=256, dropout=0.05)
            build = lambda: llava_med_v15(args.layers, device, dtype)[0]  # noqa: E731
            # Packing is left out: without flash-attn it is slower by construction (see the tiny run).
            variants = {"padded (baseline)": {}, "length-grouped": {"grouped": True},
                        "grouped + grad ckpt": {"grouped": True, "checkpointing": True}}
        results = {name: run(build, items, {"grouped": False, "packed": False, "checkpointing": False, "lora": lora, **v},
                             args.steps, args.batch_size, pad_id, device, args.repeats)
                   for name, v in variants.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rate = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"{args.preset} LLaVA LoRA sft (r={lora.r}), {args.steps} steps x batch {args.batch_size}, {name}, "
          f"torch {torch.__version__}; matmul rate {rate / 1e12:.1f} TFLOP/s")
    base = results["padded (baseline)"]["tokens_per_s"]
    print(f"{'variant':22s} {'tokens/s':>10s} {'samples/s':>10s} {'pad frac':>9s} {'vs baseline':>12s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'of matmul':>10s} {'peak GiB':>9s}")
    for label, r in results.items():
        # The H100/H200 peak is no denominator for a CPU: MFU is printed on a GPU only.
        mfu = f"{r['flops_per_s'] / HOPPER_BF16_PEAK:6.1%}" if device.type == "cuda" else f"{'-':>6s}"
        print(f"{label:22s} {r['tokens_per_s']:10.0f} {r['samples_per_s']:10.2f} {r['pad_fraction']:9.3f} "
              f"{r['tokens_per_s'] / base:11.2f}x {r['flops_per_s'] / 1e12:8.2f} {mfu} {r['flops_per_s'] / rate:10.1%} "
              f"{r['peak_gib']:9.1f}")


if __name__ == "__main__":
    main()
