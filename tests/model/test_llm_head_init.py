"""The score head started at the recommender's geometry (components/llm/head_init.py)."""

import pytest
import torch

from components.errors import ModelError
from components.llm.head_init import calibrate_head, ridge_map
from components.llm.model import ScoreHead


def _states(vectors: torch.Tensor, hidden: int, seed: int) -> torch.Tensor:
    """Hidden states that carry `vectors` [n, D] linearly among unrelated content, as an LLM's residual
    stream carries an injected embedding: [n, hidden]."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(vectors.shape[1], hidden, generator=gen)
    return vectors @ mix + 0.01 * torch.randn(len(vectors), hidden, generator=gen) + 3.0


def test_ridge_map_recovers_a_linear_map():
    x = torch.randn(400, 20)
    w = torch.randn(20, 5)
    w_hat, b_hat, r2 = ridge_map(x, x @ w + 1.5, ridge=1e-6)
    assert r2 > 0.999
    assert torch.allclose(w_hat, w, atol=1e-3) and torch.allclose(b_hat, torch.full((5,), 1.5), atol=1e-3)


def test_calibrated_head_scores_as_the_recommender_does():
    """After calibration, head(h_user, h_c) ~ <u, e_c> on new users and items: the same top candidate."""
    torch.manual_seed(0)
    d, hidden, c = 8, 32, 20
    users, items = torch.randn(300, d), torch.randn(300 * c, d)
    head = ScoreHead(hidden, 16)
    fit = calibrate_head(head, _states(users, hidden, 1), users, _states(items, hidden, 2), items)
    assert fit["r2_user"] > 0.99 and fit["r2_item"] > 0.99
    new_u, new_items = torch.randn(50, d), torch.randn(50, c, d)
    with torch.no_grad():
        got = head(
            _states(new_u, hidden, 1), _states(new_items.reshape(-1, d), hidden, 2).reshape(50, c, hidden)
        )
    want = torch.einsum("ud,ucd->uc", new_u, new_items)
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.99
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.95
    # a fresh head scores nothing like it
    with torch.no_grad():
        fresh = ScoreHead(hidden, 16)(
            _states(new_u, hidden, 1), _states(new_items.reshape(-1, d), hidden, 2).reshape(50, c, hidden)
        )
    assert (fresh.argmax(1) == want.argmax(1)).float().mean() < 0.5


def test_head_narrower_than_the_recommender_is_refused():
    with pytest.raises(ModelError, match="head_dim"):
        calibrate_head(
            ScoreHead(16, 4), torch.randn(10, 16), torch.randn(10, 8), torch.randn(10, 16), torch.randn(10, 8)
        )


@pytest.fixture(scope="module")
def with_sasrec(tmp_path_factory):
    """A synthetic prepared folder, a small SASRec trained on it, the tiny LLM and a trained stage 1."""
    from components.llm.samples import read_titles
    from components.llm.train import train_stage
    from components.recommender import train_sasrec
    from tests.model.llm_fixtures import write_base
    from tests.model.sasrec_fixtures import small_settings, write_prepared

    tmp = tmp_path_factory.mktemp("head_init")
    prepared = write_prepared(tmp / "prepared")
    train_sasrec(prepared, tmp / "sasrec", tmp / "m.json", tmp / "p.json", small_settings(), seed=3)
    write_base(tmp / "base", read_titles(prepared))
    train_stage(1, _settings(tmp / "s1run"), prepared, tmp / "base", tmp / "stage1")
    return tmp


def _settings(tmp, **llm):
    from components.config import deep_merge, parse_settings
    from tests.model.llm_fixtures import llm_params

    raw = llm_params(tmp, samples=12, batch_size=4, new_lr_scale=0.1)
    return parse_settings(deep_merge(raw, {"llm": {"user_token": True, "head_init": "recommender", **llm}}))


def test_stage2_with_recommender_head_init_records_the_fit_and_resumes_exactly(with_sasrec, tmp_path):
    """The head is fitted once, on a fresh start; a stopped run resumes to the same weights and losses
    (the resumed run loads the head it had trained, it does not fit it again)."""
    import json

    from safetensors.torch import load_file

    from components.llm.rank import evaluate_split
    from components.llm.train import train_stage

    tmp = with_sasrec
    args = (tmp / "prepared", tmp / "base")
    kw = {"stage1_dir": tmp / "stage1", "item_table": tmp / "sasrec"}
    ref = train_stage(2, _settings(tmp_path / "a"), *args, tmp_path / "ref", **kw)
    fit = ref["head_init_fit"]
    assert ref["head_init"] == "recommender" and fit["rows"] == 12 and -1.0 <= fit["r2_item"] <= 1.0
    s = _settings(tmp_path / "b")
    part = train_stage(2, s, *args, tmp_path / "out", stop_after=1, **kw)
    assert part["steps_done"] == 1 and not (tmp_path / "out").exists()
    done = train_stage(2, s, *args, tmp_path / "out", **kw)
    assert done["resumed_from"] == 1 and done["head_init_fit"] is None
    for name in ("head.safetensors", "projector.safetensors", "user_projector.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "out" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    losses = [json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("ref", "out")]
    assert [r["loss"] for r in losses[0]] == [r["loss"] for r in losses[1]]
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert cfg["prompt_format"] == 3 and cfg["user_token"] is True
    df = evaluate_split(tmp / "base", tmp_path / "ref", tmp / "prepared", users=4)
    assert len(df) == 4 and all(len(s) == 20 for s in df["scores"])
