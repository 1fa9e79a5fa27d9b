"""The optimizer every training loop uses: fused AdamW with biases and norms (1-D parameters) kept out of weight decay,
as LLaVA, timm and open_clip do, and the LLaVA projector on its own learning rate where one is given."""

from __future__ import annotations

import torch

from medlava.models.llava import PROJECTOR


def param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, projector_lr: float | None = None
) -> list[dict]:
    """The trainable parameters in groups named `model` / `projector` (what TensorBoard's lr curves read)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((PROJECTOR in name, p.ndim >= 2), []).append(p)
    return [
        {
            "params": ps,
            "lr": (projector_lr or lr) if proj else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": "projector" if proj else "model",
        }
        for (proj, decay), ps in sorted(groups.items())
    ]


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, projector_lr: float | None = None
) -> torch.optim.AdamW:
    # fused: one kernel per step for all of a group's tensors (CPU and CUDA alike) instead of foreach's chain.
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, projector_lr), lr=lr, betas=(0.9, 0.999), fused=True)
