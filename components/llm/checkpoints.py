"""Training checkpoints: trainable weights and AdamW state as safetensors, progress as JSON, one atomic
folder per step under `<checkpoint_dir>/stage<k>-<run key>/` (outside every DVC output). The run key hashes
everything that determines a stage's training, so a changed input or param never resumes a stale run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.errors import ModelError
from components.io import atomic_dir
from components.llm.model import RsllmModel


def _file_digest(path: Path, full: bool = True) -> str:
    path = Path(path)
    if not path.exists():
        return "missing"
    if not full:  # large weights: size + first MiB
        with open(path, "rb") as fh:
            return f"{path.stat().st_size}:{hashlib.sha256(fh.read(1 << 20)).hexdigest()}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_key(
    stage: int,
    llm_settings,
    seed: int,
    prepared: Path,
    base_dir: Path,
    stage1_dir: Path | None,
    item_table: torch.Tensor | None,
) -> str:
    """Hash of everything that determines a stage's training run (not eval-only or logging settings)."""
    s = llm_settings.model_dump(mode="json")
    st = s[f"stage{stage}"]
    for k in ("checkpoint_every", "log_every"):
        st.pop(k, None)
    base_files = sorted(p for p in Path(base_dir).glob("*") if p.is_file())
    parts = {
        "stage": stage,
        "seed": seed,
        "stage_settings": st,
        "lora": s["lora"],
        "loss": s["loss"],
        "projector_hidden": s["projector_hidden"],
        "head_dim": s["head_dim"],
        "user_token": s["user_token"],
        "head_init": [s["head_init"], s["head_init_samples"]],
        "head_layer": s["head_layer"],
        "prompt_titles": s["prompt_titles"],
        "dtype": s["dtype"],
        "prompt_format": 2,
        "history_len": s["history_len"],
        "train_candidates": s["train_candidates"],
        "data": {n: _file_digest(Path(prepared) / n) for n in ("items.parquet", "sequences.parquet")},
        "base": {p.name: _file_digest(p, full=p.stat().st_size < (64 << 20)) for p in base_files},
    }
    if s.get("head_id_skip"):  # only when on: runs from before the switch keep their keys
        parts["head_id_skip"] = True
    if stage1_dir is not None:
        parts["stage1"] = _file_digest(Path(stage1_dir) / "adapter" / "adapter_model.safetensors")
    if item_table is not None:
        parts["item_table"] = hashlib.sha256(item_table.float().numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(
    ckpt_dir: Path, step: int, model: RsllmModel, optimizer, state: dict, keep: int = 1
) -> None:
    """trainable.safetensors + optimizer.safetensors + state.json, in one atomic folder step-XXXXXXXX."""
    with atomic_dir(ckpt_dir / f"step-{step:08d}") as tmp:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        sd = optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{k}"] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars, **state}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (atomic_dir: a visible step-* folder is complete)."""
    done = sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: RsllmModel, optimizer) -> dict:
    """Restore trainable weights and optimizer state in place; returns the saved state.json."""
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise ModelError(f"{path}: checkpoint does not match the model (e.g. {sorted(missing)[:3]})")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def prune_runs(checkpoint_dir: Path, keep: int) -> list[str]:
    """Delete all but the `keep` most recently written run folders (stage<k>-<key>); return their names.

    A finished run deletes its own checkpoints; what is left belongs to stopped or killed runs.
    """
    runs = sorted(
        (p for p in Path(checkpoint_dir).glob("stage*-*") if p.is_dir()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in runs[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return [p.name for p in runs[keep:]]
