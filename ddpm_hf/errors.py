"""The one exception type that means "the user asked for something we cannot do", and how to
quote any other exception in a one-line message."""


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
