"""SASRec training and scoring on data/prepared/.

Training (the way the strongest reference implementations train SASRec): every position of a user's
training sequence (items[:-2]) predicts the next item, with a softmax cross-entropy over ALL items
(no negative sampling), Adam, early stopping on validation NDCG@10 (full ranking) with patience.
A sequence longer than `max_len` is cut into windows of `max_len` inputs ending every `train_stride`
items; each target is counted once, in the window that gives it the most context (at least
max_len - train_stride items), so the loss matches RecBole's prefix augmentation with far less compute.

Evaluation (RecBole's standard full-ranking protocol): the input is the user's sequence before the
target (the last `max_len` items; valid: items[:-2] -> items[-2], test: items[:-1] -> items[-1]);
every item of the catalogue is scored, the items the user interacted with before the target are
masked out (the target itself never is), padding is never recommended. HR@10 / NDCG@10 come from the
target's rank (components.metrics). The fixed 20-candidate sets of data/prepared/{valid,test}.parquet
are scored with the same input, over the candidate list only (nothing masked): HR@1, HR@5, NDCG@5.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file

from components.config import SasrecSettings
from components.errors import ModelError
from components.folders import FolderConfig, load_config, record, save_config
from components.io import atomic_dir, write_json_atomic
from components.metrics import ranking_metrics, target_ranks
from components.prepare import Prepared, load_prepared, trained_ids
from components.sasrec import SASRec, SASRecConfig

MODEL_FORMAT = "rsllm-sasrec/1"  # safetensors metadata of model.safetensors
FULL_KS = {"hr": (10,), "ndcg": (10,)}
CAND_KS = {"hr": (1, 5), "ndcg": (5,)}
console = Console(stderr=True)


def pad_left(histories: list[np.ndarray] | list[list[int]], max_len: int) -> np.ndarray:
    """The last `max_len` items of each history, left-padded with 0 -> int64 [len(histories), max_len]."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for row, hist in enumerate(histories):
        tail = np.asarray(hist, dtype=np.int64)[-max_len:]
        if tail.size:
            out[row, max_len - tail.size :] = tail
    return out


def training_windows(
    train_seqs: list[np.ndarray], max_len: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut training sequences into left-padded (inputs, targets) windows, each target counted once.

    For a sequence s, pair t is (input s[t], target s[t+1]). Windows of up to `max_len` pairs end at
    m, m - stride, m - 2*stride, ... (m = number of pairs); a window counts only its last `stride`
    targets (the earlier ones belong to the previous window), except the first window of the sequence,
    which counts all. Uncounted targets are 0 (ignored). Returns two int64 arrays [n_windows, max_len].
    """
    inputs, targets = [], []
    for seq in train_seqs:
        m = len(seq) - 1
        end = m
        while end > 0:
            start = max(0, end - max_len)
            x = seq[start:end]
            y = seq[start + 1 : end + 1].copy()
            if start > 0:
                y[: len(y) - stride] = 0
            inputs.append(x)
            targets.append(y)
            if start == 0:
                break
            end -= stride
    return pad_left(inputs, max_len), pad_left(targets, max_len)


def split_inputs(
    data: Prepared, split: str, max_len: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Model inputs of a split: (padded prefixes [n, max_len], targets [n], seen items per row,
    candidates [n, C])."""
    df = data.valid if split == "valid" else data.test
    offset = 2 if split == "valid" else 1
    prefixes = [data.sequences[int(u)][:-offset] for u in df["user_idx"]]
    cands = np.asarray(df["candidates"].tolist(), dtype=np.int64)
    return pad_left(prefixes, max_len), df["target"].to_numpy(np.int64), prefixes, cands


# ------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def evaluate_split(
    model: SASRec,
    data: Prepared,
    split: str,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    candidates: bool = True,
) -> dict[str, dict[str, float]]:
    """{"full", "full_unmasked": {"hr@10", "ndcg@10"}, "candidates": {"hr@1", "hr@5", "ndcg@5"}}.

    full: every item ranked, the user's earlier items masked (this project's protocol); full_unmasked:
    nothing masked (RecBole's full-sort evaluation of sequential models), for a like-for-like comparison.
    """
    model.eval()
    inputs, targets, seen, cands = split_inputs(data, split, model.cfg.max_len)
    untrained = ~data.trained  # rows no training target reached: never ranked, in either protocol
    full_ranks, cand_ranks, unmasked_ranks = [], [], []
    for lo in range(0, len(targets), batch_size):
        hi = min(lo + batch_size, len(targets))
        scores = model.score_all(torch.from_numpy(inputs[lo:hi]).to(device)).float().cpu().numpy()  # [b, N+1]
        scores[:, untrained] = -np.inf
        tgt = targets[lo:hi]
        if candidates:
            cand_scores = np.take_along_axis(scores, cands[lo:hi], axis=1)  # [b, C]
            cand_ranks.append(target_ranks(cand_scores, np.argmax(cands[lo:hi] == tgt[:, None], axis=1)))
        rows = np.arange(hi - lo)
        unmasked_ranks.append(target_ranks(scores, tgt))
        target_scores = scores[rows, tgt]
        for r, hist in enumerate(seen[lo:hi]):
            scores[r, hist] = -np.inf  # items seen before the target
        scores[rows, tgt] = target_scores  # ...but never the target itself
        full_ranks.append(target_ranks(scores, tgt))
    out = {
        "full": ranking_metrics(np.concatenate(full_ranks), FULL_KS["hr"], FULL_KS["ndcg"]),
        "full_unmasked": ranking_metrics(np.concatenate(unmasked_ranks), FULL_KS["hr"], FULL_KS["ndcg"]),
    }
    if candidates:
        out["candidates"] = ranking_metrics(np.concatenate(cand_ranks), CAND_KS["hr"], CAND_KS["ndcg"])
    return out


# ------------------------------------------------------------------------------------ training


def pick_device(name: str) -> torch.device:
    """ "auto": CUDA when present, else CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("sasrec.device: 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda")
    return torch.device("cpu")


def model_config(cfg: SasrecSettings, n_items: int) -> SASRecConfig:
    return SASRecConfig(
        n_items=n_items,
        max_len=cfg.max_len,
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        inner=cfg.inner,
        dropout=cfg.dropout,
        attn_dropout=cfg.attn_dropout,
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]SASRec[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )


def fit(
    data: Prepared, cfg: SasrecSettings, seed: int, device: torch.device | None = None, log: bool = False
) -> tuple[SASRec, list[dict], dict]:
    """Train SASRec with early stopping; returns (best model on CPU, curve rows, training info)."""
    device = device or pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_seqs = [s[:-2] for _, s in sorted(data.sequences.items())]
    x_all, y_all = training_windows(train_seqs, cfg.max_len, cfg.train_stride)
    if not (y_all != 0).any():
        raise ModelError("sasrec: no training targets (every training sequence is shorter than 2 items)")
    model = SASRec(model_config(cfg, data.n_items)).to(device)
    untrained = torch.from_numpy(~data.trained[1:]).to(device)  # [N]: classes no target reaches
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_bf16 = device.type == "cuda"
    curve: list[dict] = []
    best = {"ndcg": -1.0, "epoch": 0, "state": None}
    bad = 0
    t0 = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("train", total=cfg.max_epochs, info="")
        for epoch in range(1, cfg.max_epochs + 1):
            model.train()
            order = rng.permutation(len(x_all))
            total, count = 0.0, 0
            for lo in range(0, len(order), cfg.batch_size):
                idx = order[lo : lo + cfg.batch_size]
                x = torch.from_numpy(x_all[idx]).to(device)  # [B, L]
                y = torch.from_numpy(y_all[idx]).to(device)  # [B, L], 0 = no target
                sel = y != 0
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    h = model(x)[sel]  # [M, D]
                    logits = h @ model.item_emb.weight[1:].T  # [M, N]: padding is never a class
                    logits = logits.masked_fill(untrained, float("-inf"))  # nor an item without data
                loss = F.cross_entropy(logits.float(), y[sel] - 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = int(sel.sum())
                total += loss.item() * n
                count += n
            epoch_loss = total / count
            if not math.isfinite(epoch_loss):
                raise ModelError(f"sasrec: training loss is {epoch_loss} at epoch {epoch} (lower sasrec.lr)")
            row = {"epoch": epoch, "loss": round(epoch_loss, 6)}
            stop = False
            if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
                ndcg = evaluate_split(model, data, "valid", cfg.eval_batch_size, device, candidates=False)[
                    "full"
                ]["ndcg@10"]
                row["valid_ndcg@10"] = round(ndcg, 6)
                if ndcg > best["ndcg"]:
                    best = {
                        "ndcg": ndcg,
                        "epoch": epoch,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                    }
                    bad = 0
                else:
                    bad += 1
                    stop = bad >= cfg.patience
            curve.append(row)
            valid = row.get("valid_ndcg@10", float("nan"))
            info = (
                f"loss {epoch_loss:.4f}  valid ndcg@10 {valid:.4f}  best {best['ndcg']:.4f}@{best['epoch']}"
            )
            progress.update(task, advance=1, info=info)
            if log:
                console.print(f"epoch {epoch}: {info}", highlight=False)
            if stop:
                break
    model = model.to("cpu")
    model.load_state_dict(best["state"])
    model.eval()
    info = {
        "best_epoch": best["epoch"],
        "epochs_run": len(curve),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "train_windows": int(len(x_all)),
        "train_targets": int((y_all != 0).sum()),
        "device": str(device),
    }
    return model, curve, info


class SASRecFolder(FolderConfig):
    """models/sasrec/config.json: what rebuilds the module, plus how it was trained (a record)."""

    kind: Literal["sasrec"] = "sasrec"
    model: SASRecConfig  # the architecture; n_items = rows of the item table - 1
    training: dict[str, Any] = {}  # epochs, seconds, seed, settings: for people, never read back


def _legacy_sasrec(raw: dict) -> SASRecFolder:
    """v0 (before typed folders): {"format": "rsllm-sasrec/1", "model": {...}, "training": {...}}."""
    return SASRecFolder(
        format_version=1, model=SASRecConfig(**raw["model"]), training=raw.get("training", {})
    )


def save_sasrec_config(model_dir: Path, config: SASRecFolder) -> None:
    """Write models/sasrec/config.json."""
    save_config(model_dir, config)


def load_sasrec_config(model_dir: Path) -> SASRecFolder:
    """Read models/sasrec/config.json (v0 through its legacy reader); ModelError naming the file."""
    return load_config(model_dir, SASRecFolder, _legacy_sasrec)


def save_model(model: SASRec, item_ids: dict[int, str], out_dir: Path, training: dict | None = None) -> None:
    """Write models/sasrec/ atomically: model.safetensors, config.json (SASRecFolder), items.json
    (item_idx -> item_id of the trained rows; any other row of the table is untrained and never
    recommended)."""
    with atomic_dir(Path(out_dir)) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": MODEL_FORMAT})
        config = SASRecFolder(format_version=1, model=model.cfg, training=record(training))
        save_sasrec_config(tmp, config)
        mapping = {str(i): item_id for i, item_id in sorted(item_ids.items())}
        (tmp / "items.json").write_text(json.dumps(mapping, indent=1) + "\n")


def _weights(model_dir: Path) -> Path:
    weights = Path(model_dir) / "model.safetensors"
    if not weights.exists():
        raise ModelError(f"{weights}: not found (run `rsllm train-sasrec` first)")
    return weights


def load_sasrec(model_dir: Path) -> tuple[SASRec, SASRecConfig]:
    """Load models/sasrec/ -> (model in eval mode on CPU, its config)."""
    weights = _weights(model_dir)
    cfg = load_sasrec_config(model_dir).model
    model = SASRec(cfg)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ModelError(f"{weights}: weights do not match {Path(model_dir) / 'config.json'}: {e}") from None
    model.eval()
    return model, cfg


def load_item_embeddings(model_dir: Path) -> torch.Tensor:
    """The item embedding table [n_items + 1, hidden] (row 0 = padding) of models/sasrec/."""
    weights = _weights(model_dir)
    table = load_file(str(weights)).get("item_emb.weight")
    if table is None:
        raise ModelError(f"{weights}: no tensor 'item_emb.weight'")
    return table


def load_item_ids(model_dir: Path) -> dict[int, str]:
    """items.json: item_idx -> item_id of the trained rows."""
    path = Path(model_dir) / "items.json"
    if not path.exists():
        raise ModelError(f"{path}: not found")
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def train_sasrec(
    prepared_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_path: Path,
    cfg: SasrecSettings,
    seed: int,
    log: bool = False,
) -> dict:
    """Train on data/prepared, write the model, metrics JSON and training curve; return a summary."""
    data = load_prepared(prepared_dir)
    model, curve, info = fit(data, cfg, seed, log=log)
    metrics = {split: evaluate_split(model, data, split, cfg.eval_batch_size) for split in ("test", "valid")}
    metrics = {
        s: {g: {k: round(v, 6) for k, v in m.items()} for g, m in groups.items()}
        for s, groups in metrics.items()
    }
    save_model(model, trained_ids(data), out_dir, {**info, "seed": seed, "settings": cfg.model_dump()})
    write_json_atomic(metrics_path, metrics)
    write_json_atomic(plots_path, curve)
    return {
        "metrics": metrics,
        **info,
        "n_items": data.n_items,
        "users": len(data.test),
        "model_dir": str(out_dir),
    }
