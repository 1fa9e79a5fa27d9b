"""Image aspect handling and gradient checkpointing on the tiny model."""

import numpy as np
import pytest
import torch
from medlava.config import ModelConfig, TinyModelConfig
from medlava.models.llava import enable_activation_checkpointing, load_processor
from medlava.models.tiny import build_tiny, tiny_checkpoint
from PIL import Image


@pytest.fixture()
def ckpt(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLAVA_CACHE", str(tmp_path))
    return str(tiny_checkpoint(TinyModelConfig()))


def test_pad_keeps_the_whole_scan_and_crop_cuts_it(ckpt):
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (32, 96, 3), dtype=np.uint8))  # 3:1, e.g. a panoramic scan
    pad = load_processor(ckpt, ModelConfig(name_or_path=ckpt, image_aspect="pad")).image_processor
    crop = load_processor(ckpt, ModelConfig(name_or_path=ckpt, image_aspect="crop")).image_processor
    p = pad(images=[wide], return_tensors="pt")["pixel_values"][0]
    c = crop(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert p.shape == c.shape == (3, 32, 32)
    # pad: the band above and below the image is the processor's mean colour, i.e. 0 after normalisation
    assert p[:, :8].abs().max() < 0.05 and p[:, -8:].abs().max() < 0.05
    assert p[:, 12:20].abs().max() > 0.5  # the image itself, squeezed into the middle band
    # crop: no band; the image fills the square (its left and right thirds are gone)
    assert c[:, :8].abs().max() > 0.5


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, _ = build_tiny(TinyModelConfig())
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad = "multi_modal_projector" in name or "language_model.layers.1." in name
        if checkpointing:
            enable_activation_checkpointing(model)
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        ids = torch.tensor([[1] + [model.config.image_token_id] * 16 + list(range(10, 40))])
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, pixel_values=pixels, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
