"""The one exception type users see: a single sentence that says what is wrong and how to fix it."""


class HereticError(Exception):
    """An error caused by the user's input or environment.

    The command line prints its message as one line (no traceback) and exits with status 2.
    Messages are full sentences that name the offending thing and say how to fix it.
    """
