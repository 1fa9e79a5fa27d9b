#!/usr/bin/env python
"""Answering speed of closed questions and free text, in one run and on one model:

1. option scoring (medlava's `infer.mode=score`): one forward pass per batch, the image and prompt shared by the
   choices (medlava.infer.score.score_choices), at each --score-batch-sizes;
2. free-text generation at batch 1 (seed 000's way: LLaVA-Med's model_vqa.py asserts batch size 1);
3. batched generation with left padding (medlava's `infer.mode=generate`), dynamic KV cache, and with a static KV
   cache and compiled decoding (`infer.compile=true`), for short answers (--max-new-tokens, 32) and reports
   (--report-tokens, 256).

    python bench/infer.py                                   # tiny model, CPU
    python bench/infer.py --preset llava-med-v1.5 --device cuda --score-batch-sizes 16,32,64   # LLaVA-Med v1.5 shapes

Prints samples/s, the ratio to batch-1 generation (target: scoring >= 5x), compiled against dynamic generation in
the same run (target: >= 2x), and per mode the compute floor: FLOPs per sample (2 x parameters x tokens through
them) / the measured matmul rate, and how much of it each mode reaches (target for scoring on a GPU: >= 65%).
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
from medlava.infer.score import generate, score_choices  # noqa: E402
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
    p.add_argument("--n-report", type=int, default=32, help="prompts of the report-generation modes")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch")
    p.add_argument("--score-batch-sizes", default="16", help="option-scoring batches, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=32, help="short answers (infer.max_new_tokens)")
    p.add_argument("--report-tokens", type=int, default=256, help="report generation length; 0 skips it")
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
    question = [{"from": "human", "value": "<image>\n" + QUESTION}]
    enc = encode(render("mistral_instruct", question, add_generation_prompt=True), tok, image_id, n_img, 4096)
    g = torch.Generator().manual_seed(0)
    prompts = [
        {"input_ids": enc.input_ids, "pixel_values": torch.randn(3, size, size, generator=g).to(dtype)}
        for _ in range(max(args.n, args.n_single, args.n_report))
    ]
    # What the template puts after the prompt when the class is the answer (as Encoder.answer_ids): " nv </s>".
    full = [
        encode(
            render("mistral_instruct", question + [{"from": "gpt", "value": c}]), tok, image_id, n_img, 4096
        ).input_ids
        for c in CLASSES
    ]
    choices = [f[len(enc.input_ids) :] for f in full]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, items: list, batch: int) -> float:
        """Best samples/s of --repeats passes (a shared machine's noise only ever slows a pass down)."""
        fn(items[:batch])  # warm-up (kernels, caches; compiled decoding compiles here)
        best = 0.0
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            for i in range(0, len(items), batch):
                fn(items[i : i + batch])
            sync()
            best = max(best, len(items) / (time.perf_counter() - start))
        return best

    produced: dict[int, list[int]] = {}
    model_generate = model.generate

    def counting_generate(**kwargs):  # records how many tokens each answer got (pads excluded), per length asked
        out = model_generate(**kwargs)
        new = out[:, kwargs["input_ids"].shape[1] :]
        produced.setdefault(kwargs["max_new_tokens"], []).extend((new != tok.pad_token_id).sum(1).tolist())
        return out

    model.generate = counting_generate

    def gen(tokens: int, compile: bool):
        return lambda batch: generate(model, batch, tok, device, tokens, 1, 0.0, compile)

    def score(batch):
        return score_choices(model, batch, [choices] * len(batch), tok.pad_token_id, device)

    lm, vision = lm_params(model), sum(vision_params(model))
    prompt_len = len(enc.input_ids)

    def gen_flops(tokens: int) -> float:
        new = sum(produced[tokens]) / len(produced[tokens])
        return 2 * vision * (n_img + 1) + 2 * lm * (prompt_len + new)

    flops_score = 2 * vision * (n_img + 1) + 2 * lm * (prompt_len + sum(len(c) for c in choices))
    rows = [
        (f"option scoring, batch {b}", timed(score, prompts[: args.n], b), flops_score)
        for b in map(int, args.score_batch_sizes.split(","))
    ]
    single = timed(gen(args.max_new_tokens, False), prompts[: args.n_single], 1)
    rows.append((f"generation {args.max_new_tokens} tokens, batch 1", single, gen_flops(args.max_new_tokens)))
    lengths = [(args.max_new_tokens, args.n)] + ([(args.report_tokens, args.n_report)] if args.report_tokens else [])
    for tokens, n in lengths:
        for compile in (False, True):
            rate_ = timed(gen(tokens, compile), prompts[:n], args.batch_size)
            kind = "static cache + compiled" if compile else "dynamic cache"
            rows.append((f"generation {tokens} tokens, batch {args.batch_size}, {kind}", rate_, gen_flops(tokens)))

    rate = matmul_rate(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(
        f"{args.preset} model ({(lm + vision) / 1e6:,.1f} M parameters without embeddings) on {name}, {dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {prompt_len} tokens ({n_img} image), "
        f"{len(CLASSES)} choices; tokens produced on average: "
        + ", ".join(f"{sum(v) / len(v):.1f} of {k}" for k, v in produced.items())
    )
    print(f"matmul rate {rate / 1e12:.2f} TFLOP/s")
    print(f"{'mode':<58}{'samples/s':>11}{'vs batch-1':>11}{'floor/s':>10}{'of floor':>10}")
    for label, value, flops in rows:
        print(f"{label:<58}{value:>11.2f}{value / single:>10.1f}x{rate / flops:>10.1f}{value * flops / rate:>10.1%}")
    by_label = {label: value for label, value, _ in rows}
    best_score = max(value for label, value, _ in rows if label.startswith("option"))
    ok = best_score >= 5 * single
    print("target (option scoring >= 5x batch-1 generation):", "met" if ok else "MISSED")
    for tokens, _ in lengths:
        speedup = (
            by_label[f"generation {tokens} tokens, batch {args.batch_size}, static cache + compiled"]
            / by_label[f"generation {tokens} tokens, batch {args.batch_size}, dynamic cache"]
        )
        print(f"compiled vs dynamic generation, {tokens} tokens: {speedup:.2f}x (target on a GPU: >= 2x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
