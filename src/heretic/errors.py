"""The one exception type users see: a single sentence that says what is wrong and how to fix it."""

import errno
import os
import re


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


def os_errno(error: BaseException) -> int | None:
    """The operating-system error number behind `error`: an OSError's, or the one that libraries
    written in Rust or C++ (safetensors, tokenizers) put in their message as "os error N"."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    match = re.search(r"os error (\d+)", str(error))
    return int(match.group(1)) if match else None


def write_failure(error: BaseException, target: object, what: str, option: str) -> HereticError | None:
    """One sentence for a write of `what` to `target` that failed for an operating-system reason
    (full disk, read-only place, no permission), or None when `error` is not such a failure.

    Callers write atomically, so the sentence can say that nothing was written."""
    code = os_errno(error)
    if code is None:
        return None
    reason = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return HereticError(
            f"There is not enough disk space to write {what} {target} ({reason}); nothing was written: free some "
            f"space, or choose a folder on another disk with {option}."
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return HereticError(
            f"Cannot write {what} {target} ({reason}); nothing was written: choose a folder you can write to with {option}."
        )
    return HereticError(
        f"Writing {what} {target} failed ({reason}); nothing was written: check the folder, or choose another with {option}."
    )
