"""The ``fewvision`` command: one module per command group, registered here.

Exit codes (also in every ``--help``): 0 done; 1 something flagged or sent to review (only with ``--exit-code``);
2 usage or input error - every bad option, unreadable classes file or dataset, missing weights, a library of an extra
that is not installed (naming the extra) - printed as one line;
3 nothing could be scored; 70 an unexpected internal error (``FEWVISION_DEBUG=1`` shows the traceback); 130
interrupted.
"""

from __future__ import annotations

import os
import sys

import typer

from .. import __version__
from . import anomaly, batch, classify, deploy, fewshot, models, monitor, service, station
from .common import (
    CONTEXT,
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_SCORED,
    EXIT_USAGE,
    NothingScored,
    click_exception_type,
    info,
    missing_extra,
    quiet_libraries,
    user_error_types,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                  help="Zero-shot and few-shot image classification and anomaly detection for visual inspection.")

for _group in (classify, fewshot, models, anomaly, service, deploy, batch, station, monitor):
    _group.register(app)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _usage_error(exc) -> None:
    """Click's own usage errors as one line (the help itself when nothing was asked), exit 2."""
    name = type(exc).__name__
    if name == "NoArgsIsHelpError":
        typer.echo(exc.ctx.get_help() if getattr(exc, "ctx", None) else str(exc))
        sys.exit(EXIT_USAGE)
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
    info(f"error: {message}{hint}")
    sys.exit(EXIT_USAGE)


def main() -> None:
    quiet_libraries()
    try:
        result = app(prog_name="fewvision", standalone_mode=False)
        if isinstance(result, int) and result:  # click returns the code of a typer.Exit raised in a command
            sys.exit(result)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        info("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        info("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except NothingScored as exc:
        info(f"error: {exc}")
        sys.exit(EXIT_NOTHING_SCORED)
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        if os.environ.get("FEWVISION_DEBUG"):
            raise
        if isinstance(exc, click_exception_type()):
            _usage_error(exc)
        if isinstance(exc, ModuleNotFoundError) and missing_extra(exc):
            info(f"error: {missing_extra(exc)}")
            sys.exit(EXIT_USAGE)
        one_line = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, user_error_types()):
            info(f"error: {one_line}")
            sys.exit(EXIT_USAGE)
        info(f"error: {type(exc).__name__}: {one_line}")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
