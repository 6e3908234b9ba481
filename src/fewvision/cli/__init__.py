"""The ``fewvision`` command: one module per command group, registered here.

User errors (bad arguments, unreadable class files or datasets, missing weights) print one line and exit 2;
unexpected runtime errors print one line and exit 1 (``FEWVISION_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import os
import sys

import typer

from .. import __version__
from . import anomaly, classify, fewshot, models
from .common import _quiet_libraries, _user_error_types, info

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Zero-shot and few-shot image classification and anomaly detection for visual inspection.")

for _group in (classify, fewshot, models, anomaly):
    _group.register(app)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        info("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        info("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        import click

        if os.environ.get("FEWVISION_DEBUG"):
            raise
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        one_line = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, _user_error_types()):
            info(f"error: {one_line}")
            sys.exit(2)
        info(f"error: {type(exc).__name__}: {one_line}")
        sys.exit(1)


if __name__ == "__main__":
    main()
