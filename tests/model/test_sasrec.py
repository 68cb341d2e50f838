"""SASRec: shapes, padding invariance, training windows, history masking, learning, determinism, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.errors import ModelError
from components.prepare import load_prepared, trained_ids
from components.recommender import (
    evaluate_split,
    fit,
    load_item_embeddings,
    load_item_ids,
    load_sasrec,
    model_config,
    pad_left,
    save_model,
    train_sasrec,
    training_windows,
)
from components.sasrec import SASRec, SASRecConfig
from tests.model.sasrec_fixtures import N_ITEMS, small_settings, write_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    summary = train_sasrec(
        prepared,
        out / "models" / "sasrec",
        out / "metrics" / "sasrec.json",
        out / "plots" / "sasrec.json",
        small_settings(),
        seed=7,
    )
    return {"summary": summary, "out": out}


def _model(n_items: int = N_ITEMS, max_len: int = 12, **kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(
        SASRecConfig(n_items=n_items, max_len=max_len, hidden=16, heads=2, layers=2, inner=32, **kw)
    ).eval()


def test_shapes():
    model = _model()
    x = torch.tensor(pad_left([[1, 2, 3], [4, 5, 6, 7, 8]], 12))
    assert model(x).shape == (2, 12, 16)
    assert model.user_vector(x).shape == (2, 16)
    scores = model.score_all(x)
    assert scores.shape == (2, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    assert model.item_table().shape == (N_ITEMS + 1, 16)


def test_padding_never_changes_the_output():
    model = _model()
    history = [5, 9, 2, 31, 7]
    bare = model(torch.tensor([history]))  # [1, 5, D], no padding at all
    for length in (6, 9, 12):
        padded = model(torch.tensor(pad_left([history], length)))  # [1, length, D]
        torch.testing.assert_close(padded[:, -5:], bare, atol=1e-5, rtol=1e-5)
    # a batch of histories of different lengths equals each history on its own
    batch = [[1], [3, 4], history, list(range(1, 13))]
    together = model.user_vector(torch.tensor(pad_left(batch, 12)))
    for row, hist in enumerate(batch):
        alone = model.user_vector(torch.tensor([hist]))
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_user_vector_equals_the_last_hidden_state():
    """user_vector computes only the last position in the last block; the values are the full forward's."""
    model = _model()
    x = torch.tensor(pad_left([[1, 2, 3], [4, 5, 6, 7, 8], list(range(1, 13))], 12))
    torch.testing.assert_close(model.user_vector(x), model(x)[:, -1], atol=1e-6, rtol=1e-5)


def test_padding_invariance_is_not_trivial():
    """The check above would catch a model that let padding leak: the same items in another order differ."""
    model = _model()
    a = model.user_vector(torch.tensor([[5, 9, 2, 31, 7]]))
    b = model.user_vector(torch.tensor([[9, 5, 2, 31, 7]]))
    assert (a - b).abs().max() > 1e-3


def test_training_windows_count_each_target_once_with_enough_context():
    seq = np.arange(1, 38)  # 37 items -> 36 (input, target) pairs
    x, y = training_windows([seq], max_len=10, stride=4)
    assert x.shape == y.shape and x.shape[1] == 10
    targets = y[y != 0]
    assert sorted(targets.tolist()) == list(range(2, 38))  # every target exactly once
    for row_x, row_y in zip(x, y, strict=True):
        real = row_x[row_x != 0]
        assert (row_y[row_x == 0] == 0).all()  # no target on a padding position
        for pos in np.nonzero(row_y)[0]:
            context = pos - (len(row_x) - len(real)) + 1
            assert row_y[pos] == row_x[pos] + 1  # the target follows the input
            assert context >= min(10 - 4, row_y[pos] - 1)  # >= max_len - stride items of context
    # a short sequence is one left-padded window
    x, y = training_windows([np.array([3, 4, 5])], max_len=10, stride=4)
    assert x.tolist() == [[0] * 8 + [3, 4]] and y.tolist() == [[0] * 8 + [4, 5]]


class _FixedScores(torch.nn.Module):
    """A stand-in model whose scores prefer the items of the history, then item 1."""

    def __init__(self, n_items: int, max_len: int):
        super().__init__()
        self.cfg = SASRecConfig(n_items=n_items, max_len=max_len)

    def score_all(self, items: torch.Tensor) -> torch.Tensor:
        # distinct base scores, lower for higher ids: -0.01 * item_idx
        scores = -0.01 * torch.arange(self.cfg.n_items + 1, dtype=torch.float32).repeat(items.shape[0], 1)
        scores[:, 1] = 50.0
        scores.scatter_(1, items, 100.0)
        scores[:, 0] = float("-inf")
        return scores


def test_full_ranking_masks_history_but_not_the_target(tmp_path):
    # user 0: 1 2 3 | 4 | 5 ; user 1 repeats its target inside its history: 6 7 8 | 9 | 7
    prepared = write_prepared(tmp_path / "p", seqs=[[1, 2, 3, 4, 5], [6, 7, 8, 9, 7]], n_items=N_ITEMS)
    data = load_prepared(prepared)
    out = evaluate_split(_FixedScores(N_ITEMS, 10), data, "test")
    # user 0: history masked, item 1 (50) masked too, the target 5 beats every item after it -> rank 0
    # user 1: target 7 is in the history but not masked: scored 100, rank 0
    assert out["full"] == {"hr@10": 1.0, "ndcg@10": 1.0}
    # unmasked (RecBole): user 0's history 1-4 outrank 5 (rank 4); user 1's 6, 8, 9 tie with 7 (rank 3)
    assert out["full_unmasked"]["hr@10"] == 1.0
    assert out["full_unmasked"]["ndcg@10"] == pytest.approx((1 / np.log2(6) + 1 / np.log2(5)) / 2)
    assert set(out["candidates"]) == {"hr@1", "hr@5", "ndcg@5"}


def test_load_prepared_names_the_missing_file(tmp_path):
    prepared = write_prepared(tmp_path / "p")
    (prepared / "test.parquet").unlink()
    with pytest.raises(ModelError, match="test.parquet"):
        load_prepared(prepared)


@pytest.mark.slow
def test_sasrec_learns_the_predictable_next_item(trained, prepared):
    metrics = trained["summary"]["metrics"]
    # random guessing: HR@10 ~ 10/33 over the unmasked catalogue, HR@1 ~ 1/20 over the candidates
    assert metrics["test"]["full"]["hr@10"] >= 0.9, metrics
    assert metrics["test"]["candidates"]["hr@1"] >= 0.8, metrics
    assert metrics["valid"]["full"]["ndcg@10"] >= 0.7, metrics
    # the same assertions fail for an untrained model
    untrained = SASRec(model_config(small_settings(), N_ITEMS)).eval()
    baseline = evaluate_split(untrained, load_prepared(prepared), "test")
    assert baseline["full"]["hr@10"] < 0.9 and baseline["candidates"]["hr@1"] < 0.8


@pytest.mark.slow
def test_outputs_on_disk(trained, prepared):
    out = trained["out"]
    metrics = json.loads((out / "metrics" / "sasrec.json").read_text())
    assert metrics == trained["summary"]["metrics"]
    for split in ("test", "valid"):
        assert set(metrics[split]) == {"full", "full_unmasked", "candidates"}
        assert set(metrics[split]["full"]) == {"hr@10", "ndcg@10"}
        # RecBole's protocol masks nothing: earlier items compete with the target, so it is never higher
        for m in ("hr@10", "ndcg@10"):
            assert metrics[split]["full_unmasked"][m] <= metrics[split]["full"][m]
        assert set(metrics[split]["candidates"]) == {"hr@1", "hr@5", "ndcg@5"}
    curve = json.loads((out / "plots" / "sasrec.json").read_text())
    assert curve and {"epoch", "loss", "valid_ndcg@10"} <= set(curve[0])
    model_dir = out / "models" / "sasrec"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "items.json", "model.safetensors"]
    model, cfg = load_sasrec(model_dir)
    assert cfg.n_items == N_ITEMS and not model.training
    # the reloaded model reproduces the metrics
    again = evaluate_split(model, load_prepared(prepared), "test")
    assert again["full"]["hr@10"] == pytest.approx(metrics["test"]["full"]["hr@10"], abs=1e-6)
    table = load_item_embeddings(model_dir)
    assert table.shape == (N_ITEMS + 1, cfg.hidden)
    torch.testing.assert_close(table, model.item_emb.weight.detach())
    ids = load_item_ids(model_dir)
    assert ids[1] == "i1" and ids[N_ITEMS] == f"i{N_ITEMS}" and len(ids) == N_ITEMS


@pytest.mark.slow
def test_same_seed_same_metrics(prepared):
    cfg = small_settings(max_epochs=4, patience=4)
    data = load_prepared(prepared)
    runs = []
    for _ in range(2):
        model, curve, _ = fit(data, cfg, seed=3)
        runs.append((curve, evaluate_split(model, data, "test")))
    assert runs[0] == runs[1]
    _, other_curve, _ = fit(data, cfg, seed=4)
    assert [r["loss"] for r in other_curve] != [r["loss"] for r in runs[0][0]]  # the seed is really used


def test_load_sasrec_names_missing_files(tmp_path):
    with pytest.raises(ModelError, match="model.safetensors"):
        load_sasrec(tmp_path)


def test_untrained_rows_are_never_a_class_nor_ranked_and_stay_out_of_items_json(tmp_path):
    """Catalogue items without interactions keep their index (the stable item index) but get no row:
    no gradient reaches them, full ranking never returns them, items.json does not list them."""
    prepared = write_prepared(tmp_path / "p", untrained=3)
    data = load_prepared(prepared)
    assert data.n_items == N_ITEMS + 3 and data.trained[1 : N_ITEMS + 1].all() and not data.trained[0]
    assert not data.trained[N_ITEMS + 1 :].any()
    cfg = small_settings(max_epochs=2, patience=2, weight_decay=0.0)
    torch.manual_seed(11)  # fit seeds itself: its first table is this one
    start = SASRec(model_config(cfg, data.n_items)).item_emb.weight.detach().clone()
    model, _, _ = fit(data, cfg, seed=11)
    end = model.item_emb.weight.detach()
    assert torch.equal(end[N_ITEMS + 1 :], start[N_ITEMS + 1 :])  # untrained: exactly as initialised
    assert not torch.equal(end[1 : N_ITEMS + 1], start[1 : N_ITEMS + 1])

    # an untrained row with the best score still never ranks above the target
    class Boosted(_FixedScores):
        def score_all(self, items: torch.Tensor) -> torch.Tensor:
            scores = super().score_all(items)
            scores[:, N_ITEMS + 1 :] = 1e6
            return scores

    plain = evaluate_split(_FixedScores(data.n_items, 10), data, "test")
    assert evaluate_split(Boosted(data.n_items, 10), data, "test") == plain
    save_model(model, trained_ids(data), tmp_path / "m")
    assert sorted(load_item_ids(tmp_path / "m")) == list(range(1, N_ITEMS + 1))
    # the evaluation's retrieval (rerank on retrieval) never retrieves an untrained row either, even one
    # pointing straight at the user's vector
    from components.evaluate import retrieval_top

    rows = data.test.head(1)
    with torch.no_grad():
        user = model.user_vector(torch.from_numpy(pad_left([data.sequences[0][:-1]], cfg.max_len)))[0]
        model.item_emb.weight[N_ITEMS + 1] = 1e3 * user
    save_model(model, trained_ids(data), tmp_path / "boosted")
    assert (
        int(model.score_all(torch.from_numpy(pad_left([data.sequences[0][:-1]], cfg.max_len)))[0].argmax())
        == N_ITEMS + 1
    )
    top, _ = retrieval_top(tmp_path / "boosted", prepared, rows, 5)
    assert data.trained[top].all()
