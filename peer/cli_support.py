"""What both CLIs share: the entry-point wrapper that turns UserError into one clear line."""

from __future__ import annotations

import sys

import typer

from peer.errors import UserError


def run_app(app: typer.Typer) -> None:
    """Run a typer app; a UserError prints 'error: ...' on stderr and exits 2, without a traceback."""
    try:
        app()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
