"""Run the ``fedcommons`` command in-process, as a shell would, and capture its output."""

from __future__ import annotations

import sys

import pytest


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``fedcommons ARGS``: return (exit code, stdout, stderr) of this call only."""
    from fedcommons.cli import main

    capsys.readouterr()  # drop what earlier steps of the test printed
    old = sys.argv
    sys.argv = ["fedcommons", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
