"""The stages' optimiser set-up: AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import torch


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to 10% of lr (a pure function of the step: nothing to checkpoint)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (1.0 - 0.9 * frac)


def param_groups(model: torch.nn.Module, new_lr_scale: float) -> list[dict]:
    """The trainable parameters as AdamW groups: LoRA at the stage's lr, and the modules started at
    SASRec's geometry (score head, item and user projectors) at lr x new_lr_scale."""
    new = set()
    for name in ("head", "projector", "user_projector", "user", "item"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            new |= {id(p) for p in module.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in new], "scale": 1.0},
        {"params": [p for p in trainable if id(p) in new], "scale": new_lr_scale},
    ]
    return [g for g in groups if g["params"]]
