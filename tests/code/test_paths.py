"""Paths once: params.yaml `paths:` is what dvc.yaml, the CLI and the library use."""

from __future__ import annotations

import re

import pytest
import yaml

from components.config import deep_merge, parse_settings
from components.errors import ConfigError
from components.paths import outputs
from tests.helpers import ROOT


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_dvc_yaml_names_model_paths_only_through_the_paths_block():
    text = (ROOT / "dvc.yaml").read_text().split("stages:", 1)[1]
    used = set(re.findall(r"\$\{paths\.(\w+)\}", text))
    assert used <= set(_raw()["paths"]), used - set(_raw()["paths"])
    for value in _raw()["paths"].values():  # no literal copy of a configured path (stage names aside)
        if "/" in value:
            assert not re.search(rf"(?<![\w/{{.]){re.escape(value)}(?![\w])", text), value


def test_a_path_outside_the_repository_is_refused_naming_the_key():
    for bad in ("/tmp/x", "../elsewhere", "models/../../x"):
        with pytest.raises(ConfigError, match=r"paths\.stage2"):
            parse_settings(deep_merge(_raw(), {"paths": {"stage2": bad}}))


def test_the_library_reads_outputs_from_the_repositorys_params(tmp_path):
    raw = deep_merge(_raw(), {"paths": {"gate": "out/decision.json", "stage2": "m/s2"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    o = outputs(tmp_path)
    assert o["gate"] == tmp_path / "out/decision.json"
    assert o["stage2"] == tmp_path / "m/s2"
    assert o["prepared"] == tmp_path / "data/prepared"
