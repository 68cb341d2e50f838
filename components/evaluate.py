"""Evaluation: every model scored on the identical 20-candidate test sets, with uncertainty.

Models: popularity, SASRec, the base LLM zero-shot, stage 1, stage 2 (and, for the gate, the production
model). Also the task the service runs: retrieval's top 10 of the whole catalogue against the LLM's
rerank of retrieval's top 20 (full-catalogue HR@10 / NDCG@10, history masked), which decides whether
the promoted model reranks by default (components.gate).
Users: the first `llm.eval_users` test users by user_idx, the same for every model.
Per model: HR@1, HR@5, NDCG@5, ValidRatio in ranking mode (the top-scored candidate is always a
candidate), ValidRatio in generation mode (greedy decoding mapped back by exact title), 95%
bootstrap intervals, and a paired test of stage 2 vs SASRec on the same users.

Outputs: metrics/eval.json, reports/eval/per_user.parquet, reports/eval/comparison.md, .html plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from components.config import Settings
from components.errors import ModelError
from components.io import atomic_dir, atomic_file, write_json_atomic
from components.metrics import target_ranks, valid_ratio

BOOTSTRAP = 1000
METRICS = ("hr@1", "hr@5", "ndcg@5")


def eval_users(prepared: Path, n: int, split: str = "test") -> pd.DataFrame:
    """The evaluated rows of a split: the first n by user_idx (every model sees exactly these)."""
    rows = pd.read_parquet(Path(prepared) / f"{split}.parquet").sort_values("user_idx", kind="stable")
    return rows.head(n).reset_index(drop=True)


def per_user_frame(model: str, user_idx, ranks: np.ndarray, generated_valid=None) -> pd.DataFrame:
    """One row per user: rank of the target (0 = top), hit@1, hit@5, ndcg@5, generation validity."""
    ranks = np.asarray(ranks, dtype=np.int64)
    return pd.DataFrame(
        {
            "model": model,
            "user_idx": np.asarray(user_idx, dtype=np.int64),
            "rank": ranks,
            "hr@1": (ranks < 1).astype(float),
            "hr@5": (ranks < 5).astype(float),
            "ndcg@5": np.where(ranks < 5, 1.0 / np.log2(ranks + 2.0), 0.0),
            "valid_generation": pd.array(
                generated_valid if generated_valid is not None else [pd.NA] * len(ranks), dtype="boolean"
            ),
        }
    )


@torch.no_grad()
def sasrec_candidate_scores(
    sasrec_dir: Path, prepared: Path, rows: pd.DataFrame, split: str = "test"
) -> np.ndarray:
    """SASRec's scores [U, C] of each row's candidates (input: the whole prefix before the target: the
    sequence without its last item for test, without its last two for valid)."""
    from components.prepare import load_prepared
    from components.recommender import load_sasrec, pad_left

    cut = {"test": 1, "valid": 2}[split]
    model, cfg = load_sasrec(sasrec_dir)
    model.eval()
    data = load_prepared(prepared)
    prefixes = [data.sequences[int(u)][:-cut] for u in rows["user_idx"]]
    scores = model.score_all(torch.from_numpy(pad_left(prefixes, cfg.max_len))).float().numpy()  # [U, N+1]
    cands = np.array(rows["candidates"].tolist(), dtype=np.int64)  # [U, C]
    return np.take_along_axis(scores, cands, axis=1)


def score_sasrec(sasrec_dir: Path, prepared: Path, rows: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """SASRec's per-user candidate ranks on `rows` of the test (or valid) split."""
    cand_scores = sasrec_candidate_scores(sasrec_dir, prepared, rows, split)
    cands = np.array(rows["candidates"].tolist(), dtype=np.int64)
    ranks = target_ranks(cand_scores, np.argmax(cands == rows["target"].to_numpy()[:, None], axis=1))
    return per_user_frame("sasrec", rows["user_idx"], ranks)


def training_counts(prepared: Path, minlength: int = 0) -> np.ndarray:
    """How often each item_idx occurs in the training part of every sequence (the last two items of each
    are valid and test): popularity's scores."""
    seqs = pd.read_parquet(Path(prepared) / "sequences.parquet")
    train = np.concatenate([np.asarray(s, np.int64)[:-2] for s in seqs["items"]] or [np.zeros(0, np.int64)])
    return np.bincount(train, minlength=minlength)


def score_popularity(prepared: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """Popularity's per-user candidate ranks: how often each item occurs in the training part of every
    sequence (the last two items of each are valid and test)."""
    counts = training_counts(prepared, int(max(map(max, rows["candidates"]))) + 1).astype(float)
    cands = np.array(rows["candidates"].tolist(), dtype=np.int64)
    targets = rows["target"].to_numpy()
    ranks = target_ranks(counts[cands], np.argmax(cands == targets[:, None], axis=1))
    return per_user_frame("popularity", rows["user_idx"], ranks)


def score_llm(
    name: str,
    base_dir: Path,
    stage_dir: Path | None,
    prepared: Path,
    settings: Settings,
    device: str = "auto",
    progress: bool = False,
    rank: str | None = None,
    split: str = "test",
) -> pd.DataFrame:
    """An LLM's per-user ranks (its ranking mode, or `rank`) and generation validity on the evaluated
    users (the first llm.eval_users of the test split; of the valid split, for tuning, without
    generation)."""
    from components.llm.rank import evaluate_split, ranks_from

    cfg = settings.llm
    ranked = evaluate_split(
        base_dir,
        stage_dir,
        prepared,
        split=split,
        users=cfg.eval_users,
        generation_users=min(cfg.generation_users, cfg.eval_users) if split == "test" else 0,
        batch_users=cfg.eval_batch_users,
        max_new_tokens=cfg.max_new_tokens,
        device=device,
        dtype=cfg.dtype,
        progress=progress,
        rank=rank,
    )
    ranked = ranked.sort_values("user_idx", kind="stable").reset_index(drop=True)
    frame = per_user_frame(name, ranked["user_idx"], ranks_from(ranked), ranked.get("valid"))
    # ValidRatio in ranking mode, computed (not assumed): the top-scored item is one of the candidates.
    answers = [c[int(np.argmax(s))] for c, s in zip(ranked["candidates"], ranked["scores"], strict=True)]
    frame.attrs["valid_ratio"] = valid_ratio(answers, ranked["candidates"].tolist())
    frame.attrs["seconds_per_user"] = float(ranked["seconds"].mean())
    return frame


@torch.no_grad()
def retrieval_top(
    sasrec_dir: Path, prepared: Path, rows: pd.DataFrame, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """SASRec's top n of the whole catalogue per user (earlier items masked, as the service retrieves)
    and the target's full-catalogue rank. Returns (top [U, n], target ranks [U])."""
    from components.prepare import load_prepared
    from components.recommender import load_sasrec, pad_left

    model, cfg = load_sasrec(sasrec_dir)
    data = load_prepared(prepared)
    prefixes = [data.sequences[int(u)][:-1] for u in rows["user_idx"]]
    scores = model.score_all(torch.from_numpy(pad_left(prefixes, cfg.max_len))).float().numpy()  # [U, N+1]
    scores[:, ~data.trained] = -np.inf  # rows without training data: the service never retrieves them
    targets = rows["target"].to_numpy()
    for r, seen in enumerate(prefixes):
        scores[r, seen[seen != targets[r]]] = -np.inf
    ranks = target_ranks(scores, targets)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    return top, ranks


def rerank_on_retrieval(
    settings: Settings,
    prepared: Path,
    sasrec_dir: Path,
    base_dir: Path,
    stage_dir: Path,
    rows: pd.DataFrame,
    device: str = "auto",
    retrieve: int = 20,
    k: int = 10,
) -> dict:
    """The service's task: retrieval's top k vs the LLM's rerank of retrieval's top `retrieve`, scored
    over the whole catalogue (HR@k, NDCG@k; a target outside the retrieved items is a miss for both)."""
    from components.llm.rank import evaluate_split

    top, full_ranks = retrieval_top(sasrec_dir, prepared, rows, retrieve)
    cand_rows = rows.assign(candidates=[t.tolist() for t in top])
    ranked = evaluate_split(
        base_dir,
        stage_dir,
        prepared,
        split="test",
        rows=cand_rows,
        batch_users=settings.llm.eval_batch_users,
        device=device,
        dtype=settings.llm.dtype,
    ).sort_values("user_idx", kind="stable")
    rerank_ranks = np.full(len(ranked), 10**6, dtype=np.int64)  # target not retrieved: a miss
    for r, (scores, col) in enumerate(zip(ranked["scores"], ranked["target_col"], strict=True)):
        if col >= 0:
            rerank_ranks[r] = target_ranks(np.array([scores]), np.array([col]))[0]
    out = {"users": int(len(rows)), "retrieved": retrieve, "k": k}
    ndcg = {}
    for name, ranks in (("retrieval", full_ranks), ("rerank", rerank_ranks)):
        ndcg[name] = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)  # [U]
        out[name] = {
            f"hr@{k}": round(float((ranks < k).mean()), 6),
            f"ndcg@{k}": round(float(ndcg[name].mean()), 6),
        }
    out[f"gain_ndcg@{k}"] = round(out["rerank"][f"ndcg@{k}"] - out["retrieval"][f"ndcg@{k}"], 6)
    lo, hi = bootstrap_ci(ndcg["rerank"] - ndcg["retrieval"], settings.seed)  # paired: the same users
    out[f"gain_ndcg@{k}_ci95"] = [round(lo, 6), round(hi, 6)]
    out[f"gain_hr@{k}"] = round(out["rerank"][f"hr@{k}"] - out["retrieval"][f"hr@{k}"], 6)
    return out


def bootstrap_ci(values: np.ndarray, seed: int, n: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n, values.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarise(frame: pd.DataFrame, seed: int) -> dict:
    """The metrics block of one model (eval.json shape)."""
    out: dict = {"users": int(len(frame))}
    for m in METRICS:
        out[m] = round(float(frame[m].mean()), 6)
        lo, hi = bootstrap_ci(frame[m].to_numpy(), seed)
        out[f"{m}_ci95"] = [round(lo, 6), round(hi, 6)]
    out["valid_ratio"] = round(float(frame.attrs.get("valid_ratio", 1.0)), 6)
    gen = frame["valid_generation"].dropna()
    out["valid_ratio_generation"] = round(float(gen.mean()), 6) if len(gen) else None
    out["generation_users"] = int(len(gen))
    if "seconds_per_user" in frame.attrs:
        out["seconds_per_user"] = round(frame.attrs["seconds_per_user"], 4)
    return out


def paired_test(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """a vs b (e.g. stage 2 vs SASRec) on the same users: exact McNemar on HR@1, Wilcoxon on NDCG@5."""
    m = a.merge(b, on="user_idx", suffixes=("_a", "_b"))
    wins = int(((m["hr@1_a"] == 1) & (m["hr@1_b"] == 0)).sum())
    losses = int(((m["hr@1_a"] == 0) & (m["hr@1_b"] == 1)).sum())
    mcnemar = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    diff = m["ndcg@5_a"] - m["ndcg@5_b"]
    wilcoxon = float(stats.wilcoxon(diff).pvalue) if (diff != 0).any() else 1.0
    return {
        "users": int(len(m)),
        "hr@1_wins": wins,
        "hr@1_losses": losses,
        "mcnemar_p": round(float(mcnemar), 6),
        "ndcg@5_mean_diff": round(float(diff.mean()), 6),
        "wilcoxon_p": round(wilcoxon, 6),
    }


def comparison_markdown(metrics: dict, paired: dict | None) -> str:
    """The comparison table (markdown) of every model on the same candidates."""
    lines = [
        "| model | users | HR@1 [95% CI] | HR@5 | NDCG@5 | ValidRatio (rank) | ValidRatio (gen) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        if not isinstance(m, dict) or "hr@1" not in m:
            continue
        lo, hi = m["hr@1_ci95"]
        gen = "n/a" if m.get("valid_ratio_generation") is None else f"{m['valid_ratio_generation']:.3f}"
        lines.append(
            f"| {name} | {m['users']} | {m['hr@1']:.4f} [{lo:.3f}, {hi:.3f}] | {m['hr@5']:.4f} | "
            f"{m['ndcg@5']:.4f} | {m['valid_ratio']:.3f} | {gen} |"
        )
    rr = metrics.get("rerank_on_retrieval")
    if rr:
        k = rr["k"]
        lines += [
            "",
            f"The service's task on {rr['users']} users (whole catalogue, history masked): "
            f"retrieval's top {k} HR@{k} {rr['retrieval'][f'hr@{k}']:.4f} / "
            f"NDCG@{k} {rr['retrieval'][f'ndcg@{k}']:.4f}; "
            f"the LLM's rerank of retrieval's top {rr['retrieved']}: "
            f"HR@{k} {rr['rerank'][f'hr@{k}']:.4f} / NDCG@{k} {rr['rerank'][f'ndcg@{k}']:.4f} "
            f"(gain {rr[f'gain_ndcg@{k}']:+.4f}).",
        ]
    if paired:
        lines += [
            "",
            f"Stage 2 vs SASRec, paired on {paired['users']} users: HR@1 wins {paired['hr@1_wins']}, "
            f"losses {paired['hr@1_losses']} (exact McNemar p = {paired['mcnemar_p']:.4f}); "
            f"NDCG@5 mean difference {paired['ndcg@5_mean_diff']:+.4f} "
            f"(Wilcoxon p = {paired['wilcoxon_p']:.4f}).",
        ]
    return "\n".join(lines) + "\n"


def plot_html(metrics: dict) -> str:
    """A grouped bar chart (plotly, self-contained HTML) of HR@1 / HR@5 / NDCG@5 with HR@1's CI."""
    import plotly.graph_objects as go

    names = [n for n, m in metrics.items() if isinstance(m, dict) and "hr@1" in m]
    fig = go.Figure()
    for metric in METRICS:
        vals = [metrics[n][metric] for n in names]
        err = [metrics[n][f"{metric}_ci95"] for n in names]
        fig.add_bar(
            name=metric.upper(),
            x=names,
            y=vals,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [e[1] - v for e, v in zip(err, vals, strict=True)],
                "arrayminus": [v - e[0] for e, v in zip(err, vals, strict=True)],
            },
        )
    fig.add_hline(y=0.05, line_dash="dot", annotation_text="chance HR@1 (1/20)")
    fig.update_layout(barmode="group", title="Same 20-candidate test sets, 95% bootstrap intervals")
    return fig.to_html(include_plotlyjs=True, full_html=True)


def evaluate(
    settings: Settings,
    prepared: Path,
    sasrec_dir: Path,
    base_dir: Path,
    stage_dirs: dict[str, Path],
    metrics_path: Path,
    reports: Path,
    device: str = "auto",
    progress: bool = False,
) -> dict:
    """dvc stage `evaluate`: score SASRec, the base LLM and each stage; write metrics and reports."""
    for path in (prepared / "test.parquet", sasrec_dir, base_dir, *stage_dirs.values()):
        if not Path(path).exists():
            raise ModelError(f"{path}: not found; run the stages before `rsllm evaluate`")
    rows = eval_users(prepared, settings.llm.eval_users)
    frames = {
        "popularity": score_popularity(prepared, rows),
        "sasrec": score_sasrec(sasrec_dir, prepared, rows),
    }
    frames["base"] = score_llm("base", base_dir, None, prepared, settings, device, progress)
    for name, stage_dir in stage_dirs.items():
        frames[name] = score_llm(name, base_dir, stage_dir, prepared, settings, device, progress)
    metrics = {name: summarise(f, settings.seed) for name, f in frames.items()}
    paired = paired_test(frames["stage2"], frames["sasrec"]) if "stage2" in frames else None
    if paired:
        metrics["stage2_vs_sasrec"] = paired
        metrics["rerank_on_retrieval"] = rerank_on_retrieval(
            settings, prepared, sasrec_dir, base_dir, stage_dirs["stage2"], rows, device
        )
    per_user = pd.concat(frames.values(), ignore_index=True)
    with atomic_dir(reports) as tmp:
        per_user.to_parquet(tmp / "per_user.parquet", index=False)
        (tmp / "comparison.md").write_text(comparison_markdown(metrics, paired))
        (tmp / "comparison.html").write_text(plot_html(metrics))
    write_json_atomic(metrics_path, metrics)
    return metrics


def score_model_dirs(
    settings: Settings,
    prepared: Path,
    base_dir: Path,
    stage_dir: Path,
    name: str,
    out_path: Path,
    device: str = "auto",
    extra: dict | None = None,
) -> dict:
    """Score one stored model (e.g. production) on the current candidate sets; write its block (+ extra)."""
    frame = score_llm(name, base_dir, stage_dir, prepared, settings, device)
    block = summarise(frame, settings.seed) | (extra or {})
    with atomic_file(out_path, "w") as fh:
        fh.write(json.dumps({name: block}, indent=2, sort_keys=True) + "\n")
    return block
