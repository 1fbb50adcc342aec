"""Turning a lease's memory into torch tensors and numpy arrays, without copying.

The compiled core hands out DLPack capsules and buffers over the lease's mapping; this module
decides, per safetensors dtype, how each framework sees the bytes. Dtypes that DLPack (or the
installed torch's DLPack import) does not describe are imported as bytes and reinterpreted with
``Tensor.view(dtype)``, which is still zero-copy.
"""

from . import errors

# safetensors dtype -> (DLPack type code, bits) for dtypes every torch imports through DLPack.
_DLPACK_TYPED = {
    "F64": (2, 64), "F32": (2, 32), "F16": (2, 16), "BF16": (4, 16),
    "I64": (0, 64), "I32": (0, 32), "I16": (0, 16), "I8": (0, 8), "U8": (1, 8),
}
# safetensors dtype -> the torch dtype's attribute name (present only in some torch versions).
_TORCH_DTYPE = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
    # Two 4-bit values a byte: torch's packed type holds both, so its last dimension is halved.
    "F4": "float4_e2m1fn_x2",
}
_PACKED_PAIRS = {"F4"}
_NUMPY_DTYPE = {
    "F64": "float64", "F32": "float32", "F16": "float16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}
# Dtypes numpy has only through the ml_dtypes package (which JAX installs).
_ML_DTYPES = {
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def _unsupported(what, problems, model, version):
    """problems: [(tensor name, safetensors dtype)]."""
    listed = ", ".join(f"'{n}' ({d})" for n, d in problems[:5])
    if len(problems) > 5:
        listed += f" and {len(problems) - 5} more"
    return errors.InvalidArgument(
        f"{what} {version} cannot represent the dtype of tensor {listed} of model '{model}' "
        f"(leave such tensors out with acquire(..., tensors=[...]), or read their bytes with "
        f"lease.numpy(as_bytes=True))",
        "python.unsupported_dtype")


def torch_dtype(torch, dtype):
    """The torch dtype of a safetensors dtype name, or None where this torch lacks it."""
    attr = _TORCH_DTYPE.get(dtype)
    return getattr(torch, attr, None) if attr else None


def torch_shape(dtype, shape):
    """The torch shape of a tensor of `shape` (safetensors' logical shape)."""
    if dtype in _PACKED_PAIRS:
        if not shape or shape[-1] % 2:
            return None
        return tuple(shape[:-1]) + (shape[-1] // 2,)
    return tuple(shape)


def torch_tensors(core, model, infos):
    """Zero-copy torch tensors over the lease `core` for `infos` (from core.tensor_info())."""
    import torch
    from torch.utils.dlpack import from_dlpack

    device = torch.device("cuda", core.cuda_device) if core.cuda_device >= 0 else torch.device("cpu")
    out = {}
    problems = []
    with torch.no_grad():
        for name, dtype, shape, nbytes, ptr, _shard, _offset, index in infos:
            tdt = torch_dtype(torch, dtype)
            tshape = torch_shape(dtype, shape) if tdt is not None else None
            if tdt is None or tshape is None:
                problems.append((name, dtype))
                continue
            if nbytes == 0:
                out[name] = torch.empty(tshape, dtype=tdt, device=device)
                continue
            typed = _DLPACK_TYPED.get(dtype)
            itemsize = torch.empty((), dtype=tdt).element_size() if typed is None else typed[1] // 8
            if typed is not None and (device.type == "cpu" or ptr % itemsize == 0):
                out[name] = from_dlpack(core.dlpack(index, typed[0], typed[1], list(tshape)))
                continue
            raw = from_dlpack(core.dlpack(index, 1, 8, [nbytes]))
            if device.type == "cuda" and ptr % itemsize:
                # safetensors does not pad between tensors: a CUDA tensor whose address is not a
                # multiple of its element size cannot be loaded by GPU kernels. This one gets an
                # aligned private copy of its bytes (as in the LibTorch shim).
                raw = raw.clone()
            out[name] = raw.view(tdt).view(tshape)
    if problems:
        raise _unsupported("torch", problems, model, torch.__version__)
    return out


def numpy_arrays(core, model, infos, as_bytes):
    """Zero-copy numpy arrays over a host lease; read-only unless the lease is writable."""
    import numpy as np

    ml = None
    out = {}
    for name, dtype, shape, nbytes, _ptr, _shard, _offset, index in infos:
        if as_bytes:
            npdt = np.dtype(np.uint8)
            shape = (nbytes,)
        elif dtype in _NUMPY_DTYPE:
            npdt = np.dtype(_NUMPY_DTYPE[dtype])
        elif dtype in _ML_DTYPES:
            if ml is None:
                try:
                    import ml_dtypes as ml
                except ImportError:
                    raise _unsupported("numpy (without the ml_dtypes package)", [(name, dtype)], model,
                                       np.__version__) from None
            npdt = np.dtype(getattr(ml, _ML_DTYPES[dtype]))
        else:
            raise _unsupported("numpy", [(name, dtype)], model, np.__version__)
        if nbytes == 0:
            arr = np.empty(shape, dtype=npdt)
            arr.flags.writeable = False
        else:
            arr = np.frombuffer(core.buffer(index), dtype=np.uint8).view(npdt).reshape(shape)
        out[name] = arr
    return out
