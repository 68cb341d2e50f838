"""Prefect flow `rsllm-drift` (deployment `drift-check` in prefect.yaml: daily, and run by the retrain flow
when a drop arrives). It only composes components; tasks pass file paths.

  check   components.drift.check_drift -> reports/drift/<date>.json (+ Evidently's .html)
  verdict a markdown artifact `drift-verdict` on the run, whatever the verdict
  alert   on drift, the Prefect event `rsllm.data.drift` with the figures in its payload, once per drop
          (reports/drift/alerts.jsonl remembers the drops already announced; force=True announces again)

Run once without a deployment: `python -m flows.drift [PATH] [--force]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from components import drift
from components.alerts import DRIFT_EVENT
from components.config import load_settings

LEDGER = Path("reports/drift/alerts.jsonl")


@task(name="check-drift")
def check(repo: str, params: str, path: str | None, reference: str | None) -> str:
    """Run the drift check; return the path of its JSON report."""
    settings = load_settings(Path(repo) / params)
    result = drift.check_drift(settings, Path(repo), Path(path) if path else None, reference)
    return result["json"]


@task(name="drift-verdict")
def verdict(report: str) -> None:
    """Show the verdict on the flow run as a markdown artifact."""
    result = json.loads(Path(report).read_text(encoding="utf-8"))
    create_markdown_artifact(
        markdown=drift.verdict_markdown(result),
        key="drift-verdict",
        description="drift" if result["drift"] else "no drift",
    )


@task(name="drift-alert")
def alert(report: str, repo: str, force: bool = False) -> bool:
    """Emit `rsllm.data.drift` when the report says drift and this drop was not announced yet."""
    result = json.loads(Path(report).read_text(encoding="utf-8"))
    if not result["drift"]:
        return False
    ledger = Path(repo) / LEDGER
    sha = result["current"]["sha256"]
    seen = (
        {json.loads(line)["sha256"] for line in ledger.read_text().splitlines()} if ledger.exists() else set()
    )
    if sha in seen and not force:
        get_run_logger().info("drift of %s was already announced; not again", result["current"]["source"])
        return False
    payload = drift.summary(result) | {"text": drift.alert_text(result)}
    emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"rsllm.drop.{sha[:16]}",
            "prefect.resource.name": Path(result["current"]["source"]).name,
        },
        payload=payload,
    )
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps({"sha256": sha, "date": result["date"], "source": result["current"]["source"]}) + "\n"
        )
    return True


@flow(name="rsllm-drift")
def drift_check(
    path: str | None = None,
    reference: str | None = None,
    repo: str = ".",
    params: str = "params.yaml",
    force: bool = False,
) -> dict:
    """Data drift of a drop (default: the newest one) against the production model's data; on drift,
    the event `rsllm.data.drift` (automations turn it into a notification and, if enabled, a retrain)."""
    repo = str(Path(repo).resolve())
    report = check(repo, params, path, reference)
    verdict(report)
    announced = alert(report, repo, force)
    result = json.loads(Path(report).read_text(encoding="utf-8"))
    return {"drift": result["drift"], "tripped": result["tripped"], "report": report, "event": announced}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the rsllm-drift flow once.")
    parser.add_argument("path", nargs="?", default=None, help="a drop (default: the newest)")
    parser.add_argument("--reference", default=None)
    parser.add_argument("--force", action="store_true", help="announce drift even if already announced")
    args = parser.parse_args()
    print(json.dumps(drift_check(args.path, args.reference, force=args.force), sort_keys=True))
