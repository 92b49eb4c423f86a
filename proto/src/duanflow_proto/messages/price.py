"""Live GPU prices."""

from __future__ import annotations

import msgspec


class PriceUpdate(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.price.update", tag_field="type"):
    """A new $/GPU-hour for one pool."""

    pool: str
    """Pool name (``<region>-<gpu_type>`` or an agent id)."""
    price_per_gpu_hour: float
    """Dollars per GPU-hour."""
    gpu_type: str = ""
    """GPU type the price applies to (empty: every type in the pool)."""
    region: str = ""
    """Region of the pool."""
    ts_ms: int = 0
    """When the price was set."""


class PriceList(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.price.list", tag_field="type"):
    """Router → anyone: the live price overrides (answer to ``API_PRICE_SET`` and ``API_PRICE_LIST``)."""

    prices: list[PriceUpdate] = []
    """Every override, ordered by pool then GPU type."""
