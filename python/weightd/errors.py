"""The errors weightd raises.

Every error the daemon or the client library reports arrives as a subclass of
:class:`weightd.Error`, one class per code of weightd's error vocabulary. Each carries
``code`` (the class's code name), ``message`` (for humans; may change between releases) and
``reason`` (a stable, machine-readable tag such as ``"catalog.unknown_model"``): branch on the
class and the reason, never on the message.

``InvalidArgument`` is also a :class:`ValueError` and ``NotFound`` a :class:`LookupError`, so
that code written against the built-in exceptions keeps working.
"""

__all__ = [
    "Error", "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted",
    "FailedPrecondition", "Unavailable", "DataLoss", "Internal", "DeadlineExceeded", "BindError",
]


class Error(Exception):
    """Base class of every weightd error."""

    code = "Unknown"

    def __init__(self, message, reason=""):
        super().__init__(message, reason)
        self.message = message
        self.reason = reason

    def __str__(self):
        return f"{self.code}: {self.message}" + (f" [{self.reason}]" if self.reason else "")


class InvalidArgument(Error, ValueError):
    """The request was malformed or impossible (an unknown device, a tensor filter naming nothing)."""
    code = "InvalidArgument"


class NotFound(Error, LookupError):
    """No such model, tensor, file or segment."""
    code = "NotFound"


class PermissionDenied(Error):
    """This process's user may not do this (the model's ACL, an admin-only call, the socket)."""
    code = "PermissionDenied"


class ResourceExhausted(Error):
    """A budget, cap or limit is reached (memory budgets, leases per client, connections per user)."""
    code = "ResourceExhausted"


class FailedPrecondition(Error):
    """The request is valid but the state forbids it (evicting a leased model, a released lease)."""
    code = "FailedPrecondition"


class Unavailable(Error):
    """The daemon is not there, went away, is shutting down, or has no usable GPU."""
    code = "Unavailable"


class DataLoss(Error):
    """A file or segment is corrupt or changed under the daemon."""
    code = "DataLoss"


class Internal(Error):
    """A bug or an unexpected system failure."""
    code = "Internal"


class DeadlineExceeded(Error):
    """A timeout elapsed before the daemon answered."""
    code = "DeadlineExceeded"


class BindError(InvalidArgument):
    """:func:`weightd.bind` could not bind a module: lists every problem at once.

    Attributes ``missing`` (in the module, not among the tensors), ``unexpected`` (among the
    tensors, not in the module) and ``mismatched`` (``"name: shape [..] dtype vs expected .."``).
    """

    def __init__(self, message, reason="python.bind_mismatch", missing=(), unexpected=(), mismatched=()):
        super().__init__(message, reason)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
