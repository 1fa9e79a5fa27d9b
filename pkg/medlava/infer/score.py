"""Answering: closed questions by option log-likelihood (real per-class scores, so macro-AUC means
something), everything else by batched generation with left padding."""

from __future__ import annotations

import torch

from medlava.models.inputs import collate


@torch.no_grad()
def score_choices(model, prompts: list[dict], choices: list[list[list[int]]], pad_id: int,
                  device: torch.device) -> list[list[float]]:
    """Sum of log p(choice tokens | image, prompt) for every choice of every prompt.

    The prompts (image included) run once; their KV cache is copied to each choice, and all choices
    of the batch go through one right-padded forward pass.
    """
    batch = {k: v.to(device) for k, v in collate(prompts, pad_id, side="left").items()}
    # Positions count real tokens only, so a left-padded prompt is encoded exactly as it would be alone.
    prompt_positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    out = model(**batch, position_ids=prompt_positions, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each choice's first token

    owner = torch.tensor([i for i, cs in enumerate(choices) for _ in cs], device=device)
    conts = [c for cs in choices for c in cs]
    cache = out.past_key_values
    cache.batch_select_indices(owner)
    width = max(len(c) for c in conts)
    ids = torch.full((len(conts), width), pad_id, dtype=torch.long, device=device)
    cont_mask = torch.zeros_like(ids)
    for j, c in enumerate(conts):
        ids[j, : len(c)] = torch.tensor(c)
        cont_mask[j, : len(c)] = 1
    prompt_mask = batch["attention_mask"][owner]
    positions = prompt_mask.sum(1, keepdim=True) + torch.arange(width, device=device)
    logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, cont_mask], 1), position_ids=positions,
                   past_key_values=cache, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    totals = first[owner].gather(-1, ids[:, :1])[:, 0] + (logp * cont_mask[:, 1:]).sum(1)

    result, k = [], 0
    for cs in choices:
        result.append(totals[k : k + len(cs)].tolist())
        k += len(cs)
    return result


@torch.no_grad()
def generate(model, prompts: list[dict], tokenizer, device: torch.device, max_new_tokens: int, num_beams: int,
             temperature: float) -> list[str]:
    batch = {k: v.to(device) for k, v in collate(prompts, tokenizer.pad_token_id, side="left").items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    new = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
