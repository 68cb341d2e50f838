"""Prefect flow `rsllm-drift` (deployment `drift-check` in prefect.yaml: daily, and run by the retrain flow
when a drop arrives). It only composes components; tasks pass file paths.

  check   components.drift.check_drift -> reports/drift/<date>.json (+ Evidently's .html)
  verdict a markdown artifact `drift-verdict` on the run, whatever the verdict
  alert   on drift, the Prefect event `rsllm.data.drift` with the figures in its payload (auto-retrain
          listens to it) and the notification, sent through the `rsllm alerts setup` block, once per drop;
          every attempt is a line of reports/drift/alerts.jsonl (force=True announces again). Alerts
          that could not be delivered (webhook down) are sent again by every later run, and the run
          fails while any remains undelivered (`rsllm alerts status` shows them).

Run once without a deployment: `python -m flows.drift [PATH] [--force]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from components import alerts, drift
from components.config import load_settings
from components.errors import AlertError


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
def alert(report: str, repo: str, params: str, force: bool = False) -> dict:
    """On drift, for a drop not announced before: emit `rsllm.data.drift` and send the notification.
    Then send again every earlier alert that was not delivered. Returns what was done."""
    result = json.loads(Path(report).read_text(encoding="utf-8"))
    cfg = load_settings(Path(repo) / params).drift.alerts
    sha = result["current"]["sha256"]
    event, attempts = False, []
    if result["drift"]:
        new = {
            "sha256": sha,
            "source": result["current"]["source"],
            "date": result["date"],
            "subject": f"RSLLM data drift: {', '.join(result['tripped'])}",
            "body": drift.alert_text(result),
        }
        attempt = alerts.announce(Path(repo), cfg, new, force)
        if attempt is None:
            get_run_logger().info("drift of %s was already announced; not again", new["source"])
        else:
            attempts.append(attempt)
            emit_event(
                event=alerts.DRIFT_EVENT,
                resource={
                    "prefect.resource.id": f"rsllm.drop.{sha[:16]}",
                    "prefect.resource.name": Path(new["source"]).name,
                },
                payload=drift.summary(result) | {"text": new["body"]},
            )
            event = True
    attempts += alerts.resend(Path(repo), cfg, skip={a["sha256"] for a in attempts})
    undelivered = sorted({a["source"] for a in attempts if a["status"] != "delivered"})
    for a in attempts:
        log = get_run_logger().info if a["status"] == "delivered" else get_run_logger().error
        log("alert for %s: %s%s", a["source"], a["status"], f" ({a['error']})" if a["error"] else "")
    return {"event": event, "sent": [a["source"] for a in attempts], "undelivered": undelivered}


@flow(name="rsllm-drift")
def drift_check(
    path: str | None = None,
    reference: str | None = None,
    repo: str = ".",
    params: str = "params.yaml",
    force: bool = False,
) -> dict:
    """Data drift of a drop (default: the newest one) against the production model's data; on drift,
    the event `rsllm.data.drift` (an automation turns it into a retrain when enabled) and the alert.
    Fails (after recording everything) while an alert could not be delivered."""
    repo = str(Path(repo).resolve())
    report = check(repo, params, path, reference)
    verdict(report)
    sent = alert(report, repo, params, force)
    result = json.loads(Path(report).read_text(encoding="utf-8"))
    out = {"drift": result["drift"], "tripped": result["tripped"], "report": report} | sent
    if sent["undelivered"]:
        raise AlertError(
            f"alerts not delivered for {', '.join(sent['undelivered'])}: the next run sends them again "
            f"(see `rsllm alerts status`); result: {json.dumps(out, sort_keys=True)}"
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the rsllm-drift flow once.")
    parser.add_argument("path", nargs="?", default=None, help="a drop (default: the newest)")
    parser.add_argument("--reference", default=None)
    parser.add_argument("--force", action="store_true", help="announce drift even if already announced")
    args = parser.parse_args()
    try:
        print(json.dumps(drift_check(args.path, args.reference, force=args.force), sort_keys=True))
    except AlertError as e:
        print(f"AlertError: {e}", file=sys.stderr)
        sys.exit(1)
