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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from safetensors.torch import save_file

from components.errors import ModelError
from components.folders import record
from components.io import atomic_dir, write_json_atomic
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
    save_head,
    save_projector,
)
from components.llm.optim import lr_at, param_groups
from components.llm.prompts import PromptBuilder
from components.llm.samples import collate, read_titles, trained_pool, training_samples, user_vectors
from components.llm.stage_folder import StageFolder, save_stage_config

PROMPT_FORMAT = 3  # components.llm.prompts: a marker after every candidate, canonical order, `[USER]` last

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
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if stage not in (1, 2):
        raise ModelError(f"--stage must be 1 or 2 (got {stage})")
    llm_s, seed = settings.llm, settings.seed
    st = llm_s.stage1 if stage == 1 else llm_s.stage2
    cuda = torch.cuda.is_available() and llm_s.device != "cpu"
    if llm_s.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("llm.device is 'cuda' but no CUDA device is available")
    if llm_s.threads:
        torch.set_num_threads(llm_s.threads)
    # bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX); fp32 weights on CPU
    bf16 = llm_dtype(llm_s.dtype, "cuda" if cuda else "cpu") == "bfloat16"
    acc = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if bf16 else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rank, world = acc.process_index, acc.num_processes
    if st.batch_size < world:
        raise ModelError(f"llm.stage{stage}.batch_size ({st.batch_size}) must be >= processes ({world})")

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
    user_vecs = None  # SASRec's user vector of each sample ([USER] token and distillation, stage 2)
    if stage == 2 and (llm_s.user_token or llm_s.loss.distill > 0 or llm_s.head_init == "recommender"):
        if sasrec_dir is None:
            raise ModelError(
                "llm.user_token / llm.loss.distill / llm.head_init need the SASRec model folder as item_table"
            )
        user_vecs = user_vectors(sasrec_dir, [list(s.prefix) for s in samples])
    model, tok = build_model(
        stage,
        llm_s,
        base_dir,
        stage1_dir,
        table,
        seed,
        torch.bfloat16 if cuda else torch.float32,
        user_vecs,
        pool,
    )
    builder = PromptBuilder(
        tok,
        titles,
        unified=stage == 2,
        n_id_items=0 if table is None else table.shape[0] - 1,
        cold_items=[] if table is None else sorted(set(range(1, table.shape[0])) - set(pool.tolist())),
        max_prompt_tokens=st.max_prompt_tokens,
        marked=True,
        user_token=stage == 2 and llm_s.user_token,
        titles_in_prompt=llm_s.prompt_titles,
        user_at_end=True,
    )
    if stage == 2 and llm_s.loss.id_text_space == "input":
        model.register_buffer("title_table", title_table(model, builder), persistent=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, st.new_lr_scale), lr=st.lr, weight_decay=st.weight_decay
    )

    # the whole run's order: one seeded permutation per epoch, cut into global batches
    order = np.concatenate(
        [np.random.default_rng([seed, stage, e]).permutation(len(samples)) for e in range(st.epochs)]
    )
    batches = [order[i : i + st.batch_size] for i in range(0, len(order), st.batch_size)]
    total = len(batches)

    key = run_key(stage, llm_s, seed, prepared, base_dir, stage1_dir, table)
    ckpt_dir = Path(llm_s.checkpoint_dir) / f"stage{stage}-{key}"
    start, log, elapsed = 0, [], 0.0
    last = latest_checkpoint(ckpt_dir)
    head_fit = None  # a resumed run loads the head it had trained instead
    if stage == 2 and llm_s.head_init == "recommender" and last is None:
        head_fit = init_from_recommender(
            model, samples, builder, user_vecs, llm_s.head_init_samples, st.batch_size, seed
        )
        if acc.is_main_process:
            console.print(f"stage 2: score head started at SASRec's geometry (ridge fits {head_fit})")
    if last is not None:
        meta = load_checkpoint(last, model, optimizer)
        start, log, elapsed = meta["step"], meta["log"], meta["elapsed"]
        if acc.is_main_process:
            console.print(f"stage {stage}: resumed from {last} (step {start}/{total})")
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)
    weights = {
        "a": llm_s.loss.user_item,
        "b": llm_s.loss.id_text if stage == 2 else 0.0,
        "c": llm_s.loss.distill if stage == 2 else 0.0,
        "temperature": llm_s.loss.temperature,
        "distill_temperature": llm_s.loss.distill_temperature,
        "id_text_space": llm_s.loss.id_text_space,
    }
    model.train()
    run_steps = 0
    for step in range(start, total):
        if stop_after is not None and run_steps >= stop_after:
            break
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, st.lr, st.warmup_steps, total) * g["scale"]
        torch.manual_seed(seed * 1_000_003 + step * 101 + rank)  # dropout: same on a resumed run
        picked = batches[step][rank::world]
        rows = [samples[i] for i in picked.tolist()]
        vecs = None if user_vecs is None else user_vecs[torch.from_numpy(picked)]
        batch = {k: v.to(acc.device) for k, v in collate(rows, builder, vecs).items()}
        with acc.autocast():
            out = model(batch, weights)
        acc.backward(out["loss"])
        if st.max_grad_norm:
            acc.clip_grad_norm_(trainable, st.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        names = ("loss", "lm", "user_item", "id_text", "distill", "id_text_negatives", "cos_id", "cos_text")
        parts = torch.stack([out[n].detach().float() for n in names])
        parts = acc.reduce(parts, reduction="mean").tolist()
        seconds = time.perf_counter() - t0
        elapsed += seconds
        run_steps += 1
        log.append(
            {
                "step": step + 1,
                "loss": round(parts[0], 5),
                "lm": round(parts[1], 5),
                "user_item": round(parts[2], 5),
                "id_text": round(parts[3], 5),
                "distill": round(parts[4], 5),
                "id_text_negatives": round(parts[5], 1),
                "cos_id": round(parts[6], 4),
                "cos_text": round(parts[7], 4),
                "seconds": round(seconds, 3),
                "samples": len(batches[step]),
                "tokens": int(batch["attention_mask"].sum()) * world,
            }
        )
        if acc.is_main_process and ((step + 1) % st.log_every == 0 or step + 1 == total):
            console.print(
                f"stage {stage} step {step + 1}/{total} loss {parts[0]:.4f} (lm {parts[1]:.4f} "
                f"ui {parts[2]:.4f} it {parts[3]:.4f} kd {parts[4]:.4f}) {seconds:.2f} s/step "
                f"{len(batches[step]) / seconds:.2f} samples/s",
                highlight=False,
            )
        if not math.isfinite(parts[0]):
            raise ModelError(
                f"stage {stage}: loss is {parts[0]} at step {step + 1}; lower llm.stage{stage}.lr"
            )
        if st.checkpoint_every and (step + 1) % st.checkpoint_every == 0 and step + 1 < total:
            if acc.is_main_process:
                save_checkpoint(
                    ckpt_dir,
                    step + 1,
                    raw,
                    optimizer,
                    {"log": log, "elapsed": elapsed, "total": total, "key": key},
                )
            acc.wait_for_everyone()

    done = start + run_steps
    timed = log[start:] if run_steps else log
    timed_s = max(1e-9, sum(r["seconds"] for r in timed))
    summary = {
        "stage": stage,
        "steps": total,
        "steps_done": done,
        "resumed_from": start,
        "samples": len(samples),
        "epochs": st.epochs,
        "batch_size": st.batch_size,
        "processes": world,
        "device": str(acc.device),
        "seconds": round(elapsed, 1),
        "seconds_per_step": round(float(np.mean([r["seconds"] for r in timed])), 3) if timed else None,
        "samples_per_s": round(sum(r["samples"] for r in timed) / timed_s, 3) if timed else None,
        "tokens_per_s": round(sum(r["tokens"] for r in timed) / timed_s, 1) if timed else None,
        "first_loss": log[0]["loss"] if log else None,
        "last_loss": log[-1]["loss"] if log else None,
        # single steps are noisy: the mean over the first and the last tenth of the logged steps
        "loss_first_tenth": _mean_loss(log[: max(1, len(log) // 10)]),
        "loss_last_tenth": _mean_loss(log[-max(1, len(log) // 10) :]),
        "dtype": "bfloat16" if bf16 else "float32",
        "loss_parts_first_last_tenth": _parts_first_last(log),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "user_item_chance": round(math.log(llm_s.train_candidates), 4),
        "head_init": llm_s.head_init if stage == 2 else "fresh",
        "head_init_fit": head_fit,
        "checkpoint_dir": str(ckpt_dir),
        "key": key,
    }
    if done < total:  # stopped early: leave a checkpoint to resume from, write no outputs
        if acc.is_main_process:
            save_checkpoint(
                ckpt_dir, done, raw, optimizer, {"log": log, "elapsed": elapsed, "total": total, "key": key}
            )
        acc.wait_for_everyone()
        return summary
    if acc.is_main_process:
        write_outputs(out_dir, stage, raw, settings, builder, base_dir, summary, log, sasrec_dir)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: nothing left to resume
    acc.wait_for_everyone()
    return summary


def write_outputs(
    out_dir: Path,
    stage: int,
    model: RsllmModel,
    settings,
    builder: PromptBuilder,
    base_dir: Path,
    summary: dict,
    log: list[dict],
    sasrec_dir: Path | None = None,
) -> None:
    """adapter/ (peft, safetensors), projector + item table (stage 2), config.json, train_log.json."""
    llm_s = settings.llm
    with atomic_dir(Path(out_dir)) as tmp:
        model.llm.save_pretrained(str(tmp / "adapter"), safe_serialization=True, save_embedding_layers=False)
        if model.unified:
            save_projector(model.projector, tmp / "projector.safetensors")
            table = model.item_table.detach().float().cpu().contiguous()
            save_file({"item_embeddings": table}, str(tmp / "item_embeddings.safetensors"))
        save_head(model.head, tmp / "head.safetensors")
        if model.user_projector is not None:
            save_projector(model.user_projector, tmp / "user_projector.safetensors")
            shutil.copytree(sasrec_dir, tmp / "sasrec")  # the user vectors' encoder travels with the model
        config = StageFolder(
            format_version=1,
            stage=stage,
            mode="unified" if model.unified else "text",
            prompt_format=PROMPT_FORMAT,
            rank=llm_s.rank,
            user_token=model.user_projector is not None,
            prompt_titles=builder.titles_in_prompt,
            history_len=llm_s.history_len,
            max_prompt_tokens=builder.max_prompt_tokens,
            n_id_items=builder.n_id_items,
            cold_items=sorted(builder.cold_items),  # table rows without training data: title only
            base_dir=str(base_dir),
            seed=settings.seed,
            projector=model.projector.config() if model.unified else None,
            llm=llm_s.model_dump(mode="json"),
            train=record(summary),  # numpy numbers as JSON
        )
        save_stage_config(tmp, config)
        write_json_atomic(tmp / "train_log.json", log)
