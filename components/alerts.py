"""Alerts a person receives, set up on the Prefect server by name (idempotent): `rsllm alerts setup`.

  block                       a notification block (params drift.alerts.channel): a custom webhook by
                              default, a Slack incoming webhook, or e-mail through SendGrid
  drift alerts                sent by the drift flow itself through that block (`announce`), so that the
                              delivery is known: every attempt is a line of reports/drift/alerts.jsonl,
                              an undelivered alert is sent again by the next run (or `rsllm alerts
                              resend`), and `rsllm alerts status` shows them
  rsllm-retrain-failed-alert  automation: a run of flow `rsllm` (deployment weekly-retrain) Failed or
                              Crashed, which includes a candidate the gate rejected -> the same notification
  rsllm-auto-retrain          automation (only with drift.auto_retrain: true; deleted when false):
                              event `rsllm.data.drift` -> run deployment `rsllm/weekly-retrain`

Running it again updates everything in place; nothing is duplicated (and it deletes the automation
`rsllm-drift-alert` of earlier versions, which sent drift alerts without knowing whether they arrived).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from filelock import FileLock

from components.config import AlertSettings, DriftSettings
from components.errors import AlertError

LEDGER = Path("reports/drift/alerts.jsonl")  # relative to the repository: one line per delivery attempt

DRIFT_EVENT = "rsllm.data.drift"
RETRAIN_FLOW = "rsllm"
RETRAIN_DEPLOYMENT = "rsllm/weekly-retrain"
DRIFT_ALERT = "rsllm-drift-alert"
RETRAIN_FAILED_ALERT = "rsllm-retrain-failed-alert"
AUTO_RETRAIN = "rsllm-auto-retrain"
FAILED_SUBJECT = "RSLLM weekly retrain {{ flow_run.name }}: {{ event.event.split('.')[-1] }}"
FAILED_BODY = (
    "Flow run {{ flow_run.name }} of flow rsllm (weekly retrain) ended "
    "{{ event.event.split('.')[-1] }}: {{ flow_run.state.message }}\n"
    "A model the gate rejects fails the run on purpose: production is unchanged."
)


def notification_block(cfg: AlertSettings, webhook_url: str | None = None):
    """The notification block of `cfg.channel` (not saved). Secrets come from the environment:
    RSLLM_SLACK_WEBHOOK_URL (when drift.alerts.slack_webhook_url is empty), RSLLM_SENDGRID_API_KEY."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SendgridEmail, SlackWebhook

    if cfg.channel == "webhook":
        url = webhook_url or cfg.webhook_url
        if not url:
            raise AlertError("params.yaml drift.alerts.webhook_url is empty: set it or pass --webhook-url")
        return CustomWebhookNotificationBlock(
            name=cfg.block_name,
            url=url,
            json_data={"source": "rsllm-ops", "subject": "{{subject}}", "body": "{{body}}"},
        )
    if cfg.channel == "slack":
        url = webhook_url or cfg.slack_webhook_url or os.environ.get("RSLLM_SLACK_WEBHOOK_URL", "")
        if not url:
            raise AlertError(
                "drift.alerts.channel is slack but no URL: set drift.alerts.slack_webhook_url, "
                "RSLLM_SLACK_WEBHOOK_URL or --webhook-url"
            )
        return SlackWebhook(url=url)
    key = os.environ.get("RSLLM_SENDGRID_API_KEY", "")
    if not key or not cfg.emails or not cfg.sender_email:
        raise AlertError(
            "drift.alerts.channel is email: set drift.alerts.emails, drift.alerts.sender_email "
            "and the RSLLM_SENDGRID_API_KEY environment variable"
        )
    return SendgridEmail(api_key=key, sender_email=cfg.sender_email, to_emails=list(cfg.emails))


def setup(cfg: DriftSettings, webhook_url: str | None = None) -> dict:
    """Create or update the notification block and the automations on the Prefect server (by name)."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment, SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise AlertError(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and point at it "
            "(`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)"
        )
    block = notification_block(cfg.alerts, webhook_url)
    try:
        block_id = block.save(cfg.alerts.block_name, overwrite=True)
    except Exception as e:  # the server is down or refuses the block
        raise AlertError(
            f"cannot save block {cfg.alerts.block_name!r} at {PREFECT_API_URL.value()}: {e}"
        ) from None
    notify_failed = SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY)
    wanted = {
        RETRAIN_FAILED_ALERT: Automation(
            name=RETRAIN_FAILED_ALERT,
            description="Notify when a run of flow rsllm (weekly-retrain) fails, a gate rejection included.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": RETRAIN_FLOW},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[notify_failed],
        ),
    }
    with get_client(sync_client=True) as client:
        if cfg.auto_retrain:
            try:
                deployment = client.read_deployment_by_name(RETRAIN_DEPLOYMENT)
            except Exception:
                raise AlertError(
                    f"drift.auto_retrain is on but deployment {RETRAIN_DEPLOYMENT} is not on the server: "
                    "deploy it first (`prefect deploy --name weekly-retrain`)"
                ) from None
            wanted[AUTO_RETRAIN] = Automation(
                name=AUTO_RETRAIN,
                description="Retrain when the drift check finds drift (params.yaml drift.auto_retrain).",
                trigger=EventTrigger(expect={DRIFT_EVENT}, posture=Posture.Reactive, threshold=1),
                actions=[RunDeployment(source="selected", deployment_id=deployment.id)],
            )
        done = {name: _upsert(client, automation) for name, automation in wanted.items()}
        for name in [DRIFT_ALERT] + ([] if cfg.auto_retrain else [AUTO_RETRAIN]):
            for old in client.read_automations_by_name(name):
                client.delete_automation(old.id)
                done[name] = {"id": str(old.id), "action": "deleted"}
    return {
        "block": {"name": cfg.alerts.block_name, "type": block.get_block_type_slug(), "id": str(block_id)},
        "automations": done,
        "auto_retrain": cfg.auto_retrain,
        "api_url": PREFECT_API_URL.value(),
    }


def _upsert(client, automation) -> dict:
    """Update the automation of that name (dropping duplicates), or create it."""
    from prefect.events.schemas.automations import AutomationCore

    existing = client.read_automations_by_name(automation.name)
    if not existing:
        body = AutomationCore(**automation.model_dump(exclude={"id"}))
        return {"id": str(client.create_automation(body)), "action": "created"}
    keep, *extra = existing
    for duplicate in extra:
        client.delete_automation(duplicate.id)
    # the update endpoint refuses owner_resource (as prefect.automations.Automation.update leaves it out)
    client.update_automation(
        keep.id, AutomationCore(**automation.model_dump(exclude={"id", "owner_resource"}))
    )
    return {"id": str(keep.id), "action": "updated"}


# -- drift alerts: sent from the flow, every attempt recorded -------------------------------------------

BLOCK_TYPES = {"webhook": "custom-webhook", "slack": "slack-webhook", "email": "sendgrid-email"}


def send(cfg: AlertSettings, subject: str, body: str) -> str | None:
    """Send one notification through the block saved by `rsllm alerts setup`: None when it was
    delivered (the webhook answered 2xx, Apprise reported success), else why not (one short line)."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(f"{BLOCK_TYPES[cfg.channel]}/{cfg.block_name}")
    except Exception as e:  # no server, or no block: `rsllm alerts setup` was not run
        return f"cannot load block {cfg.block_name!r} (run `rsllm alerts setup`): {type(e).__name__}: {e}"[
            :300
        ]
    try:
        if hasattr(block, "raise_on_failure"):  # Apprise blocks report failure only when asked to
            with block.raise_on_failure():
                block.notify(body=body, subject=subject)
        else:
            block.notify(body=body, subject=subject)
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:300]
    return None


def ledger(repo: Path) -> list[dict]:
    """Every recorded attempt, oldest first ([] before the first alert)."""
    path = Path(repo) / LEDGER
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def states(repo: Path) -> dict[str, dict]:
    """Per drop (sha256): its last attempt, with the number of attempts so far."""
    out: dict[str, dict] = {}
    for entry in ledger(repo):
        attempts = out.get(entry["sha256"], {}).get("attempts", 0) + 1
        # a line without status was written before delivery was tracked: the automation sent it
        out[entry["sha256"]] = {"status": "delivered", "error": None} | entry | {"attempts": attempts}
    return out


def _attempt(repo: Path, cfg: AlertSettings, alert: dict) -> dict:
    """Send `alert` (sha256, source, date, subject, body) and append the attempt to the ledger."""
    error = send(cfg, alert["subject"], alert["body"])
    entry = {k: alert[k] for k in ("sha256", "source", "date", "subject", "body")} | {
        "status": "undelivered" if error else "delivered",
        "error": error,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path = Path(repo) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry


def resend(repo: Path, cfg: AlertSettings, skip: set[str] = frozenset()) -> list[dict]:
    """Send every alert whose last attempt failed again (but those of `skip`, sha256s just tried);
    return the new attempts."""
    with FileLock(str(Path(repo) / LEDGER) + ".lock", timeout=60):
        pending = [s for s in states(repo).values() if s["status"] != "delivered" and s["sha256"] not in skip]
        return [_attempt(repo, cfg, s) for s in pending]


def announce(repo: Path, cfg: AlertSettings, alert: dict, force: bool = False) -> dict | None:
    """Send the alert of a drop unless it was delivered before (force: send anyway): the new attempt,
    or None when there was nothing to send. An undelivered one is left to `resend`."""
    with FileLock(str(Path(repo) / LEDGER) + ".lock", timeout=60):
        before = states(repo).get(alert["sha256"])
        if before is not None and not force:
            return None
        return _attempt(repo, cfg, alert)
