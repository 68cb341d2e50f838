"""params.yaml -> settings: defaults load; bad keys, types and ranges name the key."""

from pathlib import Path

import pytest
import yaml

from components.config import load_settings, parse_settings
from components.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load():
    s = load_settings(ROOT / "params.yaml")
    assert s.prepare.history_len == 10 and s.prepare.num_candidates == 20
    assert s.data.ml100k.sha256.startswith("9c9948")
    assert s.validate_.rating_max == 5


def test_unknown_key_is_named():
    params = raw()
    params["prepare"]["histroy_len"] = 10
    with pytest.raises(ConfigError, match=r"prepare\.histroy_len: unknown key"):
        parse_settings(params)


def test_wrong_type_is_named():
    params = raw()
    params["prepare"]["kcore"] = "five"
    with pytest.raises(ConfigError, match=r"prepare\.kcore"):
        parse_settings(params)


def test_out_of_range_is_named():
    params = raw()
    params["prepare"]["num_candidates"] = 1
    with pytest.raises(ConfigError, match=r"prepare\.num_candidates.*greater than or equal to 2"):
        parse_settings(params)


def test_nested_and_aliased_section_names():
    params = raw()
    params["validate"]["rating_min"] = 9
    with pytest.raises(ConfigError, match=r"validate"):
        parse_settings(params)
    params = raw()
    params["data"]["source"] = "s3"
    with pytest.raises(ConfigError, match=r"data\.source"):
        parse_settings(params)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_active_profile_overrides_sections():
    params = raw()
    params["profiles"] = {"tiny": {"prepare": {"history_len": 5}}, "big": {"prepare": {"history_len": 50}}}
    params["profile"] = "tiny"
    s = parse_settings(params)
    assert s.profile == "tiny" and s.prepare.history_len == 5
    params["profile"] = "big"
    assert parse_settings(params).prepare.history_len == 50


def test_unknown_profile_and_typo_in_an_inactive_profile_are_named():
    params = raw()
    params["profiles"] = {"a": {}, "b": {"prepare": {"kcroe": 3}}}
    params["profile"] = "c"
    with pytest.raises(ConfigError, match=r"profile: 'c' is not one of profiles \['a', 'b'\]"):
        parse_settings(params)
    params["profile"] = "a"
    with pytest.raises(ConfigError, match=r"\(profiles\.b\): prepare\.kcroe: unknown key"):
        parse_settings(params)
