"""The no-LLM control of the ablation learns from SASRec's vectors alone (and is not a trivial ranker)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.config import deep_merge, parse_settings
from components.llm.control import control_ranks, train_control
from components.recommender import train_sasrec
from tests.model.llm_fixtures import llm_params
from tests.model.sasrec_fixtures import small_settings, write_prepared


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    prepared = write_prepared(tmp / "prepared")
    sasrec = tmp / "sasrec"
    train_sasrec(prepared, sasrec, tmp / "m.json", tmp / "p.json", small_settings(), seed=7)
    return tmp, prepared, sasrec


def _settings(tmp, samples: int, head_init: str = "stage1", scale: float = 1.0, projector_hidden: int = 16):
    raw = llm_params(tmp, samples=samples, batch_size=16, lr=1e-2, new_lr_scale=scale)
    llm = {"head_dim": 32, "head_init": head_init, "projector_hidden": projector_hidden}
    return parse_settings(deep_merge(raw, {"llm": llm}))


def test_the_control_learns_the_next_item_from_sasrec_vectors(trained):
    tmp, prepared, sasrec = trained
    test = pd.read_parquet(prepared / "test.parquet")
    untrained, _ = train_control(_settings(tmp, 16, "stage1"), prepared, sasrec, hidden=32)  # one step
    model, info = train_control(_settings(tmp, 1024), prepared, sasrec, hidden=32)
    # stage 1's + stage 2's draws (each capped at every training position: 732 here), one pass
    assert info["samples"] == 2 * 732 and info["steps"] == -(-info["samples"] // 16)
    assert info["loss_last_tenth"] < info["loss_first_tenth"] - 1.0
    hr1 = float((control_ranks(model, sasrec, prepared, test) == 0).mean())
    hr1_untrained = float((control_ranks(untrained, sasrec, prepared, test) == 0).mean())
    assert hr1 >= 0.45 > hr1_untrained + 0.2, (hr1, hr1_untrained)  # chance: 1 / 20


def test_control_ranks_follow_the_target_column(trained):
    tmp, prepared, sasrec = trained
    model, _ = train_control(_settings(tmp, 128), prepared, sasrec, hidden=32)
    test = pd.read_parquet(prepared / "test.parquet").head(10)
    ranks = control_ranks(model, sasrec, prepared, test)
    # moving the target to another column of the same candidate set leaves its rank unchanged
    moved = test.assign(candidates=[list(np.roll(c, 3)) for c in test["candidates"]])
    assert ranks.shape == (10,) and (control_ranks(model, sasrec, prepared, moved) == ranks).all()


def test_the_recommender_head_init_starts_the_control_at_sasrecs_ranking(trained):
    """With llm.head_init: recommender the head starts as ridge maps onto SASRec's vectors: the control
    then ranks the test candidates as SASRec does (a random head does not)."""
    from components.evaluate import score_sasrec

    tmp, prepared, sasrec = trained
    test = pd.read_parquet(prepared / "test.parquet")
    sasrec_ranks = score_sasrec(sasrec, prepared, test)["rank"].to_numpy()
    # 2 x 64 samples: the fit reads 128 rows; training at lr x 1e-4 leaves the start where it is
    wide = {"scale": 1e-4, "projector_hidden": 128}  # projectors wide enough to carry SASRec's 32 dims
    calibrated, info = train_control(_settings(tmp, 64, "recommender", **wide), prepared, sasrec, hidden=64)
    random_head, _ = train_control(_settings(tmp, 64, "stage1", **wide), prepared, sasrec, hidden=64)
    assert info["head_init_fit"]["r2_user"] > 0.7 and info["head_init_fit"]["r2_item"] > 0.7, info
    same = float((control_ranks(calibrated, sasrec, prepared, test) == sasrec_ranks).mean())
    same_random = float((control_ranks(random_head, sasrec, prepared, test) == sasrec_ranks).mean())
    assert same >= 0.8 > same_random + 0.3, (same, same_random)
