"""Answering: closed questions by option log-likelihood (real per-class scores, so macro-AUC means
something), everything else by batched generation with left padding."""

from __future__ import annotations

import torch

from medlava.models.inputs import collate

# Prompts of compiled decoding are left-padded to a multiple of this, so batches repeat a few shapes (each new
# shape compiles); the padding is masked, so answers are unchanged.
COMPILE_PAD_MULTIPLE = 64


def _choice_rows(
    prompt_lengths: list[int], choices: list[list[list[int]]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every prompt's choices end to end, to follow its prompt: their ids, which choice each column holds
    (-1: padding) and their positions, which restart after the prompt for every choice."""
    span = max(sum(len(c) for c in cs) for cs in choices)
    ids = torch.full((len(choices), span), pad_id, dtype=torch.long)
    owner = torch.full((len(choices), span), -1, dtype=torch.long)
    positions = torch.zeros((len(choices), span), dtype=torch.long)
    for b, (n, cs) in enumerate(zip(prompt_lengths, choices)):
        col = 0
        for k, c in enumerate(cs):
            ids[b, col : col + len(c)] = torch.tensor(c)
            owner[b, col : col + len(c)] = k
            positions[b, col : col + len(c)] = torch.arange(n, n + len(c))
            col += len(c)
    return ids.to(device), owner.to(device), positions.to(device)


def _shared_prefix_mask(prompt_mask: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean attention (True: may attend) over prompt columns then choice columns: the prompt is
    causal over its real tokens, a choice token sees the real prompt and the earlier tokens of its own choice, and
    a padding column sees only itself (so no row is empty and nothing it holds reaches a real token)."""
    b, p = prompt_mask.shape
    doc = torch.cat([torch.full((b, p), -2, device=owner.device), owner], 1)  # -2: prompt, -1: padding
    real = torch.cat([prompt_mask.bool(), owner >= 0], 1)
    t = doc.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=owner.device).tril()
    q, k = doc[:, :, None], doc[:, None, :]
    allowed = causal & real[:, None, :] & ((k == -2) | (k == q))
    allowed |= torch.eye(t, dtype=torch.bool, device=owner.device)
    return allowed[:, None]


@torch.no_grad()
def score_choices(
    model, prompts: list[dict], choices: list[list[list[int]]], pad_id: int, device: torch.device
) -> list[list[float]]:
    """Sum of log p(choice tokens | image, prompt) for every choice of every prompt, in one forward pass.

    Each row holds its prompt (image included, left-padded so all prompts end in one column) followed by all its
    choices; the mask lets each choice attend to the prompt and to itself only, with positions that continue the
    prompt's, so the image and prompt are encoded once and shared while each choice is scored as if it alone
    followed the prompt. Logits are computed from the prompt's last column on only.
    """
    batch = {k: v.to(device) for k, v in collate(prompts, pad_id, side="left").items()}
    prompt_mask = batch.pop("attention_mask")
    width = prompt_mask.shape[1]
    # Positions count real tokens only, so a left-padded prompt is encoded exactly as it would be alone.
    prompt_positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    ids, owner, positions = _choice_rows(prompt_mask.sum(1).tolist(), choices, pad_id, device)
    mask = _shared_prefix_mask(prompt_mask, owner)
    if model.config.text_config._attn_implementation == "eager":  # eager adds its mask to the scores
        blocked = torch.finfo(model.dtype).min
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=device).masked_fill(~mask, blocked)
    logits = model(
        input_ids=torch.cat([batch.pop("input_ids"), ids], 1),
        attention_mask=mask,
        position_ids=torch.cat([prompt_positions, positions], 1),
        use_cache=False,
        logits_to_keep=torch.arange(width - 1, width - 1 + ids.shape[1], device=device),
        **batch,
    ).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Logit column j predicts choice column j from the column before it, except that a choice's first token
    # follows the prompt's last column (logit column 0).
    starts = owner != torch.nn.functional.pad(owner, (1, 0), value=-1)[:, :-1]
    pred = torch.where(starts, 0, torch.arange(ids.shape[1], device=device))
    token_logp = logp[torch.arange(len(choices), device=device)[:, None], pred, ids] * (owner >= 0)
    totals = torch.zeros(len(choices), max(len(cs) for cs in choices), device=device)
    totals.scatter_add_(1, owner.clamp(min=0), token_logp)
    return [row[: len(cs)] for row, cs in zip(totals.tolist(), choices)]


def compile_config(device: torch.device):
    """transformers' automatic compilation of the decoding step (static KV cache): CUDA graphs on a GPU."""
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = device.type != "cuda"  # transformers' switch for compiling on CPU (tests)
    return config


@torch.no_grad()
def generate(
    model,
    prompts: list[dict],
    tokenizer,
    device: torch.device,
    max_new_tokens: int,
    num_beams: int,
    temperature: float,
    compile: bool = False,
) -> list[str]:
    """Free-text answers. With `compile`, decoding keeps its KV cache in a static buffer and runs a compiled
    forward per token (prompts padded to a multiple of COMPILE_PAD_MULTIPLE, so shapes repeat)."""
    multiple = COMPILE_PAD_MULTIPLE if compile else 1
    batch = {k: v.to(device) for k, v in collate(prompts, tokenizer.pad_token_id, "left", multiple).items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    static = {"cache_implementation": "static", "compile_config": compile_config(device)} if compile else {}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
        **static,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
