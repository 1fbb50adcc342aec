"""Binding a lease's tensors into a torch.nn.Module, without copying."""

import collections

from . import errors

__all__ = ["bind", "BindReport"]

BindReport = collections.namedtuple("BindReport", "bound missing unexpected mismatched")
BindReport.__doc__ = """What :func:`bind` did: names bound, and names missing (in the module,
not among the tensors), unexpected (among the tensors, not in the module) and mismatched."""


def _slots(module):
    """The module's parameters and persistent buffers, one slot per distinct tensor object.

    A tensor registered under several names (tied weights, a shared submodule) is one slot with
    every name and every (owner, kind, attribute) place it occupies."""
    slots = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for attr, p in owner._parameters.items():
            if p is not None:
                slot = slots.setdefault(id(p), {"tensor": p, "names": [], "places": [], "kind": "parameter"})
                slot["names"].append(dot + attr)
                slot["places"].append((owner, attr))
        non_persistent = getattr(owner, "_non_persistent_buffers_set", set())
        for attr, b in owner._buffers.items():
            # A non-persistent buffer is never in a checkpoint (it is computed at construction).
            if b is not None and attr not in non_persistent:
                slot = slots.setdefault(id(b), {"tensor": b, "names": [], "places": [], "kind": "buffer"})
                slot["names"].append(dot + attr)
                slot["places"].append((owner, attr))
    for slot in slots.values():
        # A name may repeat when a submodule is reached along one path twice; keep the first.
        slot["names"] = list(dict.fromkeys(slot["names"]))
        slot["places"] = list({(id(o), a): (o, a) for o, a in slot["places"]}.values())
    return list(slots.values())


def _describe(t):
    return f"[{', '.join(str(d) for d in t.shape)}] {str(t.dtype).replace('torch.', '')}"


def bind(module, tensors, strict=True):
    """Makes `tensors` the parameters and buffers of `module`, by name, without copying.

    tensors: a :class:`weightd.Lease` or a ``dict[str, torch.Tensor]`` (e.g. ``lease.tensors``).

    Every parameter and persistent buffer of the module (recursively, by its dotted name) is
    replaced by the tensor of the same name: parameters by a ``torch.nn.Parameter`` over it with
    ``requires_grad=False`` (the memory is shared and read-only), buffers by the tensor itself.
    The module may live on the ``meta`` device (built without allocating weights). Shapes and
    dtypes must match exactly. A tensor registered under several names (tied weights such as
    ``lm_head.weight`` and ``embed_tokens.weight``) is bound once and stays tied: any one of its
    names is enough. Non-persistent buffers (never in a checkpoint) are moved to the bound
    tensors' device when they all share one.

    strict=True: any missing, unexpected or mismatched name raises :class:`weightd.BindError`
    (an InvalidArgument) listing all three, and nothing is changed. strict=False: matching names
    are bound and the rest reported, but a mismatched shape or dtype still raises.

    Returns a :class:`BindReport`.
    """
    import torch

    if hasattr(tensors, "tensors") and not isinstance(tensors, dict):
        tensors = tensors.tensors
    if not isinstance(module, torch.nn.Module):
        raise errors.InvalidArgument(f"bind() needs a torch.nn.Module, not {type(module).__name__}",
                                     "python.bad_module")
    slots = _slots(module)
    known = set()
    plan, missing, mismatched = [], [], []
    for slot in slots:
        known.update(slot["names"])
        given = [n for n in slot["names"] if n in tensors]
        if not given:
            missing.append(slot["names"][0])
            continue
        bad = False
        for n in given:
            src, want = tensors[n], slot["tensor"]
            if tuple(src.shape) != tuple(want.shape) or src.dtype != want.dtype:
                mismatched.append(f"{n}: {_describe(src)} vs expected {_describe(want)}")
                bad = True
        if not bad:
            plan.append((slot, given[0]))
    unexpected = [n for n in tensors if n not in known]
    if mismatched or (strict and (missing or unexpected)):
        def listing(names):
            if not names:
                return "(none)"
            return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise errors.BindError(
            f"cannot bind {len(tensors)} tensors into {type(module).__name__}: missing: {listing(missing)}; "
            f"unexpected: {listing(unexpected)}; mismatched: {listing(mismatched)}",
            missing=missing, unexpected=unexpected, mismatched=mismatched)

    bound = []
    devices = set()
    for slot, name in plan:
        src = tensors[name]
        devices.add(src.device)
        new = torch.nn.Parameter(src, requires_grad=False) if slot["kind"] == "parameter" else src
        for owner, attr in slot["places"]:
            if slot["kind"] == "parameter":
                owner._parameters[attr] = new
            else:
                owner._buffers[attr] = new
        bound.append(name)
    if len(devices) == 1:
        (device,) = devices
        for owner in module.modules():
            for attr in getattr(owner, "_non_persistent_buffers_set", ()):
                b = owner._buffers.get(attr)
                if b is not None and b.device != device and b.device.type != "meta":
                    owner._buffers[attr] = b.to(device)
    return BindReport(bound, missing, unexpected, mismatched)
