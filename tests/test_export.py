"""A LoRA + projector checkpoint exported as one standalone model gives the same outputs."""

import json
import os
import subprocess
import sys

import torch
from conftest import TINY
from medlava.config import ModelConfig
from medlava.models.llava import load_for_inference
from medlava.tools.export import export
from transformers import LlavaForConditionalGeneration


def test_exported_lora_model_matches_adapter_on_base(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLAVA_CACHE", str(tmp_path / "cache"))
    base = [
        "--config",
        str(TINY),
        f"output_root={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'ham'}",
        "data.synthetic.n_lesions=30",
        "run_id=x",
    ]
    for stage, extra in (("prepare", []), ("sft", ["sft.init_from=none", "sft.max_steps=3", "sft.lr=1e-2"])):
        out = subprocess.run(
            [sys.executable, "-m", "medlava", stage, *base, *extra], capture_output=True, text=True, env=os.environ
        )
        assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "runs" / "tiny" / "sft" / "x"
    ckpt = run / json.loads((run / "COMPLETE.json").read_text())["checkpoint"]

    out = export(run, tmp_path / "standalone", torch.float32)
    standalone = LlavaForConditionalGeneration.from_pretrained(out).eval()
    manifest = json.loads((ckpt / "medlava.json").read_text())
    merged, _, _ = load_for_inference(ModelConfig(name_or_path=manifest["base_model"]), ckpt, torch.float32)
    base_only = LlavaForConditionalGeneration.from_pretrained(manifest["base_model"]).eval()

    n_img = (32 // 8) ** 2
    ids = torch.tensor([[1] + [merged.config.image_token_id] * n_img + list(range(10, 30))])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = standalone(input_ids=ids, pixel_values=pixels).logits
        b = merged(input_ids=ids, pixel_values=pixels).logits
        c = base_only(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3  # the fine-tune is in there
    assert (out / "processor_config.json").exists() and (out / "tokenizer.json").exists()
