"""prometheus_client's internals that daybook relies on (written against 0.2x).

``daybook.infrastructure.observability.metrics.observe_many`` observes a whole batch of
amounts in a histogram at the cost of one lock per bucket touched rather than two per
amount (convergence is observed for every event of every batch). It reaches into a
histogram child's bucket bounds, per-bucket counters and sum, which ``observe`` itself uses;
tests hold the result equal to ``observe``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client.values import ValueClass

from daybook.infrastructure.compat import Internal


def histogram_parts(histogram: Any) -> tuple[Sequence[float], Sequence[Any], Any] | None:
    """A histogram child's (upper bounds, bucket values, sum value), or None if it no longer
    keeps them so (then observe one by one)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        return None
    return bounds, buckets, total


#: Every prometheus_client name daybook uses beyond its documented interface.
RELIED_ON: tuple[Internal, ...] = (
    Internal(
        "prometheus-client",
        "prometheus_client.metrics:Histogram",
        "_upper_bounds",
        histogram_parts,
        "a histogram's bucket bounds, in order",
        on_instance=True,
        types=(list,),
    ),
    Internal(
        "prometheus-client",
        "prometheus_client.metrics:Histogram",
        "_buckets",
        histogram_parts,
        "a histogram's per-bucket (non-cumulative) values",
        on_instance=True,
        types=(list,),
    ),
    Internal(
        "prometheus-client",
        "prometheus_client.metrics:Histogram",
        "_sum",
        histogram_parts,
        "a histogram's sum value",
        on_instance=True,
        types=(ValueClass,),
    ),
)
