"""Token counts of LLM requests: fixed, or drawn per request (seeded) from a distribution.

Written in scenario files and flags as 16, "uniform:8,32" (low,high), "normal:128,16" (mean,stddev) or
an inline table such as {dist = "normal", mean = 128, stddev = 16}.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

__all__ = ["TokenCount", "TokenCountField", "parse_token_count"]


_TOKEN_COUNT_HINT = (
    'expected a token count such as 16, "uniform:8,32" (low,high) or "normal:128,16" (mean,stddev)'
)


class TokenCount(BaseModel):
    """A count of tokens per request: fixed, or drawn per request (seeded) from a distribution.

    uniform draws integers in [low, high]; normal draws round(N(mean, stddev)), at least 1.

    >>> str(TokenCount.model_validate(parse_token_count("uniform:8,32")))
    'uniform:8,32'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dist: Literal["fixed", "uniform", "normal"] = "fixed"
    value: int | None = Field(default=None, ge=1)
    low: int | None = Field(default=None, ge=1)
    high: int | None = Field(default=None, ge=1)
    mean: float | None = Field(default=None, ge=1)
    stddev: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _fields_of_dist(self) -> TokenCount:
        needs = {"fixed": ("value",), "uniform": ("low", "high"), "normal": ("mean", "stddev")}[self.dist]
        names = ("value", "low", "high", "mean", "stddev")
        given = {name for name in names if getattr(self, name) is not None}
        if given != set(needs):
            raise ValueError(f"a {self.dist} token count takes {' and '.join(needs)}; {_TOKEN_COUNT_HINT}")
        if self.dist == "uniform" and self.low > self.high:  # type: ignore[operator]
            raise ValueError(f"uniform token count needs low <= high, got {self.low} > {self.high}")
        return self

    def __str__(self) -> str:
        if self.dist == "fixed":
            return str(self.value)
        if self.dist == "uniform":
            return f"uniform:{self.low},{self.high}"
        return f"normal:{self.mean:g},{self.stddev:g}"


def parse_token_count(value: Any) -> Any:
    """16, "16", "uniform:8,32", "normal:128,16" -> TokenCount fields; a dict passes as it is."""
    if isinstance(value, (dict, TokenCount)):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return {"value": value}
    if isinstance(value, str):
        dist, sep, args = value.strip().partition(":")
        parts = [part.strip() for part in args.split(",")] if sep else []
        try:
            if not sep:
                return {"value": int(dist)}
            if dist == "uniform" and len(parts) == 2:
                return {"dist": "uniform", "low": int(parts[0]), "high": int(parts[1])}
            if dist == "normal" and len(parts) == 2:
                return {"dist": "normal", "mean": float(parts[0]), "stddev": float(parts[1])}
        except ValueError:
            pass
    raise ValueError(_TOKEN_COUNT_HINT)


TokenCountField = Annotated[TokenCount, BeforeValidator(parse_token_count)]
