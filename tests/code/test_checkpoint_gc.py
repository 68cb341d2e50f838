"""`rsllm gc` keeps the newest checkpoint runs only."""

import os

from components.llm.checkpoints import prune_runs


def test_prune_keeps_the_newest_runs(tmp_path):
    for i, name in enumerate(["stage1-aaa", "stage2-bbb", "stage1-ccc"]):
        (tmp_path / name / "step-00000001").mkdir(parents=True)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "notes.txt").write_text("not a run")
    deleted = prune_runs(tmp_path, keep=2)
    assert deleted == ["stage1-aaa"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "stage1-ccc", "stage2-bbb"]
    assert prune_runs(tmp_path / "missing", keep=1) == []
