"""The one exception type that means "the user asked for something we cannot do", and how to
quote any other exception in a one-line message."""

import re


class UserError(Exception):
    """A mistake in the user's input or environment.

    The command-line entry points print its message as a single line and exit non-zero, with
    no traceback: the message must say what was wrong and what to do instead.
    """


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name; never raises.

    Libraries raise exceptions with multi-line messages, empty messages, and (rarely) a
    ``__str__`` that fails itself: a one-line error report must survive all three."""
    try:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    except Exception:  # a broken __str__ must not turn a one-line report into a traceback
        lines = []
    return lines[0] if lines else type(error).__name__


class DataStreamError(UserError):
    """Reading the training data failed in the middle of a run (a dropped connection, a server
    error while streaming). The training loop checkpoints the last complete step before stopping."""

    def __init__(self, reason: str):
        super().__init__(f"reading the training data failed: {reason}")
        self.reason = reason


def cause_line(error: BaseException) -> str:
    """Like `first_line`, but for an error re-raised from a DataLoader worker, whose first line only
    says which worker: the exception line of the worker's traceback names the real error."""
    if "DataLoader worker" not in first_line(error):
        return first_line(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):  # the traceback's own line "package.module.SomeError: message"
        match = re.match(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)\w*: (.+)$", line)
        if match:
            return match.group(1)
    return lines[-1] if lines else type(error).__name__
