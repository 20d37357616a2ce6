"""The plan catalog: which resource plans can be bought (spec, units, validity, price).

The built-in catalog prices every plan below pay-as-you-go (R10: USD 700-1,000 per million).
``--catalog PATH`` replaces it with a TOML file of the same shape:

    [[spec]]
    spec_id = "month-100k"
    units = 100000
    validity = "one_month"      # or "one_year"
    price_micros = 60000000
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import InvalidArgument
from .model import PlanSpec, Validity

BUILTIN_CATALOG: tuple[PlanSpec, ...] = (
    PlanSpec("month-100k", 100_000, Validity.ONE_MONTH, 60_000_000),
    PlanSpec("month-1m", 1_000_000, Validity.ONE_MONTH, 550_000_000),
    PlanSpec("year-1m", 1_000_000, Validity.ONE_YEAR, 500_000_000),
    PlanSpec("year-10m", 10_000_000, Validity.ONE_YEAR, 4_500_000_000),
    PlanSpec("year-100m", 100_000_000, Validity.ONE_YEAR, 40_000_000_000),
)


def builtin() -> dict[str, PlanSpec]:
    return {s.spec_id: s for s in BUILTIN_CATALOG}


def load(path: str | Path | None) -> dict[str, PlanSpec]:
    if path is None:
        return builtin()
    with open(path, "rb") as f:
        data = tomllib.load(f)
    specs: dict[str, PlanSpec] = {}
    for i, raw in enumerate(data.get("spec", [])):
        try:
            validity = {"one_month": Validity.ONE_MONTH, "one_year": Validity.ONE_YEAR}[
                raw["validity"]]
            spec = PlanSpec(str(raw["spec_id"]), int(raw["units"]), validity,
                            int(raw["price_micros"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"{path}: spec #{i + 1} is malformed ({exc!r})") from exc
        if spec.units <= 0 or spec.price_micros < 0 or spec.spec_id in specs:
            raise InvalidArgument(f"{path}: spec {spec.spec_id!r} is invalid or repeated")
        specs[spec.spec_id] = spec
    if not specs:
        raise InvalidArgument(f"{path}: the catalog defines no [[spec]]")
    return specs
