"""Shared fixtures: a synthetic-source project built once per session, copied per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Tests never touch the user's BentoML store: a private one for the whole session (set before any
# test imports bentoml, which reads BENTOML_HOME once).
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="rsllm-test-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import pytest

from tests.helpers import make_project, rsllm, synthetic_params


@pytest.fixture(scope="session")
def base_project(tmp_path_factory) -> Path:
    """A git checkout whose data stages ran on a small synthetic source (no DVC cache involved)."""
    root = tmp_path_factory.mktemp("base")
    project = make_project(root / "project", synthetic_params(root / "source"))
    for stage in ("fetch", "merge", "validate", "prepare"):
        rsllm([stage], project)
    return project


@pytest.fixture
def project(base_project, tmp_path) -> Path:
    """A private copy of the base project (git history included)."""
    dest = tmp_path / "project"
    shutil.copytree(base_project, dest, symlinks=True)
    return dest
