"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix.

    The CLI prints it as a single line (no traceback unless --debug) and exits with status 2.
    """


def first_line(error: BaseException, limit: int = 120) -> str:
    """An exception's message cut to one short line (its type when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
