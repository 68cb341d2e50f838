"""Model registry: the BentoML model store plus a production pointer file.

- `rsllm`       one BentoML model per promoted candidate, holding everything the service needs
                (ONNX encoder, projected item embeddings, adapters, projector, catalogue, id mapping)
                and its config `BundleConfig` (metrics, data version, git commit, params, checksums)
                as its BentoML metadata (model.yaml): read it with `bundle_config(model)` only.
- `rsllm-base`  the base LLM weights, saved once per distinct content and referenced by tag.
- production    `models/registry/production.json`, written by atomic rename: the tag the service
                loads at startup. The store has no production marker of its own.

Promotion is atomic: the model is saved into the store first (BentoML writes it in a temp folder
and moves it in), then the pointer is replaced in one rename. A crash at any point leaves either
the old or the new production, never a mix. Promote, rollback and gc hold the repository lock
(components/lock.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import bentoml

from components.errors import ModelError, RegistryError
from components.folders import FolderConfig, parse_config
from components.io import sha256_of, write_json_atomic
from components.lock import repo_lock
from components.paths import outputs

MODEL_NAME = "rsllm"
MODEL_YAML = "model.yaml"  # BentoML's own file in a stored model (written after the checksums)
BASE_NAME = "rsllm-base"
POINTER = Path("models/registry/production.json")
HISTORY = Path("models/registry/history.jsonl")


def dir_digest(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file in `folder`."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def save_base(base_dir: Path) -> str:
    """Save the base LLM once per distinct content; return its tag (reused when already stored)."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").exists():
        raise RegistryError(f"{base_dir}: not a model folder (config.json missing)")
    digest = dir_digest(base_dir)
    for model in _list(BASE_NAME):
        if model.info.labels.get("sha256") == digest[:63]:
            return str(model.tag)
    with bentoml.models.create(
        BASE_NAME, labels={"sha256": digest[:63]}, metadata={"source": str(base_dir)}
    ) as model:
        shutil.copytree(base_dir, model.path, dirs_exist_ok=True)
    return str(model.tag)


class BundleConfig(FolderConfig):
    """A stored `rsllm` model's config: its BentoML metadata (model.yaml), read by `bundle_config`."""

    kind: Literal["bundle"] = "bundle"
    checksums: dict[str, str] = {}  # relative path -> sha256 of every file ({}: stored without, unverified)
    metrics: dict[str, float] = {}  # the gate's numeric metrics (hr@1, ndcg@10, ...)
    data_version: str | None = None  # the data snapshot it was trained on
    git_commit: str | None = None  # the code it was trained with
    base_tag: str = ""  # the `rsllm-base` model it runs on ("": none recorded, set RSLLM_BASE_TAG)
    rerank_default: bool = False  # whether requests rerank unless they say otherwise
    rerank_reason: str = ""  # why rerank_default is what it is (the gate's rerank rule)
    profile: str | None = None  # the params.yaml profile it was trained with
    params: dict[str, Any] = {}  # the settings it was trained with: a record, never read back


LEGACY_RERANK_REASON = "stored before the rerank rule: rerank off"


def _legacy_bundle(raw: dict) -> BundleConfig:
    """v0 (bundles stored before typed folders): the same keys untyped, any of them missing."""
    known = {k: v for k, v in raw.items() if k in BundleConfig.model_fields}
    reason = raw.get("rerank_reason") or LEGACY_RERANK_REASON
    return BundleConfig(**{**known, "format_version": 1, "rerank_reason": reason})


def bundle_config(model) -> BundleConfig:
    """A stored model's config; ModelError naming the model when it is invalid or from a newer rsllm."""
    return parse_config(dict(model.info.metadata), BundleConfig, f"model {model.tag}", legacy=_legacy_bundle)


def save_candidate(parts: dict[str, Path], metadata: dict, labels: dict | None = None) -> str:
    """Save a candidate model: each entry of `parts` (name -> file or folder) is copied in under its
    name; `metadata` (BundleConfig's fields; checksums and format_version are replaced) is checked
    before any copy, and the sha256 of every file goes into its config (verified on load).
    Nothing reaches the store unless every copy succeeded."""
    missing = [f"{name} ({path})" for name, path in parts.items() if not Path(path).exists()]
    if missing:
        raise RegistryError(f"cannot package the model, missing: {', '.join(missing)}")
    fields = {**metadata, "format_version": BundleConfig.FORMAT_VERSION, "checksums": {}}
    draft = parse_config(fields, BundleConfig, f"{MODEL_NAME} candidate metadata")
    with bentoml.models.create(MODEL_NAME, labels=labels or {}) as model:
        for name, path in parts.items():
            target = Path(model.path) / name
            if Path(path).is_dir():
                shutil.copytree(path, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        config = draft.model_copy(update={"checksums": bundle_checksums(Path(model.path))})
        model.info.metadata.update(_jsonable(config.model_dump(mode="json")))  # model.yaml is written on exit
    return str(model.tag)


def bundle_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a stored model by relative path (BentoML's own model.yaml excluded)."""
    return {
        str(path.relative_to(folder)): sha256_of(path)
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.relative_to(folder) != Path(MODEL_YAML)
    }


def verify_model(model) -> bool:
    """Check a stored model's files against the checksums written when it was packaged.

    True when every file matches; False for a legacy bundle stored without checksums; RegistryError
    naming the file when one was changed, removed or added.
    """
    expected = bundle_config(model).checksums
    if not expected:
        return False
    folder = Path(model.path)
    actual = bundle_checksums(folder)
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problem = "is missing"
        elif name not in expected:
            problem = "was added after packaging"
        elif actual[name] != expected[name]:
            problem = f"has sha256 {actual[name][:12]}..., packaged as {expected[name][:12]}..."
        else:
            continue
        raise RegistryError(f"model {model.tag}: {folder / name} {problem}; the stored model is not intact")
    return True


def read_production(repo: Path = Path(".")) -> dict | None:
    """The production pointer, or None when nothing was promoted yet; RegistryError naming the file
    when it is not a pointer (not JSON, or no model tag)."""
    path = Path(repo) / POINTER
    if not path.exists():
        return None
    fix = "point it at a stored model with `rsllm promote rsllm:<tag>` (`rsllm models` lists them)"
    try:
        pointer = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{path}: not valid JSON ({e}); {fix}") from None
    if (
        not isinstance(pointer, dict)
        or not isinstance(pointer.get("model_tag"), str)
        or not pointer["model_tag"]
    ):
        raise RegistryError(f"{path}: not a production pointer (no 'model_tag' string); {fix}")
    for key in ("base_tag", "previous"):
        if pointer.get(key) is not None and not isinstance(pointer[key], str):
            raise RegistryError(f"{path}: '{key}' must be a model tag or null; {fix}")
    return pointer


def production_model(repo: Path = Path(".")):
    """The stored model production points at; RegistryError naming the pointer when there is none or
    it points at a model no longer in the store."""
    pointer = read_production(repo)
    if pointer is None:
        raise RegistryError(f"{Path(repo) / POINTER}: no production model yet (`rsllm promote rsllm:<tag>`)")
    try:
        return _get(pointer["model_tag"])
    except RegistryError as e:
        raise RegistryError(
            f"{Path(repo) / POINTER} points at a missing model: {e}; `rsllm rollback`"
        ) from None


def promote(tag: str, repo: Path = Path("."), *, action: str = "promote", **info) -> dict:
    """Point production at `tag` (already in the store) by atomic rename; append to the history.

    `previous` is the model a rollback would now return to (after a promotion: the one it replaced).
    """
    with repo_lock(repo, "promote"):
        model = _get(tag)
        config = bundle_config(model)  # a bundle from a newer rsllm is refused before the pointer moves
        stack = _after(promotion_stack(repo), str(model.tag), action)
        pointer = {
            "model_tag": str(model.tag),
            "base_tag": config.base_tag or None,
            "data_version": config.data_version,
            "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "previous": stack[-2] if len(stack) > 1 else None,
            "action": action,
        } | info
        write_json_atomic(Path(repo) / POINTER, pointer)
        with open(Path(repo) / HISTORY, "a") as fh:
            fh.write(json.dumps(pointer, sort_keys=True) + "\n")
        return pointer


def promotion_stack(repo: Path = Path(".")) -> list[str]:
    """Production models from the oldest to the current one, replayed from the history: a promotion
    pushes its model, a rollback pops back to its target. A missing or unreadable history gives []."""
    path = Path(repo) / HISTORY
    stack: list[str] = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
            tag = entry["model_tag"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill: skipped, the next promotion rewrites the pointer anyway
        rolled = entry.get("action") == "rollback" or str(entry.get("reason", "")).startswith("rollback")
        stack = _after(stack, tag, "rollback" if rolled else "promote")
    try:
        current = (read_production(repo) or {}).get("model_tag")
    except RegistryError:
        current = None
    if current and (not stack or stack[-1] != current):  # killed between the pointer and the history
        stack.append(current)
    return stack


def _after(stack: list[str], tag: str, action: str) -> list[str]:
    """The stack once `tag` became production by `action`."""
    if action == "rollback" and tag in stack:
        return stack[: len(stack) - stack[::-1].index(tag)]
    return stack if stack and stack[-1] == tag else [*stack, tag]


def rollback(repo: Path = Path("."), to: str | None = None) -> dict:
    """Point production back at the model before it in the promotion history (skipping models no
    longer in the store), or at `to`."""
    with repo_lock(repo, "promote"):
        if to is None:
            if read_production(repo) is None:  # a broken pointer raises here, naming the file
                raise RegistryError("nothing to roll back to: nothing was promoted yet")
            stack = promotion_stack(repo)
            current = stack[-1] if stack else None
            stored = {str(m.tag) for m in _list(MODEL_NAME)}
            earlier = [tag for tag in stack[:-1] if tag in stored]
            if not earlier:
                gone = [tag for tag in stack[:-1] if tag not in stored]
                raise RegistryError(
                    f"nothing to roll back to: {Path(repo) / HISTORY} has no model before {current} still in "
                    f"the store" + (f" (deleted: {', '.join(gone)})" if gone else "")
                )
            to = earlier[-1]
        else:
            current = _current_tag(repo)
        return promote(to, repo, action="rollback", reason=f"rollback from {current}")


def _current_tag(repo: Path) -> str | None:
    """Production's tag, or None when there is none or the pointer is unreadable (for recovery)."""
    try:
        return (read_production(repo) or {}).get("model_tag")
    except RegistryError:
        return None


def list_models(repo: Path = Path(".")) -> list[dict]:
    """Every stored `rsllm` model, newest first, with its metrics and whether it is production."""
    production = _current_tag(repo)
    rows = []
    for model in sorted(_list(MODEL_NAME), key=lambda m: m.info.creation_time, reverse=True):
        try:
            config, problem = bundle_config(model), None
        except ModelError as e:  # listed all the same: a newer rsllm's bundle must not hide the others
            config, problem = BundleConfig(format_version=1), str(e)
        rows.append(
            {
                "tag": str(model.tag),
                "created": model.info.creation_time.isoformat(timespec="seconds"),
                "production": str(model.tag) == production,
                "data_version": config.data_version,
                "metrics": config.metrics,
                "git_commit": config.git_commit,
                "unreadable": problem,
            }
        )
    return rows


def gc(repo: Path = Path("."), keep: int = 3) -> list[str]:
    """Delete all but the newest `keep` models, never production or its previous; then unused bases."""
    with repo_lock(repo, "gc"):
        pointer = read_production(repo) or {}
        protected = {pointer.get("model_tag"), pointer.get("previous")}
        models = sorted(_list(MODEL_NAME), key=lambda m: m.info.creation_time, reverse=True)
        deleted = []
        for model in models[keep:]:
            if str(model.tag) not in protected:
                bentoml.models.delete(model.tag)
                deleted.append(str(model.tag))
        # a bundle this rsllm cannot read (newer format) stops gc: its base might still be in use
        used = {bundle_config(m).base_tag for m in _list(MODEL_NAME)} | {pointer.get("base_tag")}
        for base in _list(BASE_NAME):
            if str(base.tag) not in used:
                bentoml.models.delete(base.tag)
                deleted.append(str(base.tag))
        return deleted


def _list(name: str) -> list:
    """Stored models of one name ([] when there are none; BentoML raises NotFound then)."""
    try:
        return bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []


def get_model(tag: str):
    """A stored model by tag; RegistryError naming the store when it is not there."""
    return _get(tag)


def _get(tag: str):
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise RegistryError(f"model {tag!r} is not in the BentoML store ({bentoml_home()})") from None


def bentoml_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


def _jsonable(obj):
    """JSON-safe metadata without None values (BentoML accepts only basic types)."""
    plain = json.loads(json.dumps(obj, default=str))

    def drop_none(x):
        if isinstance(x, dict):
            return {k: drop_none(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [drop_none(v) for v in x if v is not None]
        return x

    return drop_none(plain)


# ---------------------------------------------------------------- packaging the candidate


def candidate_parts(repo: Path) -> dict[str, Path]:
    """Everything the service needs, by its name inside the stored model."""
    o = outputs(repo)
    return {
        "onnx": o["onnx"],
        "llm": o["stage2"],
        "projected": o["projected"],
        "items.parquet": o["prepared"] / "items.parquet",  # item_idx <-> item_id of this model
        "catalogue.parquet": o["catalogue"],  # every titled item, cold ones included
        "sample_users.parquet": o["prepared"] / "test.parquet",
        "sasrec.json": o["sasrec"] / "config.json",
    }


def promote_candidate(repo: Path) -> dict:
    """Save base (once) + candidate into the BentoML store, then move the production pointer."""
    from components.config import load_settings
    from components.versioning import current_data_version, git_commit

    settings = load_settings(repo / "params.yaml")
    o = outputs(repo)
    gate = json.loads(o["gate"].read_text())
    if not gate["passed"]:
        raise RegistryError(f"{o['gate']}: the gate did not pass; refusing to promote")
    base_tag = save_base(o["base"])
    metadata = {
        "metrics": {k: v for k, v in gate["metrics"].items() if isinstance(v, int | float)},
        "data_version": current_data_version(repo),
        "git_commit": git_commit(repo),
        "base_tag": base_tag,
        "rerank_default": bool(gate.get("rerank", False)),
        "rerank_reason": gate.get("rerank_reason") or "",
        "profile": settings.profile,
        "params": settings.model_dump(mode="json", by_alias=True),
    }
    tag = save_candidate(candidate_parts(repo), metadata)
    return promote(tag, repo, reason="gate passed")
