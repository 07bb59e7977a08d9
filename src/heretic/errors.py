"""The one exception type users see: a single sentence that says what is wrong and how to fix it."""


class HereticError(Exception):
    """An error caused by the user's input or environment.

    The command line prints its message as one line (no traceback) and exits with status 2.
    Messages are full sentences that name the offending thing and say how to fix it.
    """


def first_line(error: BaseException, limit: int = 240, secret: str | None = None) -> str:
    """The first line of an error's message (or its type's name when it has none), cut to `limit` characters.

    `secret` (e.g. a token) is shown as *** wherever it appears."""
    text = str(error)
    if secret:
        text = text.replace(secret, "***")
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
