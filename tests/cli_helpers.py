"""Run the `fewvision` entry point in-process, as a user's shell would."""

import sys

from fewvision.cli import main


def run_cli(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``fewvision ARGS...``."""
    monkeypatch.setattr(sys, "argv", ["fewvision", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
