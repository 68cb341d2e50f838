"""Stages depend on exactly what they read: settings/<stage>.json (components/stage_settings.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from components.config import deep_merge, load_settings, parse_settings
from components.errors import ConfigError
from components.stage_settings import check_settings, consumer_settings, first_difference, write_settings
from tests.helpers import ROOT, make_project, sh

TRAINING = {"train_sasrec", "llm_stage1", "llm_stage2"}


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _changed(edit: dict) -> set[str]:
    """Consumers whose settings file changes when `edit` is merged into params.yaml."""
    before = consumer_settings(parse_settings(_raw()))
    after = consumer_settings(parse_settings(deep_merge(_raw(), edit)))
    return {name for name in before if before[name] != after[name]}


def test_each_edit_changes_only_its_consumers():
    assert _changed({"profiles": {"demo": {"gate": {"min": {"ndcg@5": 0.2}}}}}) == set()
    assert _changed({"gate": {"rerank_min_gain": 0.01}}) == set()
    assert _changed({"llm": {"eval_users": 7}}) == {"evaluate"}
    assert _changed({"llm": {"stage2": {"samples": 9}}}) == {"llm_stage2", "evaluate"}
    assert _changed({"llm": {"lora": {"r": 4}}}) == {"llm_stage1", "llm_stage2", "evaluate"}
    assert _changed({"sasrec": {"hidden": 32}}) == {"sasrec"}
    assert _changed({"seed": 7}) == {"sasrec", "llm_stage1", "llm_stage2", "evaluate"}
    # the active profile's overrides reach the files: medium's stage-2 size is in its file
    medium = consumer_settings(parse_settings({**_raw(), "profile": "medium"}))
    wanted = _raw()["profiles"]["medium"]["llm"]["stage2"]["samples"]
    assert medium["llm_stage2"]["llm"]["stage2"]["samples"] == wanted


def test_a_stale_settings_file_is_refused_naming_the_key(tmp_path):
    s = load_settings(ROOT / "params.yaml")
    files = write_settings(s, tmp_path)
    check_settings(s, "llm_stage2", Path(files["llm_stage2"]))  # fresh: accepted
    edited = parse_settings(deep_merge(_raw(), {"llm": {"stage2": {"lr": 0.5}}}))
    with pytest.raises(ConfigError, match=r"llm_stage2.json: stale .*'llm.stage2.lr'"):
        check_settings(edited, "llm_stage2", Path(files["llm_stage2"]))
    with pytest.raises(ConfigError, match="not found"):
        check_settings(s, "sasrec", tmp_path / "missing.json")
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 1}}) is None
    assert first_difference({"a": {"b": 1}}, {"a": {"c": 1}}) == "a.b"


def test_llm_stages_list_every_llm_module_train_imports():
    """The training stages' code deps are train.py's import closure (no rank.py, no loading.py)."""
    import ast

    def imports(module: str) -> set[str]:
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components.llm."):
                found.add(node.module)
        return found

    seen, todo = set(), ["components.llm.train"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m)
    needed = {m.replace(".", "/") + ".py" for m in seen}
    # and the modules outside llm/ it calls into: samples.py -> prepare.sample_candidates (negatives),
    # user_vectors / the SASRec item table -> recommender.py, sasrec.py; the folders' schema -> folders.py
    needed |= {"components/prepare.py", "components/recommender.py", "components/sasrec.py"}
    needed |= {"components/folders.py"}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("llm_stage1", "llm_stage2"):
        deps = set(stages[name]["deps"])
        assert needed <= deps, f"{name} lacks {sorted(needed - deps)}"
        assert "components/llm/rank.py" not in deps and "components/llm" not in deps
        assert "components/llm/loading.py" not in deps  # serving-side loading never retrains


def _stale(project: Path) -> set[str]:
    out = sh(["dvc", "status", "--json", "dvc.yaml"], project).stdout
    return set(json.loads(out or "{}"))


@pytest.mark.slow
def test_gate_and_eval_edits_train_nothing(tmp_path):
    """In a checkout whose stages are all up to date, edit a gate threshold, then llm.eval_users, then
    rank.py: `dvc status` shows no training stage stale after any of them."""
    project = make_project(tmp_path / "p")
    paths = yaml.safe_load((project / "params.yaml").read_text())["paths"]
    text = re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m[1]], (project / "dvc.yaml").read_text())
    spec = yaml.safe_load(text)["stages"]
    for stage in spec.values():  # every dep and out exists (placeholders; nothing is trained here)
        for entry in [e for k in ("deps", "outs", "metrics", "plots") for e in stage.get(k) or []]:
            rel = next(iter(entry)) if isinstance(entry, dict) else entry
            path = project / rel
            if path.exists() or rel == paths["settings"]:
                continue
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text(rel)
    sh(["dvc", "repro", "settings"], project)
    sh(["dvc", "commit", "-f", *[n for n in spec if n != "settings"]], project)
    assert _stale(project) == set()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profiles"]["demo"]["gate"]["min"]["ndcg@5"] = 0.2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _stale(project) == {"settings"}  # params changed: only the settings stage reads them
    sh(["dvc", "repro", "settings"], project)
    assert _stale(project) == set()

    params["llm"]["eval_users"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["dvc", "repro", "settings"], project)
    assert _stale(project) == {"evaluate"}

    with open(project / "components/llm/rank.py", "a") as fh:
        fh.write("\n# edited\n")
    assert _stale(project) == {"evaluate"}

    params["llm"]["stage2"]["lr"] = 0.0005
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["dvc", "repro", "settings"], project)
    assert _stale(project) & TRAINING == {"llm_stage2"}
