"""Committing a batch of judged drops as one transaction: all of it is accepted and versioned, or
none of it is and every drop waits in data/incoming/ again.

Steps, each recorded in the journal data/incoming/.intake/journal.json before the next begins:
  begin      the data record (VERSIONED_FILES) copied and data/raw moved aside into data/incoming/.intake/
  staged     canonical drops written to data/accepted/, lines appended to data/manifest.jsonl
  merged     `dvc add data/accepted`, `dvc repro data/dvc.yaml:validate` (merge -> data/raw, validate)
  pushed     `dvc push` of the data (accepted + data stages' outputs) to the remote
  committed  git commit of the data record only
  tagged     git tag data/vN; then the originals move to data/archive/ and the journal is removed
A failure before `tagged` rolls back: the staged files are deleted, the data record and data/raw are
put back byte for byte, a commit already made is undone, and the originals never left data/incoming/.
A run that finds a journal (a killed run) rolls back a transaction that had not pushed yet and
completes one that had (commit, tag, archive; rolled back if that fails), and says which.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components import manifest, versioning
from components.errors import VersioningError
from components.io import atomic_file, write_json_atomic
from components.validate import drop_items_path

log = logging.getLogger(__name__)

WORK = Path("data/incoming/.intake")  # journal + backups (git-ignored, beside the waiting drops)
FAULT_ENV = "RSLLM_INTAKE_FAULT"  # tests: "kill:<step>" or "fail:<step>" right after <step>
PUSHED = ("pushed", "committed", "tagged")


@dataclass(eq=False)
class Judged:
    """A drop that passed judging: its original path and canonical tables."""

    drop: Path
    inter: pd.DataFrame
    items: pd.DataFrame | None


def _fault(step: str) -> None:
    """Fault injection for the tests: kill this process, or fail, right after `step`."""
    want = os.environ.get(FAULT_ENV, "")
    if want == f"kill:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if want == f"fail:{step}":
        raise VersioningError(f"injected failure after step {step!r} ({FAULT_ENV})")


def _save(repo: Path, journal: dict, step: str) -> None:
    journal["step"] = step
    write_json_atomic(repo / WORK / "journal.json", journal)
    _fault(step)


def pending(repo: Path) -> dict | None:
    """The journal of a half-done transaction, or None."""
    path = repo / WORK / "journal.json"
    return json.loads(path.read_text()) if path.exists() else None


def commit(repo: Path, batch: list[Judged], *, version: bool, note: str) -> dict | None:
    """Accept `batch` as one transaction (module docstring); the version's info, or None without
    `version` (`rsllm ingest --no-version`: merged and archived, no push, commit or tag)."""
    work, accepted = repo / WORK, repo / "data/accepted"
    shutil.rmtree(work, ignore_errors=True)
    (work / "record").mkdir(parents=True)
    staged = [_staged_files(accepted, j) for j in batch]
    journal: dict = {
        "head": versioning.run(["git", "rev-parse", "HEAD"], repo).strip(),
        "tag": versioning.next_tag(repo),
        "note": note,
        "originals": [str(p) for j in batch for p in (j.drop, drop_items_path(j.drop)) if p is not None],
        "staged": [str(f) for files in staged for f in files],
        "had": [f for f in versioning.VERSIONED_FILES if (repo / f).exists()],
    }
    for f in journal["had"]:
        shutil.copy2(repo / f, work / "record" / f.replace("/", "__"))
    _save(repo, journal, "begin")  # a kill from here on is rolled back from this journal
    try:
        if (repo / "data/raw").exists():
            os.replace(repo / "data/raw", work / "raw")
        entries = []
        for j, files in zip(batch, staged, strict=True):
            for frame, target in zip((j.inter, j.items), files, strict=False):
                with atomic_file(target) as fh:
                    frame.to_parquet(fh, index=False)
            entries.append(manifest.entry(j.drop.name, accepted, files, len(j.inter)))
        manifest.append(repo / manifest.MANIFEST, entries)
        _save(repo, journal, "staged")
        versioning.run(["dvc", "add", "data/accepted"], repo)
        versioning.run(["dvc", "repro", f"{versioning.DATA_STAGES}:validate"], repo)
        _save(repo, journal, "merged")
        if not version:
            _finish(repo, journal)
            return None
        journal["info"] = versioning.version_info(repo, journal["tag"], note)
        versioning.push_data(repo)
        _save(repo, journal, "pushed")
        _commit_and_tag(repo, journal)
    except BaseException as e:
        rollback(repo, journal)
        if isinstance(e, Exception) and not isinstance(e, VersioningError):
            raise VersioningError(f"intake failed and was rolled back: {type(e).__name__}: {e}") from e
        raise
    _finish(repo, journal)
    return journal["info"] | {"commit": versioning.run(["git", "rev-parse", "HEAD"], repo).strip()}


def _staged_files(accepted: Path, j: Judged) -> list[Path]:
    """Where a judged drop goes in data/accepted: interactions, then its items (if any)."""
    files = [accepted / f"{j.drop.stem}.parquet"]
    return files + ([accepted / f"{j.drop.stem}.items.parquet"] if j.items is not None else [])


def _commit_and_tag(repo: Path, journal: dict) -> None:
    """From `pushed`: commit the data record (unless that commit was made), then tag it."""
    info = journal["info"]
    if journal["step"] == "pushed":
        if versioning.run(["git", "rev-parse", "HEAD"], repo).strip() == journal["head"]:
            versioning.commit_version(repo, info)
        _save(repo, journal, "committed")
    if journal["step"] == "committed":
        if info["version"] not in versioning.existing_tags(repo):
            versioning.tag_version(repo, info)
        _save(repo, journal, "tagged")


def _finish(repo: Path, journal: dict) -> None:
    """The originals go to data/archive/; the backups and the journal are removed."""
    archive = repo / "data/archive"
    archive.mkdir(parents=True, exist_ok=True)
    for original in map(Path, journal["originals"]):
        if os.path.lexists(original):
            shutil.move(str(original), archive / original.name)
    shutil.rmtree(repo / WORK, ignore_errors=True)


def rollback(repo: Path, journal: dict) -> None:
    """Undo a transaction that had not pushed: staged files deleted, commit undone, the data record
    and data/raw back as they were. The originals are still in data/incoming/."""
    work = repo / WORK
    head = journal["head"]
    if journal["tag"] in versioning.existing_tags(repo):  # made, but its step was not recorded
        versioning.run(["git", "tag", "-d", journal["tag"]], repo)
    if versioning.run(["git", "rev-parse", "HEAD"], repo).strip() != head:  # our commit was made
        subject = versioning.run(["git", "log", "-1", "--format=%s%n%P"], repo).split("\n")
        if not subject[0].startswith(f"data: {journal['tag']} (") or subject[1].strip() != head:
            raise VersioningError(
                f"cannot roll back the intake in {repo / WORK}: HEAD moved past {head[:12]} by a commit "
                "that is not its version commit; move HEAD back by hand, then run `rsllm ingest` again"
            )
        versioning.run(["git", "reset", "-q", "--soft", head], repo)
    versioning.run(["git", "reset", "-q", head, "--", *versioning.VERSIONED_FILES], repo)
    for staged in map(Path, journal["staged"]):
        staged.unlink(missing_ok=True)
        for tmp in staged.parent.glob(f".{staged.name}.tmp-*"):  # a write the kill interrupted
            tmp.unlink(missing_ok=True)
    for f in versioning.VERSIONED_FILES:
        saved = work / "record" / f.replace("/", "__")
        if f in journal["had"] and saved.exists():
            os.replace(saved, repo / f)
        elif f not in journal["had"]:
            (repo / f).unlink(missing_ok=True)
    if (work / "raw").exists():
        shutil.rmtree(repo / "data/raw", ignore_errors=True)
        os.replace(work / "raw", repo / "data/raw")
    shutil.rmtree(work, ignore_errors=True)
    log.warning("intake rolled back; the drops wait in data/incoming: %s", journal["originals"])


def recover(repo: Path) -> dict | None:
    """Complete or roll back a half-done transaction left by a killed run; what was done, or None."""
    journal = pending(repo)
    if journal is None:
        return None
    names = [Path(p).name for p in journal["originals"]]
    if journal.get("step") in PUSHED:
        try:
            _commit_and_tag(repo, journal)
        except BaseException:
            rollback(repo, journal)
            raise
        _finish(repo, journal)
        info = journal["info"]
        log.warning("completed the half-done intake of %s as %s", names, info["version"])
        return {"action": "completed", "drops": names, "version": info["version"]}
    rollback(repo, journal)
    return {"action": "rolled back", "drops": names, "step": journal.get("step")}
