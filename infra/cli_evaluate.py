"""``backbeat`` sub-commands for evaluate (registered by :mod:`infra.cli`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``backbeat`` app."""
