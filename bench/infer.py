#!/usr/bin/env python
"""Answering speed of closed questions, three ways, in one run and on one model:

1. option scoring (medlava's `infer.mode=score`): one batched forward per batch, prompt KV cache shared by
   the choices (medlava.infer.score.score_choices);
2. free-text generation at batch 1 (seed 000's way: LLaVA-Med's model_vqa.py asserts batch size 1);
3. batched generation with left padding (medlava's `infer.mode=generate`).

    python bench/infer.py                                   # tiny model, CPU
    python bench/infer.py --preset llava-med-v1.5 --device cuda   # random model of LLaVA-Med v1.5's shapes

Prints samples/s and the ratio to batch-1 generation (target: scoring >= 5x), and, per mode, the compute
floor: FLOPs per sample (2 x parameters x tokens through them) / the measured matmul rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

from medlava.config import TinyModelConfig  # noqa: E402
from medlava.infer.score import choice_token_ids, generate, score_choices  # noqa: E402
from medlava.models.llava import num_image_tokens  # noqa: E402
from medlava.models.templates import encode, render  # noqa: E402
from medlava.models.tiny import build_tiny  # noqa: E402
from sizing import llava_med_v15, lm_params, matmul_rate, vision_params  # noqa: E402  (bench/sizing.py)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
QUESTION = "What is the lesion type? Choose one of: akiec, bcc, bkl, df, mel, nv, vasc."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "llava-med-v1.5"], default="tiny")
    p.add_argument("--layers", type=int, help="llava-med-v1.5: fewer layers per stack (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=64, help="questions per mode (batch-1 generation: --n-single)")
    p.add_argument("--n-single", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length (infer.max_new_tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per mode; the fastest counts")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(os.cpu_count() or 1)
    if args.preset == "tiny":
        model, processor = build_tiny(TinyModelConfig())
        model, tok, size = model.to(device, dtype).eval(), processor.tokenizer, TinyModelConfig().image_size
    else:
        model, tok, size = llava_med_v15(args.layers, device, dtype)
    n_img = num_image_tokens(model)
    image_id = tok.convert_tokens_to_ids("<image>")
    enc = encode(render("mistral_instruct", [{"from": "human", "value": "<image>\n" + QUESTION}],
                        add_generation_prompt=True), tok, image_id, n_img, 4096)
    g = torch.Generator().manual_seed(0)
    prompts = [{"input_ids": enc.input_ids, "pixel_values": torch.randn(3, size, size, generator=g).to(dtype)}
               for _ in range(max(args.n, args.n_single))]
    choices = [choice_token_ids(tok, c) for c in CLASSES]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, items: list, batch: int) -> float:
        """Best samples/s of --repeats passes (a shared machine's noise only ever slows a pass down)."""
        fn(items[:batch])  # warm-up (kernels, caches)
        best = 0.0
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            for i in range(0, len(items), batch):
                fn(items[i : i + batch])
            sync()
            best = max(best, len(items) / (time.perf_counter() - start))
        return best

    produced: list[int] = []
    model_generate = model.generate

    def counting_generate(**kwargs):  # records how many tokens each answer got (pads excluded)
        out = model_generate(**kwargs)
        new = out[:, kwargs["input_ids"].shape[1]:]
        produced.extend((new != tok.pad_token_id).sum(1).tolist())
        return out

    model.generate = counting_generate

    def gen(batch):
        return generate(model, batch, tok, device, args.max_new_tokens, 1, 0.0)

    def score(batch):
        return score_choices(model, batch, [choices] * len(batch), tok.pad_token_id, device)

    score_rate = timed(score, prompts[: args.n], args.batch_size)
    single_rate = timed(gen, prompts[: args.n_single], 1)
    batched_rate = timed(gen, prompts[: args.n], args.batch_size)

    lm = lm_params(model)
    vision = sum(vision_params(model))
    prompt_len, avg_new = len(enc.input_ids), sum(produced) / len(produced)
    flops_score = 2 * vision * (n_img + 1) + 2 * lm * (prompt_len + sum(len(c) for c in choices))
    flops_gen = 2 * vision * (n_img + 1) + 2 * lm * (prompt_len + avg_new)
    rate = matmul_rate(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{args.preset} model ({(lm + vision) / 1e6:,.1f} M parameters without embeddings) on {name}, {dtype}, "
          f"{torch.get_num_threads()} threads; prompt {prompt_len} tokens ({n_img} image), {len(CLASSES)} choices, "
          f"generation {args.max_new_tokens} new tokens max ({avg_new:.1f} produced on average)")
    print(f"matmul rate {rate / 1e12:.2f} TFLOP/s")
    print(f"{'mode':<28}{'samples/s':>12}{'vs batch-1 gen':>16}{'compute floor/s':>18}")
    for label, value, flops in ((f"option scoring (batch {args.batch_size})", score_rate, flops_score),
                                ("generation, batch 1", single_rate, flops_gen),
                                (f"generation, batch {args.batch_size}", batched_rate, flops_gen)):
        print(f"{label:<28}{value:>12.2f}{value / single_rate:>15.1f}x{rate / flops:>18.1f}")
    ok = score_rate >= 5 * single_rate
    print("target (option scoring >= 5x batch-1 generation):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
