"""Length grouping and padding-free packing: same samples, same loss, less padding."""

import copy
import random

import pytest
import torch
from medlava.config import LoraConfig, TinyModelConfig, TrainConfig
from medlava.distributed import Dist
from medlava.models.inputs import collate, collate_packed
from medlava.models.llava import num_image_tokens
from medlava.models.templates import encode, render
from medlava.models.tiny import build_tiny
from medlava.train.sampling import epoch_indices
from medlava.train.vlm import _lora, set_trainable

CPU = torch.device("cpu")


def _items(model, processor, n, seed=0):
    tok, rng = processor.tokenizer, random.Random(seed)
    words = ["lesion", "border", "colour", "benign", "melanoma", "the", "is", "irregular", "left", "of"]
    items = []
    for i in range(n):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        conv = [{"from": "human", "value": "<image>\nDescribe the lesion."}, {"from": "gpt", "value": answer}]
        enc = encode(
            render("mistral_instruct", conv), tok, tok.convert_tokens_to_ids("<image>"), num_image_tokens(model), 512
        )
        g = torch.Generator().manual_seed(seed * 100 + i)
        items.append(
            {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": torch.randn(3, 32, 32, generator=g)}
        )
    return items


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(TinyModelConfig())
    return model.eval(), processor


def _token_loss(model, batch):
    """Summed token loss, so batches of different layout are comparable exactly."""
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


@torch.no_grad()
def test_packed_batch_gives_the_padded_batch_loss(tiny):
    model, processor = tiny
    items = _items(model, processor, 5)
    padded = _token_loss(model, collate(items, processor.tokenizer.pad_token_id, "right"))
    packed_batch = collate_packed(items)
    assert packed_batch["input_ids"].shape == (1, sum(len(i["input_ids"]) for i in items))
    packed = _token_loss(model, packed_batch)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)
    # and the model's own mean loss agrees too
    mean_packed = model(**collate_packed(items), use_cache=False).loss
    mean_padded = model(**collate(items, processor.tokenizer.pad_token_id, "right"), use_cache=False).loss
    torch.testing.assert_close(mean_packed, mean_padded, rtol=1e-5, atol=1e-5)


def test_packing_does_not_leak_across_samples(tiny):
    model, processor = tiny
    a, b = _items(model, processor, 2, seed=3)
    with torch.no_grad():
        alone = model(**collate_packed([b]), use_cache=False).logits[0]
        after_a = model(**collate_packed([a, b]), use_cache=False).logits[0, len(a["input_ids"]) :]
    torch.testing.assert_close(after_a, alone, rtol=1e-4, atol=1e-4)


def _lora_model(model):
    """The tiny model as sft trains it: LoRA on the language model, projector trainable, fp32."""
    model = copy.deepcopy(model).float().train()
    set_trainable(model, vision=False, projector=True, llm=False)
    model = _lora(model, TrainConfig(lora=LoraConfig(r=4, alpha=8, dropout=0.0)))
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # B starts at zero, which would leave A without a gradient
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_rows_give_the_padded_loss_and_gradients_through_the_document_mask(tiny):
    """The packed row's position ids restart per sample; transformers turns them into the document mask (block-
    diagonal causal; on CPU materialised for SDPA, on a GPU FlexAttention's block mask or flash-attn's varlen),
    so a packed micro-batch trains exactly as the padded one: same mean loss, same gradients."""
    model, processor = tiny
    lora = _lora_model(model)
    items = _items(model, processor, 4, seed=5)
    padded_loss, padded_grads = _loss_and_grads(lora, collate(items, processor.tokenizer.pad_token_id, "right"))
    packed_loss, packed_grads = _loss_and_grads(lora, collate_packed(items))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert len(padded_grads) == 2 * 2 * 7 + 4  # LoRA A and B of 7 projections x 2 layers, the projector's 4
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["flex_attention", "flash_attention_2", "flash_attention_4"])
def test_packed_rows_train_as_padded_ones_with_variable_length_attention_on_the_gpu(tiny, attention):
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

    if {"flash_attention_2": not is_flash_attn_2_available(), "flash_attention_4": not is_flash_attn_4_available()}.get(
        attention, False
    ):
        pytest.skip(f"{attention} is not installed")
    model, processor = tiny
    dtype = torch.float32 if attention == "flex_attention" else torch.bfloat16  # flash-attn: half precision only
    lora = _lora_model(model).to("cuda", dtype)
    items = _items(model, processor, 4, seed=5)
    padded = {k: v.cuda() for k, v in collate(items, processor.tokenizer.pad_token_id, "right").items()}
    padded_loss, padded_grads = _loss_and_grads(lora, {**padded, "pixel_values": padded["pixel_values"].to(dtype)})
    lora.base_model.model.set_attn_implementation({"text_config": attention})
    packed = {k: v.cuda() for k, v in collate_packed(items).items()}
    packed_loss, packed_grads = _loss_and_grads(lora, {**packed, "pixel_values": packed["pixel_values"].to(dtype)})
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(packed_loss, padded_loss, **tol)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, **tol, msg=name)


@pytest.mark.parametrize("world", [1, 2])
def test_length_grouping_keeps_every_sample_once_and_cuts_padding(world):
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(1000)]
    bs = 8

    def pad_fraction(grouped):
        per_rank = [
            epoch_indices(len(lengths), 0, 0, Dist(r, world, r, CPU), 0, bs, lengths if grouped else None)
            for r in range(world)
        ]
        seen = sorted(j for idx in per_rank for j in idx)
        assert seen == sorted(list(range(1000)) + list(range(1000))[: (-1000) % world])
        slots = real = 0
        for idx in per_rank:
            for k in range(0, len(idx), bs):
                batch = [lengths[j] for j in idx[k : k + bs]]
                slots, real = slots + max(batch) * len(batch), real + sum(batch)
        return 1 - real / slots

    random_pad, grouped_pad = pad_fraction(False), pad_fraction(True)
    assert random_pad > 0.3 and grouped_pad < 0.05
    # deterministic per (seed, epoch), different across epochs
    d = Dist(0, world, 0, CPU)
    assert epoch_indices(1000, 0, 1, d, 0, bs, lengths) == epoch_indices(1000, 0, 1, d, 0, bs, lengths)
    assert epoch_indices(1000, 0, 1, d, 0, bs, lengths) != epoch_indices(1000, 0, 2, d, 0, bs, lengths)
    assert epoch_indices(1000, 0, 1, d, 16, bs, lengths) == epoch_indices(1000, 0, 1, d, 0, bs, lengths)[16:]


@pytest.mark.parametrize("packed", [False, True])
def test_a_bad_image_in_a_loader_worker_surfaces_as_the_input_error_naming_it(tiny, tmp_path, packed):
    import numpy as np
    from medlava.io import InputError
    from medlava.models.inputs import Encoder, SampleDataset, raise_batch_error
    from PIL import Image

    _, processor = tiny
    for i in range(4):
        Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes((tmp_path / "2.png").read_bytes()[:60])  # truncated mid-file
    conv = [{"from": "human", "value": "<image>\nDescribe the lesion."}, {"from": "gpt", "value": "benign"}]
    samples = [{"id": f"s{i}", "image": f"{i}.png", "conversations": conv} for i in range(4)]
    dataset = SampleDataset(samples, Encoder(processor, "mistral_instruct", 16, 256, tmp_path))
    fn = collate_packed if packed else lambda items: collate(items, processor.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=fn)
    first, second = list(loader)
    raise_batch_error(first)  # a good batch passes
    assert first["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(InputError) as e:
        raise_batch_error(second)
    assert str(e.value).startswith(f"image {tmp_path / '2.png'} (sample s2) cannot be read")
    assert "Traceback" not in str(e.value)
