"""DeepSpeed configs generated from the medlava config, so batch sizes, accumulation, clipping and
precision agree with it by construction (no hand-kept zero2.json / zero3.json)."""

from __future__ import annotations

import torch

from medlava.config import TrainConfig

STAGES = {"zero2": 2, "zero3": 3, "zero3_offload": 3}


def deepspeed_config(t: TrainConfig, dtype: torch.dtype) -> dict:
    """train_batch_size is left out: DeepSpeed derives it from micro batch x accumulation x world size."""
    stage = STAGES[t.deepspeed]
    offload = t.deepspeed == "zero3_offload"
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero |= {
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_param_persistence_threshold": 1e4,
            "stage3_prefetch_bucket_size": 5e7,
        }
    if offload:
        zero |= {
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
        }
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        # CPU offload needs DeepSpeed's CPU Adam; otherwise torch's AdamW (no JIT-compiled op needed).
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": not offload,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
