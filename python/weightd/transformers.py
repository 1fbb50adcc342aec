"""Hugging Face transformers models whose weights are the daemon's tensors.

Only this module imports ``transformers``; ``import weightd`` works without it.
"""

import contextlib
import os

from . import errors
from ._bind import bind
from ._client import connect

__all__ = ["from_pretrained", "empty_weights"]


@contextlib.contextmanager
def empty_weights():
    """Within this block, every ``nn.Parameter`` a module registers is created on the ``meta``
    device (no memory), while buffers are created as usual: non-persistent buffers (rotary
    frequencies, say) are computed at construction and never stored in a checkpoint."""
    import torch

    original = torch.nn.Module.register_parameter

    def register_parameter(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    if dtype is None or not dtype.is_floating_point:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _weights_dtype(tensors):
    """The dtype most of the floating-point bytes are in (the dtype the model is built in)."""
    by = {}
    for t in tensors.values():
        if t.dtype.is_floating_point:
            by[t.dtype] = by.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(by, key=by.get) if by else None


def _match_prefix(model, tensors):
    """Adds or strips the model's base prefix ("model.") when the checkpoint was saved from the
    base model and loaded into a head model, or the other way round, as transformers does."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return tensors
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    if any(n in expected for n in tensors):
        return tensors
    p = prefix + "."
    if all(n.startswith(p) for n in tensors) and not any(n.startswith(p) for n in expected):
        return {n[len(p):]: t for n, t in tensors.items()}
    if any(n.startswith(p) for n in expected):
        return {p + n: t for n, t in tensors.items()}
    return tensors


def from_pretrained(name, model_class, device="cpu", *, client=None, socket=None, config=None, strict=True,
                    writable=False, **config_kwargs):
    """Builds a transformers model whose weights are model `name`'s tensors in the daemon.

    The model is built from the checkpoint directory's ``config.json`` (the daemon's model
    directory, which this process must be able to read) without allocating its weights
    (parameters on the ``meta`` device), then the lease's tensors are bound into it with
    :func:`weightd.bind`: zero-copy, tied weights kept tied, in the checkpoint's dtype, on
    `device`. ``generation_config.json`` is read when present, so ``model.generate(...)`` works.
    The model is returned in eval mode; its weights are read-only unless ``writable=True``
    (see :meth:`weightd.Client.acquire`), so use it for inference (``torch.no_grad()`` or
    ``torch.inference_mode()``).

    model_class: an Auto class (``AutoModelForCausalLM``) or a model class
        (``LlamaForCausalLM``).
    device: as for :meth:`weightd.Client.acquire` (``"cpu"``, ``"cuda:0"``, ...).
    client: a connected :class:`weightd.Client` (default: ``weightd.connect(socket)``).
    config: a ``PretrainedConfig`` to use instead of the directory's.
    strict: passed to :func:`weightd.bind`.
    config_kwargs: passed to ``AutoConfig.from_pretrained`` (e.g. ``attn_implementation``).

    The returned model keeps its lease as ``model.weightd_lease``.
    """
    import torch
    import transformers

    if client is None:
        client = connect(socket)
    lease = client.acquire(name, device, writable=writable)
    tensors = lease.tensors
    if config is None:
        if not os.path.isfile(os.path.join(lease.model_dir, "config.json")):
            raise errors.NotFound(f"model '{name}' has no config.json in {lease.model_dir}, so no transformers model "
                                  f"can be built from it (pass config=...)", "python.no_config")
        config = transformers.AutoConfig.from_pretrained(lease.model_dir, **config_kwargs)
    dtype = _weights_dtype(tensors)
    with empty_weights(), _default_dtype(dtype):
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config)
        else:
            model = model_class(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # ties by identity on the meta device, so bind keeps the tie
    tensors = _match_prefix(model, tensors)
    bind(model, tensors, strict=strict)
    target = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise errors.BindError(f"model '{name}': no tensor for {', '.join(left[:20])} (still without memory)",
                               missing=left)
    for owner in model.modules():
        for attr, b in list(owner._buffers.items()):
            if b is not None and b.device != target:
                owner._buffers[attr] = b.to(target)
    model.eval()
    if os.path.isfile(os.path.join(lease.model_dir, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(lease.model_dir)
    model.weightd_lease = lease
    return model
