"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in the user's input or environment.

    The command-line entry points print its message as a single line and exit non-zero, with
    no traceback: the message must say what was wrong and what to do instead.
    """
