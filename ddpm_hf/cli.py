"""What every command-line entry point shares: user mistakes become one line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import UserError

USER_ERROR_EXIT = 2


def run_command(command: Callable[[], object]) -> int:
    """Run ``command``; a `UserError` is printed as ``error: <message>`` on stderr, without a traceback."""
    try:
        command()
    except UserError as e:
        interrupted = hasattr(e, "exit_status")  # a run stopped by a signal: a report, not an error
        print(f"{'' if interrupted else 'error: '}{e}", file=sys.stderr, flush=True)
        return e.exit_status if interrupted else USER_ERROR_EXIT
    return 0


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints usage plus an error and exits 2; we want one line without the usage block."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")
