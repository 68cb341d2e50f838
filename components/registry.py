"""Model registry: the BentoML model store plus a production pointer file.

- `rsllm`       one BentoML model per promoted candidate, holding everything the service needs
                (ONNX encoder, projected item embeddings, adapters, projector, catalogue, id mapping)
                and its metadata (metrics, data version, git commit, params).
- `rsllm-base`  the base LLM weights, saved once per distinct content and referenced by tag.
- production    `models/registry/production.json`, written by atomic rename: the tag the service
                loads at startup. The store has no production marker of its own.

Promotion is atomic: the model is saved into the store first (BentoML writes it in a temp folder
and moves it in), then the pointer is replaced in one rename. A crash at any point leaves either
the old or the new production, never a mix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import bentoml

from components.errors import RegistryError
from components.io import write_json_atomic

MODEL_NAME = "rsllm"
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


def save_candidate(parts: dict[str, Path], metadata: dict, labels: dict | None = None) -> str:
    """Save a candidate model: each entry of `parts` (name -> file or folder) is copied in under its
    name. Nothing reaches the store unless every copy succeeded."""
    missing = [f"{name} ({path})" for name, path in parts.items() if not Path(path).exists()]
    if missing:
        raise RegistryError(f"cannot package the model, missing: {', '.join(missing)}")
    with bentoml.models.create(MODEL_NAME, labels=labels or {}, metadata=_jsonable(metadata)) as model:
        for name, path in parts.items():
            target = Path(model.path) / name
            if Path(path).is_dir():
                shutil.copytree(path, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return str(model.tag)


def read_production(repo: Path = Path(".")) -> dict | None:
    """The production pointer, or None when nothing was promoted yet."""
    path = Path(repo) / POINTER
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON ({e}); restore it with `rsllm rollback`") from None


def promote(tag: str, repo: Path = Path("."), **info) -> dict:
    """Point production at `tag` (already in the store) by atomic rename; append to the history."""
    model = _get(tag)
    previous = read_production(repo)
    pointer = {
        "model_tag": str(model.tag),
        "base_tag": model.info.metadata.get("base_tag"),
        "data_version": model.info.metadata.get("data_version"),
        "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "previous": previous["model_tag"] if previous else None,
    } | info
    write_json_atomic(Path(repo) / POINTER, pointer)
    with open(Path(repo) / HISTORY, "a") as fh:
        fh.write(json.dumps(pointer, sort_keys=True) + "\n")
    return pointer


def rollback(repo: Path = Path("."), to: str | None = None) -> dict:
    """Point production back at the previous promoted model (or at `to`)."""
    current = read_production(repo)
    if to is None:
        if not current or not current.get("previous"):
            raise RegistryError("nothing to roll back to: production has no previous model")
        to = current["previous"]
    pointer = promote(to, repo, reason=f"rollback from {current['model_tag'] if current else None}")
    return pointer


def list_models(repo: Path = Path(".")) -> list[dict]:
    """Every stored `rsllm` model, newest first, with its metrics and whether it is production."""
    production = (read_production(repo) or {}).get("model_tag")
    rows = []
    for model in sorted(_list(MODEL_NAME), key=lambda m: m.info.creation_time, reverse=True):
        meta = model.info.metadata
        rows.append(
            {
                "tag": str(model.tag),
                "created": model.info.creation_time.isoformat(timespec="seconds"),
                "production": str(model.tag) == production,
                "data_version": meta.get("data_version"),
                "metrics": meta.get("metrics", {}),
                "git_commit": meta.get("git_commit"),
            }
        )
    return rows


def gc(repo: Path = Path("."), keep: int = 3) -> list[str]:
    """Delete all but the newest `keep` models, never production or its previous; then unused bases."""
    pointer = read_production(repo) or {}
    protected = {pointer.get("model_tag"), pointer.get("previous")}
    models = sorted(_list(MODEL_NAME), key=lambda m: m.info.creation_time, reverse=True)
    deleted = []
    for model in models[keep:]:
        if str(model.tag) not in protected:
            bentoml.models.delete(model.tag)
            deleted.append(str(model.tag))
    used = {m.info.metadata.get("base_tag") for m in _list(MODEL_NAME)} | {pointer.get("base_tag")}
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
