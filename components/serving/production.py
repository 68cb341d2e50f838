"""Which stored model the service loads: read once, when the service module is imported.

Order: $RSLLM_MODEL_TAG (and $RSLLM_BASE_TAG, else the model's config `base_tag`) -> the production pointer
$RSLLM_REPO/models/registry/production.json (RSLLM_REPO defaults to the working directory) -> inside a
built bento ($BENTO_PATH set) with neither, the one `rsllm` model packed into it. A promotion therefore
takes effect when the service restarts; a running service never changes model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from components.errors import RegistryError


@dataclass(frozen=True)
class Production:
    model_tag: str
    base_tag: str
    source: str  # where the tags came from (env, the pointer's repo-relative path, bento); no absolute path


def pointer_path() -> Path:
    from components.registry import POINTER

    return Path(os.environ.get("RSLLM_REPO", ".")) / POINTER


def resolve() -> Production:
    """The tags to serve; RegistryError naming what to set when there is nothing to serve."""
    import bentoml

    from components import registry

    tag = os.environ.get("RSLLM_MODEL_TAG")
    source = "env RSLLM_MODEL_TAG"
    if not tag:
        path = pointer_path()
        pointer = registry.read_production(path.parents[2])
        if pointer is not None:
            # repo-relative: GET /model shows `source`, and must not reveal the server's folders
            tag, source = pointer["model_tag"], f"pointer {path.relative_to(path.parents[2])}"
        elif os.environ.get("BENTO_PATH"):
            packed = registry._list(registry.MODEL_NAME)
            if len(packed) == 1:
                tag, source = str(packed[0].tag), "the model packed in the bento"
        if not tag:
            raise RegistryError(
                f"{path}: no production model (promote one with `rsllm promote`, or set RSLLM_MODEL_TAG, "
                "or RSLLM_REPO to the folder holding models/registry/production.json)"
            )
    model = registry.get_model(tag)
    config = registry.bundle_config(model)  # ModelError, before anything loads, for a newer or invalid bundle
    base = os.environ.get("RSLLM_BASE_TAG") or config.base_tag
    if not base:
        raise RegistryError(f"model {tag}: its config has no base_tag; set RSLLM_BASE_TAG")
    registry.get_model(base)  # fail now, naming the store, when the base is missing
    return Production(str(model.tag), str(bentoml.models.get(base).tag), source)
