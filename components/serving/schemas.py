"""Request and response models of the service (pydantic): a bad request is a 400 naming the field.

Item ids are catalogue ids as JSON strings ("50", at most 128 characters); JSON integers (50, 0 to
2^63 - 1) are accepted and read as strings. Every model forbids unknown fields, so a misspelt field
("rerank_") is named too. Validation errors never echo the value sent.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

MAX_HISTORY = 200  # items per history (the models read the newest 10-50)
MAX_K = 100  # results per request
MAX_CANDIDATES = 50  # items the LLM ranks in one request
MAX_ID_CHARS = 128  # a string id
MAX_INT_ID = 2**63 - 1  # an integer id (19 digits)

ItemId = Annotated[
    Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]
    | Annotated[StrictInt, Field(ge=0, le=MAX_INT_ID)],
    AfterValidator(str),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Request):
    """A user's history (newest last) -> the top `k` items of the whole catalogue."""

    history: list[ItemId] = Field(
        min_length=1,
        max_length=MAX_HISTORY,
        description="item ids, oldest first, newest last",
        examples=[["50", "181", "100"]],
    )
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="number of items to return")
    rerank: StrictBool | None = Field(
        None,
        description="rerank the encoder's top candidates with the LLM; absent: the promoted model's default "
        "(on only where its rerank measured better than retrieval, GET /model: rerank_default)",
    )
    candidates: StrictInt = Field(
        20, ge=1, le=MAX_CANDIDATES, description="how many of the encoder's top items the LLM reranks (>= k)"
    )

    @model_validator(mode="after")
    def _k_within_candidates(self) -> RecommendRequest:
        if self.rerank is True and self.k > self.candidates:
            raise ValueError(
                f"k ({self.k}) must be <= candidates ({self.candidates}) when rerank is true: "
                "the LLM returns a ranking of the candidates"
            )
        return self


class ScoreRequest(_Request):
    """Explicit candidates ranked by the LLM after the user's history (the evaluation protocol)."""

    history: list[ItemId] = Field(min_length=1, max_length=MAX_HISTORY, examples=[["50", "181"]])
    candidates: list[ItemId] = Field(min_length=1, max_length=MAX_CANDIDATES, examples=[["1", "2", "3"]])


class ScoredItem(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="LLM: mean log-probability of the title; encoder: dot product")


class Timings(BaseModel):
    retrieval_ms: float = 0.0
    rerank_ms: float = 0.0
    total_ms: float = 0.0


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str = Field(description="the BentoML tag of the model that served this answer")
    data_version: str | None = None
    rerank: bool
    retrieval: str = Field(description="encoder | popularity (history of cold items only)")
    cold_items: list[str] = Field(
        description="history ids unknown to the ID encoder (rendered by title alone)"
    )
    timings: Timings


class ScoreResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str
    data_version: str | None = None
    cold_items: list[str]
    timings: Timings


class Item(BaseModel):
    item_id: str
    title: str
    year: int | None = None
    genres: str = ""
    known_to_encoder: bool


class SampleUser(BaseModel):
    user_idx: int
    history: list[Item]
    target: Item | None = None


class ErrorResponse(BaseModel):
    error: str
    field: str | None = None
    values: list[str] = []
