"""Driving the DVC stage graph one stage at a time (DVC holds a repository lock).

dvc.yaml stays the one definition of the stages: the retrain flow asks it for their order and runs
`dvc repro <stage>` for each, which skips a stage whose deps, params and outs have not changed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import yaml

from components.config import load_settings
from components.errors import ConfigError, RsllmError, VersioningError
from components.versioning import DATA_STAGES, IDENTITY, run


def dvc_stages(repo: Path) -> list[str]:
    """Stage names, upstream first: the data stages (`data/dvc.yaml:<name>`), then dvc.yaml's."""
    stages = []
    for rel, prefix in ((DATA_STAGES, f"{DATA_STAGES}:"), ("dvc.yaml", "")):
        path = Path(repo) / rel
        spec = yaml.safe_load(path.read_text()) if path.exists() else {}
        stages += [prefix + name for name in (spec or {}).get("stages", {})]
    return stages


def pipeline_changed(repo: Path) -> bool:
    """True when `dvc repro` would run something: new data (the manifest merge reads), code or params,
    or missing outputs. Only the stages are asked: data/accepted.dvc's cache state (an empty folder in
    a fresh clone is in no cache) is not the pipeline's."""
    out = run(["dvc", "status", "dvc.yaml", DATA_STAGES], repo)
    return "up to date" not in out


def repro_stage(repo: Path, stage: str) -> dict:
    """`dvc repro <stage>`; on failure restore its last good outputs (`dvc checkout`) and re-raise."""
    started = time.monotonic()
    try:  # the stage's own output (training progress, resumes) interleaved with dvc's
        out = run(["dvc", "repro", stage], repo, combined=True)
    except VersioningError as e:
        try:
            run(["dvc", "checkout", "--force", stage], repo)
            restored = "its last good outputs were restored with `dvc checkout`"
        except RsllmError:
            restored = "no earlier outputs to restore"
        raise StageFailed(f"stage {stage!r} failed; {restored}. {e}") from None
    ran = re.findall(r"Running stage '([^']+)'", out)
    return {"stage": stage, "ran": ran, "seconds": round(time.monotonic() - started, 1), "log": out[-4000:]}


class StageFailed(RsllmError):
    """A DVC stage failed (its last good outputs are restored)."""


def set_profile(repo: Path, profile: str) -> bool:
    """Make `profile` the active params.yaml profile and commit that change; False if it already was.

    Only a name under `profiles` is accepted (ConfigError before any file changes): the name is
    written into params.yaml, so anything else could rewrite other settings (the gate's, say).
    """
    path = Path(repo) / "params.yaml"
    text = path.read_text()
    check_profile_name(path, text, profile)
    current = load_settings(path).profile
    if current == profile:
        return False
    new, n = re.subn(r"(?m)^profile:.*$", f"profile: {profile}", text)
    if n != 1:
        raise ConfigError(f"{path}: needs exactly one top-level `profile:` line to switch profiles")
    path.write_text(new)
    try:
        load_settings(path)
    except ConfigError:
        path.write_text(text)
        raise
    run(
        ["git", "commit", "-q", "--no-verify", "-m", f"params: profile {profile}", "--", "params.yaml"],
        repo,
        extra_env=IDENTITY,
    )
    return True


def check_profile_name(path: Path, text: str, profile: object) -> None:
    """ConfigError unless `profile` is exactly one of the names under params.yaml's `profiles`."""
    raw = yaml.safe_load(text) or {}
    names = sorted(raw.get("profiles") or {}) if isinstance(raw, dict) else []
    if not isinstance(profile, str) or profile not in names or not re.fullmatch(r"[A-Za-z0-9_.-]+", profile):
        shown = repr(profile)[:60]
        raise ConfigError(
            f"{path}: profile {shown} is not one of profiles {names}; params.yaml left unchanged"
        )
