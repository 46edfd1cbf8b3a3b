"""``daybook serve`` and ``daybook tokens create|list|revoke``."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    pass
