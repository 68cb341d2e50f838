"""RecBole 1.2.1's SASRec on this project's prepared data: the reference the project's SASRec is compared to.

What it does
  1. Turns `<prepared>/sequences.parquet` (one row per user, `items` = item_idx in time order) into a RecBole
     atomic dataset `<out-dir>/dataset/ml100k_prepared/ml100k_prepared.inter` with columns
     user_id:token, item_id:token, timestamp:float, where timestamp = the item's position in the user's
     sequence. RecBole's leave-one-out by time (eval_args split {'LS': 'valid_and_test'}, order 'TO') then
     takes, per user, the last item as the test target, the one before as the valid target and the rest
     for training: exactly the project's split (checked: one valid and one test row per user).
  2. Trains RecBole's SASRec with its own defaults for sequential recommendation (properties/model/
     SASRec.yaml: 2 layers, 2 heads, hidden 64, inner 256, dropout 0.5, loss CE; overall.yaml: adam,
     lr 0.001, train_batch_size 2048, epochs 300, eval_step 1, stopping_step 10; quick_start_config/
     sequential.yaml: LS valid_and_test, TO, full sort) with MAX_ITEM_LIST_LENGTH 50,
     train_neg_sample_args None, metrics Hit and NDCG at 10, valid_metric NDCG@10, on CPU, once per seed.
     The model of the best valid NDCG@10 is the one tested, as in RecBole's run_recbole.
  3. Prints a table (seed, epochs, valid/test HR@10 and NDCG@10) and, as its LAST line, one JSON object
     with every figure. Also writes that object to `<out-dir>/recbole_sasrec.json`.

What RecBole's full-sort evaluation masks for a sequential model: ONLY the padding item 0.
  recbole/data/dataloader/general_dataloader.py, FullSortEvalDataLoader: the user history
  (uid2history_item, from sampler.used_ids) is built only `if not self.is_sequential`, and for a sequential
  model collate_fn returns `history_index = None`; recbole/trainer/trainer.py, Trainer._full_sort_batch_eval:
  `scores[:, 0] = -np.inf` then `if history_index is not None: scores[history_index] = -np.inf`. So the
  items the user saw before the target stay ranked: RecBole's figures compare with the project's
  `full_unmasked` metrics (metrics/sasrec.json), not with its `full` (history masked) ones. Every item of
  the dataset is ranked (RecBole's item vocabulary = the items that occur in sequences.parquet), which is
  the project's set too (its `trained` items).

Environment: RecBole does not install into the project's venv (numpy/pandas pins), and this file does not
import the project's `components`, so it runs in a separate venv, e.g.
    python3.11 -m venv /work/recbole_venv
    /work/recbole_venv/bin/pip install torch==2.13.0 recbole==1.2.1 numpy==1.23.5 pandas==1.5.3 \
        scipy==1.10.1 pyarrow==20.0.0
(numpy<2 is required: RecBole's Config.compatibility_settings (config/configurator.py) re-creates
np.float/np.bool/... from np.float_/np.unicode_, which numpy 2 removed. numpy 1.23.5 / pandas 1.5.3 /
scipy 1.10.1 are conservative pins that work; pyarrow>=21 needs numpy>=2; torch 2.13.0 resolves to the
local 2.13.0+cpu wheel here, so no CUDA build is pulled.)
One workaround lives here, not in site-packages: RecBole's checkpoint pickles its Config (and torch>=2.6
refuses to load it by default), so the trainer keeps its best weights in memory instead (in_memory_trainer:
no file is pickled or unpickled) and then calls evaluate(load_best_model=False).

Run from the repo root:
    /work/recbole_venv/bin/python bench/recbole_compare.py --prepared data/prepared \
        --out-dir bench/results/recbole --seeds 2020 2021 2022 \
        [--project-metrics metrics/sasrec.json]
RecBole's logs (log/, log_tensorboard/) go under --out-dir; no checkpoint is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

DATASET = "ml100k_prepared"  # not "ml-100k": RecBole would swap in its bundled copy of ml-100k
METRICS = ("hit@10", "ndcg@10")  # RecBole's result keys; hit@10 is HR@10


@dataclass
class SeedResult:
    seed: int
    epochs_run: int
    best_epoch: int
    fit_seconds: float
    seconds_per_epoch: float
    valid: dict[str, float]
    test: dict[str, float]
    valid_curve: list[float] = field(default_factory=list)  # valid NDCG@10 per epoch


# ---------------------------------------------------------------------------------------------- data


def write_atomic_dataset(prepared: Path, data_root: Path) -> tuple[Path, dict[str, int]]:
    """`<data_root>/<DATASET>/<DATASET>.inter` from sequences.parquet, timestamp = position in the sequence.
    Returns the file and its counts (users, items, interactions)."""
    seqs = pd.read_parquet(prepared / "sequences.parquet")
    rows = [
        (int(user), int(item), float(pos))
        for user, items in zip(seqs["user_idx"], seqs["items"], strict=True)
        for pos, item in enumerate(items)
    ]
    inter = pd.DataFrame(rows, columns=["user_id:token", "item_id:token", "timestamp:float"])
    out = data_root / DATASET / f"{DATASET}.inter"
    out.parent.mkdir(parents=True, exist_ok=True)
    inter.to_csv(out, sep="\t", index=False)
    counts = {
        "users": int(inter["user_id:token"].nunique()),
        "items": int(inter["item_id:token"].nunique()),
        "interactions": len(inter),
    }
    return out, counts


def recbole_config(data_root: Path, out_dir: Path, seed: int, epochs: int) -> dict[str, Any]:
    """RecBole's defaults for sequential SASRec on ml-100k, spelled out where the comparison needs them."""
    return {
        "data_path": str(data_root),
        "checkpoint_dir": str(out_dir / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 50,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "stopping_step": 10,
        "epochs": epochs,
        "seed": seed,
        "reproducibility": True,
        "use_gpu": False,
        "show_progress": False,
        "state": "INFO",
    }


# ------------------------------------------------------------------------------------------ training


def in_memory_trainer(trainer_cls: type) -> type:
    """RecBole's Trainer, keeping its best model's weights in memory instead of a torch.save checkpoint:
    nothing is pickled or unpickled (RecBole's checkpoint pickles its Config; torch>=2.6 refuses it)."""

    class InMemoryTrainer(trainer_cls):
        best_state: dict | None = None

        def _save_checkpoint(self, epoch, verbose=True, **kwargs):  # called at each new best valid score
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

        def load_best(self) -> None:
            if self.best_state is not None:
                self.model.load_state_dict(self.best_state)

    return InMemoryTrainer


def pick(result: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(result[k]), 6) for k in METRICS}


def run_seed(data_root: Path, out_dir: Path, seed: int, epochs: int) -> SeedResult:
    """Train and test RecBole's SASRec once, the way recbole.quick_start.run_recbole does."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    # RecBole's Config would also read `--key=value` options from argv: hide this script's
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        config = Config(
            model="SASRec", dataset=DATASET, config_dict=recbole_config(data_root, out_dir, seed, epochs)
        )
    finally:
        sys.argv = argv
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    n_users = dataset.user_num - 1  # minus [PAD]
    if len(valid_data.dataset) != n_users or len(test_data.dataset) != n_users:
        raise RuntimeError(
            f"expected one valid and one test row per user ({n_users}), got "
            f"{len(valid_data.dataset)} / {len(test_data.dataset)}"
        )

    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = in_memory_trainer(Trainer)(config, model)
    curve: list[float] = []
    start = time.perf_counter()
    _, best_valid = trainer.fit(
        train_data,
        valid_data,
        saved=True,
        show_progress=False,
        callback_fn=lambda _epoch, score: curve.append(float(score)),
    )
    fit_seconds = time.perf_counter() - start
    trainer.load_best()
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    epochs_run = len(trainer.train_loss_dict)
    best = max(curve) if curve else float("nan")
    best_epoch = max(i for i, s in enumerate(curve) if s == best) if curve else -1  # RecBole keeps ties' last
    return SeedResult(
        seed=seed,
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        fit_seconds=round(fit_seconds, 1),
        seconds_per_epoch=round(fit_seconds / max(epochs_run, 1), 2),
        valid=pick(best_valid),
        test=pick(test),
        valid_curve=[round(s, 6) for s in curve],
    )


# ------------------------------------------------------------------------------------------- output


def summarize(results: list[SeedResult]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample std over seeds of each split's metrics (std 0 for one seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in ("valid", "test"):
        out[split] = {}
        for k in METRICS:
            vals = [getattr(r, split)[k] for r in results]
            out[split][k] = {
                "mean": round(statistics.fmean(vals), 6),
                "std": round(statistics.stdev(vals), 6) if len(vals) > 1 else 0.0,
            }
    return out


def project_unmasked(path: Path | None) -> dict[str, dict[str, float]] | None:
    """The project's SASRec under RecBole's protocol (`full_unmasked` of metrics/sasrec.json), if given."""
    if path is None:
        return None
    metrics = json.loads(path.read_text())
    return {
        split: {
            "hit@10": metrics[split]["full_unmasked"]["hr@10"],
            "ndcg@10": metrics[split]["full_unmasked"]["ndcg@10"],
        }
        for split in ("valid", "test")
    }


def table_row(name: str, run: str, valid: dict[str, float], test: dict[str, float]) -> str:
    """One line of the table: name, the run's columns (epochs, best, s/epoch), then the four metrics."""
    metrics = (
        f"{valid['hit@10']:>13.4f}{valid['ndcg@10']:>15.4f}{test['hit@10']:>12.4f}{test['ndcg@10']:>14.4f}"
    )
    return f"{name:<26}{run:>22}{metrics}"


def print_table(results: list[SeedResult], summary: dict, project: dict | None) -> None:
    header = (
        f"{'run':<26}{'epochs':>7}{'best':>6}{'s/epoch':>9}"
        f"{'valid HR@10':>13}{'valid NDCG@10':>15}{'test HR@10':>12}{'test NDCG@10':>14}"
    )
    print("RecBole 1.2.1 SASRec, full sort, nothing masked (RecBole's protocol)")
    print(header)
    print("-" * len(header))
    for r in results:
        run = f"{r.epochs_run:>7}{r.best_epoch:>6}{r.seconds_per_epoch:>9.2f}"
        print(table_row(f"recbole seed {r.seed}", run, r.valid, r.test))
    if len(results) > 1:
        mean = {split: {k: v["mean"] for k, v in summary[split].items()} for split in ("valid", "test")}
        print(table_row("recbole mean", "", mean["valid"], mean["test"]))
    if project is not None:
        print(table_row("project (full_unmasked)", "", project["valid"], project["test"]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="the project's prepared data")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("bench/results/recbole"),
        help="RecBole dataset, logs, checkpoints",
    )
    p.add_argument("--epochs", type=int, default=300, help="max epochs (RecBole default; early stopping)")
    p.add_argument("--seeds", type=int, nargs="+", default=[2020], help="RecBole's default seed is 2020")
    p.add_argument(
        "--project-metrics",
        type=Path,
        default=None,
        help="the project's metrics/sasrec.json, to print its full_unmasked row beside RecBole's",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    prepared = args.prepared.resolve()
    out_dir = args.out_dir.resolve()
    project_metrics = args.project_metrics.resolve() if args.project_metrics else None
    data_root = out_dir / "dataset"
    _, counts = write_atomic_dataset(prepared, data_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(out_dir)  # RecBole writes ./log and ./log_tensorboard relative to the working directory

    results = [run_seed(data_root, out_dir, seed, args.epochs) for seed in args.seeds]
    summary = summarize(results)
    project = project_unmasked(project_metrics)
    print_table(results, summary, project)

    import recbole

    payload = {
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "dataset": counts,
        "protocol": "full sort, all items, only padding masked = project full_unmasked",
        "max_epochs": args.epochs,
        "seeds": [asdict(r) for r in results],
        "summary": summary,
        "project_full_unmasked": project,
    }
    (out_dir / "recbole_sasrec.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
