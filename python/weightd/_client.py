"""Client and Lease: the Python face of libweightd."""

import os

from . import _tensors, errors
from ._weightd import DEFAULT_SOCKET, _Client

__all__ = ["connect", "Client", "Lease"]


def _endpoint(socket):
    if socket is None:
        return ""  # libweightd: $WEIGHTD_SOCKET, else the default
    socket = os.fspath(socket)
    if socket.startswith("/"):
        return "ipc://" + socket
    return socket


def _device_string(device):
    """'cpu', 'cuda', 'cuda:N', 'GPU-<uuid>', an int N or a torch.device -> the client's spelling."""
    if isinstance(device, bool):
        raise errors.InvalidArgument(f"unknown device {device!r} (use 'cpu', 'cuda:N' or 'GPU-<uuid>')",
                                     "client.bad_device")
    if isinstance(device, int):
        return f"cuda:{device}"
    if device is None:
        return "cpu"
    if not isinstance(device, str):
        device = str(device)  # torch.device("cuda", 1) -> "cuda:1"
    return device


def connect(socket=None, timeout=5.0, request_timeout=600.0, name=None, prepare_cuda_device=None):
    """Connects to the weightd daemon and returns a :class:`Client`.

    socket: the daemon's control socket, as a path (``/run/weightd/weightd.sock``) or a ZeroMQ
        endpoint (``ipc:///run/weightd/weightd.sock``). Default: ``$WEIGHTD_SOCKET``, else
        ``ipc:///run/weightd/weightd.sock``.
    timeout: seconds to wait for the handshake, and for a daemon that went away to come back
        before a call fails with :class:`weightd.Unavailable`.
    request_timeout: seconds one request may take, a load from disk included
        (:class:`weightd.DeadlineExceeded` after that).
    name: shown in the daemon's log (default ``python:<pid>``).
    prepare_cuda_device: a CUDA device index to start creating this process's context for while
        the handshake runs (saves its time on the first GPU acquire).

    Raises Unavailable (no daemon answered), PermissionDenied (this user may not use the
    socket, or the daemon refused it), InvalidArgument (a malformed endpoint or timeout).
    The GIL is released while waiting.
    """
    core = _Client(_endpoint(socket), float(timeout), float(request_timeout),
                   name if name is not None else f"python:{os.getpid()}",
                   -1 if prepare_cuda_device is None else int(prepare_cuda_device))
    return Client(core)


class Client:
    """A connection to the weightd daemon (see :func:`connect`).

    Thread-safe: calls from several threads are serialized on one connection. Leases outlive
    the Client: :meth:`close` (or leaving a ``with`` block) ends this handle, and the connection
    itself goes when the last lease does. After ``os.fork()`` the child inherits the tensors
    (still readable) but not the connection: calls there raise FailedPrecondition
    ``client.forked``; connect again in the child.
    """

    def __init__(self, core):
        self._core = core

    def acquire(self, name, device="cpu", tensors=None, writable=False):
        """Leases model `name` and maps it: returns a :class:`Lease` (a context manager).

        The daemon loads the model first if it is not resident (concurrent callers share one
        load), and for a GPU makes it resident on that GPU from its host copy.

        device: ``"cpu"`` maps the host copy (shared memory); ``"cuda"``/``"cuda:N"`` (this
            process's numbering, as torch uses it), an int N, a ``torch.device`` or
            ``"GPU-<uuid>"`` imports the daemon's copy on that GPU.
        tensors: names to map (default: all of the model's tensors).
        writable: False (default): the tensors are the daemon's shared copy, **read-only**:
            an in-place write to a CPU tensor ends the process with SIGSEGV (after a line on
            stderr naming the tensor), on a GPU it is a CUDA error that poisons the process's
            context. True: a private copy this process may modify in place, which no other
            process sees: on the CPU a copy-on-write mapping of the same shared memory (only
            the pages written become private), on a GPU a device-to-device copy (one copy of
            the model's bytes).

        Raises NotFound (no such model), PermissionDenied (not allowed to this user),
        InvalidArgument (unknown device, a tensor filter naming no tensor of the model),
        ResourceExhausted (the model does not fit its budgets), DataLoss (its files are
        corrupt), Unavailable (no daemon, or no usable GPU). The GIL is released while waiting.
        """
        device = _device_string(device)
        names = [] if tensors is None else [tensors] if isinstance(tensors, str) else list(tensors)
        if tensors is not None and not names:
            raise errors.InvalidArgument("an empty tensor filter names nothing", "python.empty_filter")
        if writable and device != "cpu":
            lease = Lease(self._core.acquire(name, device, names, False))
            lease._make_private_gpu_copy()
            return lease
        return Lease(self._core.acquire(name, device, names, bool(writable)))

    def list(self):
        """The models of the catalog that this user may see: a list of dicts (name, dir, state,
        bytes, resident_bytes, leases, gpus, ...; as ``weightctl list --json``)."""
        return self._core.list()

    def status(self, name):
        """One model's status dict (see :meth:`list`). NotFound if it is not in the catalog."""
        return self._core.status(name)

    def load(self, name):
        """Admin: loads `name` into the host tier without leasing it; returns its status once
        resident. PermissionDenied unless this user is an admin."""
        return self._core.load(name)

    def evict(self, name, device=None):
        """Admin: drops `name` from every tier (device None), the host tier (``"cpu"``) or one GPU
        (``"cuda:N"`` in the daemon's numbering). FailedPrecondition while leases on it exist."""
        self._core.evict(name, "" if device is None else _device_string(device))

    def stats(self):
        """Admin: the daemon's counters, models, GPUs and Prometheus metrics, as a dict."""
        return self._core.stats()

    @property
    def reconnects(self):
        """How many times this client opened a new session after the daemon restarted."""
        return self._core.reconnects

    def close(self):
        """Ends this handle (leases keep the connection until they go). Idempotent."""
        self._core.close()

    @property
    def closed(self):
        return self._core.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<weightd.Client {'closed' if self.closed else 'connected'}>"


class Lease:
    """A model leased from the daemon, mapped into this process.

    ``lease.tensors`` is a ``dict[str, torch.Tensor]`` in the checkpoint's dtypes and shapes,
    zero-copy: each tensor's memory is the daemon's shared mapping (or its GPU copy), so any
    number of processes share one copy. Each tensor also speaks DLPack (``__dlpack__``), so
    ``numpy.from_dlpack``, CuPy and JAX take it without a copy; :meth:`numpy` gives read-only
    numpy arrays of a host lease directly.

    Read-only unless acquired with ``writable=True``; see :meth:`Client.acquire`.

    Lifetimes: every tensor (and every DLPack consumer's array) keeps the mapping alive.
    :meth:`release` or leaving the ``with`` block drops this handle: tensors already taken stay
    valid, and the daemon's lease ends when the last of them is freed. Any use of the Lease
    object after that raises FailedPrecondition ``python.released``.
    """

    def __init__(self, core):
        self._core = core
        self._info = core.tensor_info()
        self._tensors = None
        self._private = False
        self.model = core.model
        """The model's name."""
        self.device = core.device
        """``"cpu"`` or ``"cuda:N"`` (this process's numbering)."""
        self.id = core.id
        """The daemon's lease id (changes if the client reattaches after a daemon restart)."""
        self.model_dir = core.model_dir
        """The daemon's directory of the model (its config.json lives there)."""
        self.gpu_uuid = core.gpu_uuid
        self.writable = core.writable
        self.nbytes = core.total_bytes
        """Bytes of all the lease's tensors."""
        self.attach_seconds = core.attach_seconds
        """Time from the Acquire request to mapped tensors, as libweightd measured it."""

    def _live_core(self):
        if self._core is None or not self._core.valid:
            raise errors.FailedPrecondition(f"the lease of model '{self.model}' was released; acquire it again",
                                            "python.released")
        return self._core

    def _make_private_gpu_copy(self):
        import torch
        shared = _tensors.torch_tensors(self._core, self.model, self._info)
        with torch.no_grad():
            self._tensors = {k: v.clone() for k, v in shared.items()}
        del shared
        self._private = True
        self.writable = True
        self._core.release()  # the copy needs no lease

    @property
    def names(self):
        """The tensor names, in the checkpoint's order."""
        return [i[0] for i in self._info]

    @property
    def tensors(self):
        """``dict[str, torch.Tensor]``: the lease's tensors (built on first use, then cached).

        InvalidArgument ``python.unsupported_dtype`` names any tensor whose dtype the installed
        torch lacks (leave it out with ``acquire(..., tensors=[...])``)."""
        if self._tensors is None:
            self._tensors = _tensors.torch_tensors(self._live_core(), self.model, self._info)
        elif not self._private:
            self._live_core()
        return self._tensors

    def numpy(self, as_bytes=False):
        """``dict[str, numpy.ndarray]``: zero-copy arrays over a host (``"cpu"``) lease, read-only
        unless the lease is writable. Dtypes numpy lacks (bf16, fp8) need the ml_dtypes package;
        ``as_bytes=True`` gives every tensor as a flat uint8 array of its bytes instead."""
        if self._private:
            raise errors.InvalidArgument("a private GPU copy has no host memory; use .tensors", "python.not_host_memory")
        return _tensors.numpy_arrays(self._live_core(), self.model, self._info, as_bytes)

    def release(self):
        """Drops this handle (see the class's note on lifetimes). Idempotent."""
        self._tensors = None
        if self._core is not None and self._core.valid:
            self._core.release()

    @property
    def released(self):
        return self._core is None or not self._core.valid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __len__(self):
        return len(self._info)

    def __repr__(self):
        state = "released" if self.released and not self._private else ("private" if self._private else "live")
        return (f"<weightd.Lease model={self.model!r} device={self.device!r} tensors={len(self._info)} "
                f"bytes={self.nbytes} {'writable' if self.writable else 'read-only'} {state}>")
