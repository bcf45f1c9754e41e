"""What both CLIs share: house conventions for typer apps, and the wrapper that turns UserError into one line.

No `from __future__ import annotations` here: typer evaluates the option annotations, which refer
to a closure.
"""

import sys
from typing import Annotated

import typer

from peer import __version__
from peer.errors import UserError


def new_app(program: str, help: str) -> typer.Typer:
    """A typer app with the house conventions: -h/--help, -V/--version, help when called bare."""
    app = typer.Typer(
        help=help,
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
    )

    def show_version(value: bool):
        if value:
            print(f"potluck {program} {__version__}")
            raise typer.Exit()

    @app.callback()
    def _options(
        version: Annotated[
            bool, typer.Option("--version", "-V", callback=show_version, is_eager=True, help="Show the version.")
        ] = False,
    ):
        pass

    return app


def run_app(app: typer.Typer) -> None:
    """Run a typer app; a UserError prints 'error: ...' on stderr and exits 2, without a traceback."""
    try:
        app()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
