"""`rsllm alerts`: the drift alerts on the Prefect server (setup, status, resend)."""

from __future__ import annotations

from pathlib import Path

import typer

from components.cli_common import ParamsOpt, cli_errors, console, print_json, settings_for
from components.config import DEFAULT_PARAMS

alerts_app = typer.Typer(help="Alerts on the Prefect server (drift, failed retrains).", no_args_is_help=True)


@alerts_app.command("setup")
@cli_errors
def alerts_setup(
    params: ParamsOpt = DEFAULT_PARAMS,
    webhook_url: str | None = typer.Option(None, help="overrides drift.alerts.webhook_url (or Slack's)"),
) -> None:
    """Create or update (by name) the notification block and the automations on the Prefect server."""
    from components import alerts

    print_json(alerts.setup(settings_for(params).drift, webhook_url))


@alerts_app.command("status")
@cli_errors
def alerts_status(repo: Path = typer.Option(Path("."), help="the repository")) -> None:
    """Every drift alert with its delivery: delivered, or undelivered with the last error."""
    from rich.table import Table

    from components import alerts

    rows = sorted(alerts.states(repo).values(), key=lambda s: (s["date"], s["source"]))
    table = Table("week", "drop", "status", "attempts", "last attempt", "error", title="drift alerts")
    for s in rows:
        style = "green" if s["status"] == "delivered" else "bold red"
        table.add_row(
            s["date"],
            Path(s["source"]).name,
            f"[{style}]{s['status']}[/]",
            str(s["attempts"]),
            s.get("at", ""),
            s["error"] or "",
        )
    console.print(table)
    keep = ("sha256", "source", "date", "status", "attempts", "at", "error")
    undelivered = [s["source"] for s in rows if s["status"] != "delivered"]
    print_json({"alerts": [{k: s.get(k) for k in keep} for s in rows], "undelivered": undelivered})


@alerts_app.command("resend")
@cli_errors
def alerts_resend(
    repo: Path = typer.Option(Path("."), help="the repository"), params: ParamsOpt = DEFAULT_PARAMS
) -> None:
    """Send every undelivered drift alert again now (the drift flow also does, on every run)."""
    from components import alerts
    from components.errors import AlertError

    attempts = alerts.resend(repo, settings_for(params).drift.alerts)
    undelivered = [a["source"] for a in attempts if a["status"] != "delivered"]
    print_json({"sent": [a["source"] for a in attempts], "undelivered": undelivered})
    if undelivered:
        errors = sorted({a["error"] for a in attempts if a["error"]})
        raise AlertError(f"still undelivered: {', '.join(undelivered)} ({'; '.join(errors)})")
