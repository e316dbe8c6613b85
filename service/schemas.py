"""Request and response bodies of the HTTP API (DESIGN section 5).

Ids are 1..256 printable ASCII characters without spaces (``[!-~]``); the configured
limits (``api.max_candidates``, ``api.max_id_length``, default 1000 and 128) are
checked by the pipeline, also with 422. Duplicate candidates: the first occurrence of
an id is ranked, later ones are dropped and counted in ``duplicates_removed`` (so the
answer does not depend on how often the matching stage repeated an id).

Missing items (no record in the store, or a record refused as corrupt) are never scored
as if known: they are listed in ``missing_items`` and ranked after every scored item, in
the order they were sent, with ``score`` null.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
)

ID_PATTERN = r"^[!-~]+$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=ID_PATTERN)]
# strict: a string too long for the str branch must not be coerced to an int instead
ContextValue = Annotated[str, StringConstraints(max_length=256)] | StrictInt | StrictBool


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id = Field(description="the user to rank for")
    candidates: list[Id] = Field(
        min_length=1, max_length=100_000, description="item ids from the matching stage"
    )
    context: dict[Annotated[str, StringConstraints(max_length=64)], ContextValue] = Field(
        default_factory=dict,
        max_length=32,
        description="context fields of this request (e.g. slot, device); each must be a user "
        "field of the model and replaces the stored value for this request",
    )
    top_k: int | None = Field(default=None, ge=1, description="return only the first top_k items")
    request_id: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        default=None, description="echoed back"
    )


def parse_rank_request(raw: bytes) -> RankRequest:
    """The validated body of ``POST /v1/rank``, parsed from the raw bytes in one pass
    (pydantic-core reads the JSON and validates it together: no intermediate Python
    objects). Anything invalid, malformed JSON included, raises FastAPI's
    ``RequestValidationError`` with ``body``-prefixed locations, as FastAPI's own body
    parsing would, so the one 422 handler answers it."""
    try:
        return RankRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = [
            {**e, "loc": ("body", *e.get("loc", ()))}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise RequestValidationError(errors) from None


class RankedItem(BaseModel):
    item_id: str
    score: float | None = Field(description="predicted conversion probability; null if missing")
    rank: int = Field(description="1-based position")


class ModelRef(BaseModel):
    name: str
    version: str


class Degraded(BaseModel):
    reason: str


class Timings(BaseModel):
    parse: float
    features: float
    queue: float
    inference: float
    sort: float
    total: float


class RankResponse(BaseModel):
    request_id: str | None
    items: list[RankedItem]
    model: ModelRef
    embedding_version: str | None
    missing_items: list[str]
    duplicates_removed: int
    user_known: bool
    degraded: bool
    degraded_reason: str | None
    timings_ms: Timings


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str = Field(min_length=1, max_length=4096, description="model repository path")
    require_compatible: bool = Field(
        default=True,
        description="refuse the swap unless the store's active embedding version was built "
        "by the new model's item tower (false: swap anyway; the service is not ready until "
        "a matching version is loaded)",
    )
