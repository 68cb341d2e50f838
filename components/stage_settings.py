"""Each DVC stage's settings, resolved for the active profile, as one small JSON file per consumer.

DVC can only depend on keys of params.yaml, and `profiles.<active>.x` exists for some profiles and not
others, so stages used to depend on the whole `profiles` and `llm` sections: editing a gate threshold or
`llm.eval_users` made both LLM stages stale (about 75 min on medium). Now the `settings` stage, the only
one that reads all of params.yaml, writes `settings/<consumer>.json` with exactly what that consumer
reads, and each stage depends on its own file. A file whose content did not change leaves its stage
up to date (DVC compares hashes), so a gate edit retrains nothing.

A command given `--settings FILE` refuses to run when the file differs from what params.yaml resolves
to, so a stage's declared dependency is the settings it actually ran with.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.config import Settings
from components.errors import ConfigError
from components.io import write_json_atomic

# llm keys read only when scoring (evaluation), never by training
LLM_EVAL_ONLY = ("eval_users", "eval_batch_users", "generation_users", "max_new_tokens")


def consumer_settings(s: Settings) -> dict[str, dict]:
    """{consumer: the resolved settings it reads}, JSON-ready. The gate (read by the retrain flow, not
    a DVC stage) is in none of them."""
    llm = s.llm.model_dump(mode="json")
    train = {k: v for k, v in llm.items() if k not in (*LLM_EVAL_ONLY, "stage1", "stage2")}
    return {
        "sasrec": {"seed": s.seed, "sasrec": s.sasrec.model_dump(mode="json")},
        "llm_stage1": {"seed": s.seed, "llm": {**train, "stage1": llm["stage1"]}},
        "llm_stage2": {"seed": s.seed, "llm": {**train, "stage2": llm["stage2"]}},
        "evaluate": {"seed": s.seed, "llm": llm},
    }


def write_settings(s: Settings, out_dir: Path) -> dict[str, str]:
    """Write settings/<consumer>.json for every consumer; returns {consumer: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, block in consumer_settings(s).items():
        write_json_atomic(out_dir / f"{name}.json", block)
        written[name] = str(out_dir / f"{name}.json")
    return written


def check_settings(s: Settings, consumer: str, path: Path) -> None:
    """ConfigError unless `path` holds exactly `consumer`'s settings as params.yaml resolves them now,
    naming the first key that differs."""
    path = Path(path)
    expected = consumer_settings(s).get(consumer)
    if expected is None:
        raise ConfigError(f"{path}: unknown settings consumer {consumer!r}")
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file not found (run `dvc repro settings`)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    key = first_difference(expected, found)
    if key is not None:
        raise ConfigError(
            f"{path}: stale for params.yaml at {key!r} (run `dvc repro`, which rewrites it first)"
        )


def first_difference(a: object, b: object, prefix: str = "") -> str | None:
    """The first dotted key where two JSON values differ, or None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            where = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                return where
            found = first_difference(a[k], b[k], where)
            if found is not None:
                return found
        return None
    return None if a == b else (prefix or "(top level)")
