"""Prefect flow `rsllm` (deployment `weekly-retrain` in prefect.yaml): the weekly retrain.

It composes components and drives DVC; it never re-implements a stage that dvc.yaml defines.

  intake    waiting drops -> validate + ingest (accepted drops merged and versioned as one transaction,
            bad ones quarantined; a failed commit is rolled back and its drops wait)
  drift     each accepted drop against the production model's data (reported, never blocking)
  stages    `dvc repro <stage>` for every stage of dvc.yaml in order (a failed stage is restored)
  rescore   the production model on the new candidate sets (metrics/production.json)
  gate      thresholds + no regression vs production -> reports/gate.json
  promote   the candidate into the BentoML store, production pointer moved (atomic)

"No new data" is a Completed run that trains nothing, except on the first run (no production
model yet) or with `force`. Tasks pass paths and small dicts, never models or frames.

The run holds the repository lock (components/lock.py), so no ingest, restore or promotion
runs beside it. Run once without a server: `python -m flows.retrain [--profile demo] [--force]`
(Prefect's ephemeral mode).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from components import gate as gate_lib
from components import ingest as ingest_lib
from components import pipeline, registry, report, versioning
from components import rescore as rescore_lib
from components.config import load_settings
from components.errors import DataValidationError, GateRejected, RsllmError, SourceError, VersioningError
from components.lock import repo_lock


def _no_retry_on_bad_data(task, task_run, state) -> bool:
    """Retry transient failures only: bad data stays bad however often it is read."""
    try:
        state.result()
    except (DataValidationError, SourceError, GateRejected):
        return False
    except Exception:
        return True
    return False


@task(name="intake")
def intake(repo: str) -> dict:
    """Validate and ingest every waiting drop; a rejected drop fails the run (after the others)."""
    settings = load_settings(Path(repo) / "params.yaml")
    result = ingest_lib.ingest(settings, None, Path(repo))
    if result["rejected"]:
        reasons = "; ".join(r["message"] for r in result["rejected"])
        raise DataValidationError(f"{len(result['rejected'])} drop(s) rejected and quarantined: {reasons}")
    if result.get("error"):  # rolled back; the drops wait in data/incoming for the next run
        raise VersioningError(f"intake of {', '.join(result['waiting'])} rolled back: {result['error']}")
    return result


@task(name="drift", retries=1, retry_delay_seconds=5)
def drift(repo: str, drops: list[str]) -> list[dict]:
    """The drift flow on each accepted drop (a subflow run each; never blocks training)."""
    from flows.drift import drift_check

    results = []
    for drop in drops:
        try:
            results.append(drift_check(path=drop, repo=repo))
        except Exception as e:  # drift is reported, never blocking
            get_run_logger().warning("drift check of %s failed: %s", drop, e)
    return results


@task(name="dvc-repro", retries=1, retry_delay_seconds=10, retry_condition_fn=_no_retry_on_bad_data)
def repro(repo: str, stage: str) -> dict:
    """`dvc repro <stage>`; its last good outputs are restored when it fails. Its output goes to the log."""
    result = pipeline.repro_stage(Path(repo), stage)
    if result["ran"]:
        get_run_logger().info("dvc repro %s:\n%s", stage, result.pop("log"))
    else:
        result.pop("log")
    return result


@task(name="rescore-production")
def rescore(repo: str) -> str | None:
    """Score the production model on the new candidate sets; None when nothing is in production."""
    return rescore_lib.score_production(Path(repo))


@task(name="gate")
def gate(repo: str) -> dict:
    """Apply the thresholds; write reports/gate.json."""
    return gate_lib.run_gate(Path(repo))


@task(name="version-snapshot")
def version_snapshot(repo: str) -> str | None:
    """The data version the candidate was trained on; the first run records the initial snapshot."""
    return versioning.ensure_data_version(Path(repo))


@task(name="promote")
def promote(repo: str) -> dict:
    """Package the candidate into the BentoML store and move the production pointer."""
    return registry.promote_candidate(Path(repo))


@flow(name="rsllm", log_prints=True)
def weekly_retrain(profile: str | None = None, force: bool = False, repo: str = "."):
    """Intake, drift, `dvc repro` stage by stage, gate, promote. See the module docstring.

    The whole run holds the repository lock (its tasks, on other threads, enter it again)."""
    repo = str(Path(repo).resolve())
    with repo_lock(Path(repo), "retrain"):
        return _retrain(profile, force, repo)


def _retrain(profile: str | None, force: bool, repo: str):
    log = get_run_logger()
    if profile:
        pipeline.set_profile(Path(repo), profile)
    taken = intake(repo)
    accepted = [str(Path(repo) / "data/accepted" / a["drop"]) for a in taken["accepted"]]
    accepted = [str(Path(p).with_suffix(".parquet")) for p in accepted]
    if accepted:
        drift(repo, accepted)
    production = registry.read_production(Path(repo))
    if production is not None and not force and not pipeline.pipeline_changed(Path(repo)):
        log.info("no new data and every stage is up to date: nothing to retrain")
        return Completed(message="no new data: nothing retrained (dvc: up to date)")

    timings = [repro(repo, stage) for stage in pipeline.dvc_stages(Path(repo))]
    rescore(repo)
    decision = gate(repo)
    create_markdown_artifact(
        key="retrain-report",
        markdown=report.report_markdown(Path(repo), timings, taken),
        description="metrics vs production, gate decision, reports, data version",
    )
    if not decision["passed"]:
        raise GateRejected(
            "gate rejected the candidate; production unchanged: " + "; ".join(decision["failed"])
        )
    version_snapshot(repo)
    promoted = promote(repo)
    log.info("promoted %s", promoted["model_tag"])
    return {
        "promoted": promoted["model_tag"],
        "data_version": promoted.get("data_version"),
        "stages": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the weekly retrain once (no server needed).")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    try:
        result = weekly_retrain(profile=args.profile, force=args.force)
    except RsllmError as e:
        print(report.summary_text(Path(".")))
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    print(report.summary_text(Path(".")))
    print(json.dumps(result if isinstance(result, dict) else {"state": str(result)}, default=str))


if __name__ == "__main__":
    main()
