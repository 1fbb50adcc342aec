"""weightd for Python: attach to models the weightd daemon keeps resident, zero-copy.

    import torch, weightd

    client = weightd.connect()                      # $WEIGHTD_SOCKET or /run/weightd/weightd.sock
    with client.acquire("llama-8b", device="cuda:0") as lease:
        weights = lease.tensors                      # dict[str, torch.Tensor], the daemon's GPU copy
        weightd.bind(model, lease)                   # into a torch.nn.Module, no copy

    model = weightd.transformers.from_pretrained("llama-8b", AutoModelForCausalLM, device="cuda:0")

The tensors are the daemon's shared copy: every process that acquires the model maps the same
memory, no file is read and no byte is copied. They are **read-only**; ask for
``acquire(..., writable=True)`` for a private copy. Errors are :class:`weightd.Error` subclasses
carrying the daemon's code and reason. See the README's "Python" section.
"""

import os as _os

from .errors import (BindError, DataLoss, DeadlineExceeded, Error, FailedPrecondition, Internal,
                     InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable)
from . import _weightd
from ._bind import BindReport, bind
from ._client import Client, Lease, connect

__version__ = "0.1.0"
DEFAULT_SOCKET = _weightd.DEFAULT_SOCKET

__all__ = [
    "connect", "Client", "Lease", "bind", "BindReport", "DEFAULT_SOCKET",
    "Error", "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted",
    "FailedPrecondition", "Unavailable", "DataLoss", "Internal", "DeadlineExceeded", "BindError",
]

# A write to a read-only shared tensor kills the process with SIGSEGV; say which tensor first.
# WEIGHTD_EXPLAIN_WRITE_FAULTS=0 leaves the process's signal handlers alone.
if _os.environ.get("WEIGHTD_EXPLAIN_WRITE_FAULTS", "1") != "0":
    _weightd.explain_write_faults()


def __getattr__(name):
    # weightd.transformers imports transformers only when used.
    if name == "transformers":
        import importlib
        return importlib.import_module(".transformers", __name__)
    raise AttributeError(f"module 'weightd' has no attribute {name!r}")
