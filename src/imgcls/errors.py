"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix.

    The CLI prints it as a single line (no traceback unless --debug) and exits with status 2.
    """
