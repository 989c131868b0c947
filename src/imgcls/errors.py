"""The one exception type that reaches the user as a one-line message, and the helpers that keep it one line."""

import unicodedata


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix.

    The CLI prints it as a single line (no traceback unless --debug) and exits with status 2.
    """


def first_line(error: BaseException, limit: int = 120) -> str:
    """An exception's message cut to one short line (its type when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def shown(text: str, limit: int = 160) -> str:
    """`text` (a path, mostly) as a message shows it: control, format (bidi) and non-UTF-8 characters escaped,
    so that a name cannot forge lines or colours in a terminal or a log; past `limit` characters, cut, with its
    length said."""
    safe = "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in text)
    return safe if len(safe) <= limit else f"{safe[:limit]}... ({len(text)} characters)"
