"""The errors dirtydiff reports to users and to control clients.

Every error carries a stable ``code`` (what scripts match on) and a message
for people. They fail one request; the process and its other clients go on.
"""

from __future__ import annotations


class DirtydiffError(Exception):
    """Base class: a request failed for a reason worth one clear line."""

    code = "error"

    def __init__(self, code_or_message: str, message: str | None = None) -> None:
        if message is None:
            message, code = code_or_message, type(self).code
        else:
            code = code_or_message
        super().__init__(message)
        self.code = code
        self.message = message


class BadRequest(DirtydiffError):
    """The request itself is wrong (bad name, bad granularity, ...)."""

    code = "bad-request"


class NotFound(DirtydiffError):
    """A named thing (bitmap, state directory) does not exist."""

    code = "not-found"


class Conflict(DirtydiffError):
    """The request clashes with the current state (name in use, busy)."""

    code = "conflict"


class Corrupt(DirtydiffError):
    """A file in the state directory cannot be trusted."""

    code = "corrupt"


class StorageError(DirtydiffError):
    """The state directory's filesystem failed us (full, read-only, I/O error)."""

    code = "storage"


class Unavailable(DirtydiffError):
    """A process the request needs is not reachable or timed out."""

    code = "unavailable"


class PermissionDenied(DirtydiffError):
    """The caller may not use a socket or file it needs."""

    code = "permission-denied"


class ProtocolError(DirtydiffError):
    """A peer broke the control protocol; the connection ends."""

    code = "protocol"


ERROR_CLASSES: dict[str, type[DirtydiffError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        Conflict,
        Corrupt,
        StorageError,
        Unavailable,
        PermissionDenied,
        ProtocolError,
    )
}
