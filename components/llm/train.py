"""Two-stage fine-tuning through Hugging Face Accelerate (1 CPU, 1 GPU, or `accelerate launch` on several).

Stage 1: LoRA on text-only prompts.  Stage 2: starts from stage 1's adapter; trains projector + LoRA on
unified prompts.  Each stage draws `samples` (seeded, its own stream) of the training samples of
components/llm/samples.py: every position of every training sequence.

Batches are global: rank r of W processes trains on rows r::W of each batch, so a step means the same
thing on 1 or W processes.  Dropout is reseeded from (seed, step, rank) every step and the data order is a
function of the seed, so a run resumed from a checkpoint replays exactly what the killed run would have.
Checkpoints (trainable weights + AdamW state as safetensors, progress as JSON) go to
`<checkpoint_dir>/stage<k>-<hash of inputs + params>/`, outside every DVC output.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from components.errors import ModelError
from components.llm.base import llm_dtype, load_base
from components.llm.checkpoints import latest_checkpoint, load_checkpoint, run_key, save_checkpoint
from components.llm.head_init import init_from_recommender
from components.llm.model import (
    Projector,
    RsllmModel,
    ScoreHead,
    add_lora,
    calibrate_projector,
    load_head,
    load_item_table,
    load_lora,
)
from components.llm.optim import lr_at, param_groups
from components.llm.prompts import PromptBuilder
from components.llm.samples import collate, read_titles, trained_pool, training_samples, user_vectors
from components.llm.stage_folder import save_stage

console = Console(stderr=True, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- train


def _mean_loss(rows: list[dict]) -> float | None:
    """Mean training loss over some logged steps (None when there are none)."""
    return round(float(np.mean([r["loss"] for r in rows])), 4) if rows else None


def _parts_first_last(log: list[dict]) -> dict:
    """Each loss term and L_id_text's diagnostics: mean over the first and the last tenth of the steps.
    An InfoNCE that learnt nothing sits at ln(negatives + 1) (`id_text_chance`)."""
    n = max(1, len(log) // 10)
    out = {}
    for k in ("lm", "user_item", "id_text", "distill", "cos_id", "cos_text", "id_text_negatives"):
        vals = [[r.get(k, 0.0) for r in part] for part in (log[:n], log[-n:])]
        out[k] = [round(float(np.mean(v)), 4) if v else None for v in vals]
    neg = out["id_text_negatives"][0] or 0.0
    out["id_text_chance"] = round(math.log(neg + 1), 4) if neg else None
    return out


def build_model(
    stage: int,
    llm_settings,
    base_dir: Path,
    stage1_dir: Path | None,
    item_table: torch.Tensor | None,
    seed: int,
    dtype: torch.dtype,
    user_vecs: torch.Tensor | None = None,
    pool: np.ndarray | None = None,
):
    """Stage 1: base + fresh LoRA + fresh score head.  Stage 2: base + stage 1's LoRA and head (trainable)
    + fresh projector, calibrated on the table's rows in `pool` (the trained items; None: every row)
    (+ a fresh user projector with `llm.user_token`, calibrated on `user_vecs`)."""
    base, tok = load_base(base_dir, dtype=dtype)
    lora = llm_settings.lora
    hidden = base.config.hidden_size
    torch.manual_seed(seed)
    if stage == 1:
        llm = add_lora(base, lora.r, lora.alpha, lora.dropout, list(lora.target_modules))
        return RsllmModel(llm, head=ScoreHead(hidden, llm_settings.head_dim, llm_settings.head_layer)), tok
    if stage1_dir is None or item_table is None:
        raise ModelError("stage 2 needs stage 1's output folder and the SASRec item embeddings")
    llm = load_lora(base, Path(stage1_dir) / "adapter", trainable=True)
    head_path = Path(stage1_dir) / "head.safetensors"
    head = load_head(head_path) if head_path.exists() else ScoreHead(hidden, llm_settings.head_dim)
    head.layer = llm_settings.head_layer
    if llm_settings.head_id_skip:
        head.add_id_skip(item_table.shape[1])
    tokens = base.get_input_embeddings().weight
    projector = Projector(item_table.shape[1], hidden, llm_settings.projector_hidden)
    rows = item_table if pool is None else item_table[torch.from_numpy(np.concatenate([[0], pool]))]
    calibrate_projector(projector, rows, tokens)
    user_projector = None
    if llm_settings.user_token:
        if user_vecs is None:
            raise ModelError("llm.user_token needs the SASRec model folder (user vectors)")
        user_projector = Projector(user_vecs.shape[1], hidden, llm_settings.projector_hidden)
        sample = user_vecs[torch.randperm(len(user_vecs))[:4096]]
        calibrate_projector(user_projector, torch.cat([sample[:1] * 0, sample]), tokens)
    for p in head.parameters():
        p.requires_grad_(True)
    return RsllmModel(llm, projector, item_table, head, user_projector), tok


def title_table(model: RsllmModel, builder: PromptBuilder) -> torch.Tensor:
    """Mean input embedding of each item's title tokens [N + 1, H] (row 0 and gaps in the item index,
    which have no title: zeros): L_id_text `input`."""
    emb = model.causal_lm.get_input_embeddings().weight.detach()
    zero = emb.new_zeros(emb.shape[1])
    rows = [zero]
    rows += [
        emb[builder.title_ids(i)].mean(0) if str(builder.titles[i]).strip() else zero
        for i in range(1, len(builder.titles))
    ]
    return torch.stack(rows).float()


@dataclass
class StageData:
    """What one stage trains on: the samples, their SASRec user vectors (stage 2's `[USER]`, KL and head
    fit; else None), the trained items, the SASRec item table (stage 2) and the folder it came from."""

    samples: list
    user_vecs: torch.Tensor | None
    pool: np.ndarray
    titles: pd.Series
    table: torch.Tensor | None
    sasrec_dir: Path | None


def stage_settings(llm_s, stage: int):
    """`llm.stage1` or `llm.stage2`."""
    if stage not in (1, 2):
        raise ModelError(f"--stage must be 1 or 2 (got {stage})")
    return llm_s.stage1 if stage == 1 else llm_s.stage2


def accelerator(llm_s, batch_size: int, stage: int):
    """Accelerate on CUDA or CPU with bf16 autocast where native (CUDA, AVX512-BF16 / AMX; fp32 weights
    on CPU).  Returns (accelerator, bf16)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    cuda = torch.cuda.is_available() and llm_s.device != "cpu"
    if llm_s.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("llm.device is 'cuda' but no CUDA device is available")
    if llm_s.threads:
        torch.set_num_threads(llm_s.threads)
    bf16 = llm_dtype(llm_s.dtype, "cuda" if cuda else "cpu") == "bfloat16"
    acc = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if bf16 else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if batch_size < acc.num_processes:
        raise ModelError(
            f"llm.stage{stage}.batch_size ({batch_size}) must be >= processes ({acc.num_processes})"
        )
    return acc, bf16


def stage_data(stage: int, llm_s, st, seed: int, prepared: Path, item_table) -> StageData:
    """Draw the stage's samples (seeded, its own stream) and, in stage 2, read the SASRec item table and
    the samples' user vectors where a switch needs them."""
    table = load_item_table(item_table) if stage == 2 else None
    titles = read_titles(prepared)
    sequences = pd.read_parquet(Path(prepared) / "sequences.parquet")
    pool = trained_pool(prepared)
    samples = training_samples(
        sequences, pool, llm_s.history_len, llm_s.train_candidates, st.samples, seed, stream=stage
    )
    sasrec_dir = (
        Path(item_table) if isinstance(item_table, str | Path) and Path(item_table).is_dir() else None
    )
    user_vecs = None
    if stage == 2 and (llm_s.user_token or llm_s.loss.distill > 0 or llm_s.head_init == "recommender"):
        if sasrec_dir is None:
            raise ModelError(
                "llm.user_token / llm.loss.distill / llm.head_init need the SASRec model folder as item_table"
            )
        user_vecs = user_vectors(sasrec_dir, [list(s.prefix) for s in samples])
    return StageData(samples, user_vecs, pool, titles, table, sasrec_dir)


def prompt_builder(stage: int, llm_s, st, tok, data: StageData) -> PromptBuilder:
    """Stage 1: text-only prompts.  Stage 2: unified prompts; table rows without training data are cold
    (their title only)."""
    table = data.table
    return PromptBuilder(
        tok,
        data.titles,
        unified=stage == 2,
        n_id_items=0 if table is None else table.shape[0] - 1,
        cold_items=[] if table is None else sorted(set(range(1, table.shape[0])) - set(data.pool.tolist())),
        max_prompt_tokens=st.max_prompt_tokens,
        marked=True,
        user_token=stage == 2 and llm_s.user_token,
        titles_in_prompt=llm_s.prompt_titles,
        user_at_end=True,
    )


def batch_order(n_samples: int, st, seed: int, stage: int) -> list[np.ndarray]:
    """The whole run's order: one seeded permutation per epoch, cut into global batches."""
    order = np.concatenate(
        [np.random.default_rng([seed, stage, e]).permutation(n_samples) for e in range(st.epochs)]
    )
    return [order[i : i + st.batch_size] for i in range(0, len(order), st.batch_size)]


def loss_weights(llm_s, stage: int) -> dict:
    """L = L_lm + a L_user_item + b L_id_text + c L_distill (b, c: stage 2 only)."""
    return {
        "a": llm_s.loss.user_item,
        "b": llm_s.loss.id_text if stage == 2 else 0.0,
        "c": llm_s.loss.distill if stage == 2 else 0.0,
        "temperature": llm_s.loss.temperature,
        "distill_temperature": llm_s.loss.distill_temperature,
        "id_text_space": llm_s.loss.id_text_space,
    }


LOGGED = ("loss", "lm", "user_item", "id_text", "distill", "id_text_negatives", "cos_id", "cos_text")
ROUNDING = {"id_text_negatives": 1, "cos_id": 4, "cos_text": 4}  # the losses: 5 decimals


def train_step(model, optimizer, acc, trainable, batch: dict, weights: dict, max_grad_norm: float) -> dict:
    """One optimiser step on one global batch; returns each LOGGED term, averaged over processes."""
    with acc.autocast():
        out = model(batch, weights)
    acc.backward(out["loss"])
    if max_grad_norm:
        acc.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts = torch.stack([out[n].detach().float() for n in LOGGED])
    parts = acc.reduce(parts, reduction="mean").tolist()
    return {n: round(v, ROUNDING.get(n, 5)) for n, v in zip(LOGGED, parts, strict=True)}


def train_stage(
    stage: int,
    settings,
    prepared: Path,
    base_dir: Path,
    out_dir: Path,
    *,
    stage1_dir: Path | None = None,
    item_table: torch.Tensor | Path | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train one stage and write out_dir/{adapter/, projector.safetensors (stage 2), config.json,
    train_log.json}.  `stop_after` ends this run after that many steps, leaving only the checkpoint
    (it simulates a kill; tests use it).  Returns the summary written to config.json["train"]."""
    llm_s, seed = settings.llm, settings.seed
    st = stage_settings(llm_s, stage)
    acc, bf16 = accelerator(llm_s, st.batch_size, stage)
    rank, world = acc.process_index, acc.num_processes
    data = stage_data(stage, llm_s, st, seed, prepared, item_table)
    weights_dtype = torch.bfloat16 if acc.device.type == "cuda" else torch.float32
    model, tok = build_model(
        stage, llm_s, base_dir, stage1_dir, data.table, seed, weights_dtype, data.user_vecs, data.pool
    )
    builder = prompt_builder(stage, llm_s, st, tok, data)
    if stage == 2 and llm_s.loss.id_text_space == "input":
        model.register_buffer("title_table", title_table(model, builder), persistent=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, st.new_lr_scale), lr=st.lr, weight_decay=st.weight_decay
    )
    batches = batch_order(len(data.samples), st, seed, stage)
    total = len(batches)

    key = run_key(stage, llm_s, seed, prepared, base_dir, stage1_dir, data.table)
    ckpt_dir = Path(llm_s.checkpoint_dir) / f"stage{stage}-{key}"
    start, log, elapsed, head_fit = 0, [], 0.0, None
    if (last := latest_checkpoint(ckpt_dir)) is not None:  # a resumed run loads the head it had trained
        meta = load_checkpoint(last, model, optimizer)
        start, log, elapsed = meta["step"], meta["log"], meta["elapsed"]
        if acc.is_main_process:
            console.print(f"stage {stage}: resumed from {last} (step {start}/{total})")
    elif stage == 2 and llm_s.head_init == "recommender":
        head_fit = init_from_recommender(
            model, data.samples, builder, data.user_vecs, llm_s.head_init_samples, st.batch_size, seed
        )
        if acc.is_main_process:
            console.print(f"stage 2: score head started at SASRec's geometry (ridge fits {head_fit})")
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)
    weights = loss_weights(llm_s, stage)

    def checkpoint(steps: int) -> None:
        if acc.is_main_process:
            meta = {"log": log, "elapsed": elapsed, "total": total, "key": key}
            save_checkpoint(ckpt_dir, steps, raw, optimizer, meta)
        acc.wait_for_everyone()

    model.train()
    end = total if stop_after is None else min(total, start + stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, st.lr, st.warmup_steps, total) * g["scale"]
        torch.manual_seed(seed * 1_000_003 + step * 101 + rank)  # dropout: same on a resumed run
        picked = batches[step][rank::world]
        vecs = None if data.user_vecs is None else data.user_vecs[torch.from_numpy(picked)]
        rows = [data.samples[i] for i in picked.tolist()]
        batch = {k: v.to(acc.device) for k, v in collate(rows, builder, vecs).items()}
        parts = train_step(model, optimizer, acc, trainable, batch, weights, st.max_grad_norm)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        tokens = int(batch["attention_mask"].sum()) * world
        n = len(batches[step])
        log.append({"step": step + 1, **parts, "seconds": round(seconds, 3), "samples": n, "tokens": tokens})
        if acc.is_main_process and ((step + 1) % st.log_every == 0 or step + 1 == total):
            console.print(
                f"stage {stage} step {step + 1}/{total} loss {parts['loss']:.4f} (lm {parts['lm']:.4f} "
                f"ui {parts['user_item']:.4f} it {parts['id_text']:.4f} kd {parts['distill']:.4f}) "
                f"{seconds:.2f} s/step {n / seconds:.2f} samples/s",
                highlight=False,
            )
        if not math.isfinite(parts["loss"]):
            raise ModelError(
                f"stage {stage}: loss is {parts['loss']} at step {step + 1}; lower llm.stage{stage}.lr"
            )
        if st.checkpoint_every and (step + 1) % st.checkpoint_every == 0 and step + 1 < total:
            checkpoint(step + 1)

    summary = train_summary(stage, st, llm_s, log, (start, end, total), elapsed, len(data.samples), acc, bf16)
    summary |= {"head_init_fit": head_fit, "checkpoint_dir": str(ckpt_dir), "key": key}
    if end < total:  # stopped early: leave a checkpoint to resume from, write no outputs
        checkpoint(end)
        return summary
    if acc.is_main_process:
        save_stage(out_dir, stage, raw, settings, builder, base_dir, summary, log, data.sasrec_dir)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: nothing left to resume
    acc.wait_for_everyone()
    return summary


def train_summary(stage, st, llm_s, log, steps, elapsed, n_samples, acc, bf16) -> dict:
    """config.json["train"]: sizes, speed over this run's steps (`steps`: first, end, total), losses,
    dtype, peak memory."""
    start, end, total = steps
    timed = log[start:] if end > start else log
    timed_s = max(1e-9, sum(r["seconds"] for r in timed))
    tenth = max(1, len(log) // 10)
    return {
        "stage": stage,
        "steps": total,
        "steps_done": end,
        "resumed_from": start,
        "samples": n_samples,
        "epochs": st.epochs,
        "batch_size": st.batch_size,
        "processes": acc.num_processes,
        "device": str(acc.device),
        "seconds": round(elapsed, 1),
        "seconds_per_step": round(float(np.mean([r["seconds"] for r in timed])), 3) if timed else None,
        "samples_per_s": round(sum(r["samples"] for r in timed) / timed_s, 3) if timed else None,
        "tokens_per_s": round(sum(r["tokens"] for r in timed) / timed_s, 1) if timed else None,
        "first_loss": log[0]["loss"] if log else None,
        "last_loss": log[-1]["loss"] if log else None,
        # single steps are noisy: the mean over the first and the last tenth of the logged steps
        "loss_first_tenth": _mean_loss(log[:tenth]),
        "loss_last_tenth": _mean_loss(log[-tenth:]),
        "dtype": "bfloat16" if bf16 else "float32",
        "loss_parts_first_last_tenth": _parts_first_last(log),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "user_item_chance": round(math.log(llm_s.train_candidates), 4),
        "head_init": llm_s.head_init if stage == 2 else "fresh",
    }
