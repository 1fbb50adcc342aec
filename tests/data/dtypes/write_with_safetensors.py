#!/usr/bin/env python3
"""Has the Python safetensors library (with torch) write one tensor of every dtype it can.

    write_with_safetensors.py OUTDIR

writes OUTDIR/model.safetensors with safetensors.torch.save_file, and OUTDIR/expected.json in
the format of write_dtypes.py: for each tensor the dtype and shape the library put in the header
(read back from the file, not assumed), the torch dtype and shape it was written from, and its
bytes as torch held them. scripts/gpu-check.sh runs it on the GPU machine (torch 2.x,
safetensors 0.8) and points the tests at OUTDIR (WEIGHTD_SAFETENSORS_LIBRARY_DIR), so that
weightd is checked against files of the library users write with. torch has no FP6 type, so
F6_E2M3/F6_E3M2 come only from write_dtypes.py.
"""
import json
import os
import struct
import sys

import torch
from safetensors.torch import save_file


def tensors():
    t = {
        "f64": torch.tensor([1.5, -2.25], dtype=torch.float64),
        "f32": torch.tensor([[0.5, -3.0], [1024.0, 7.0]], dtype=torch.float32),
        "f16": torch.tensor([1.0, -0.5, 65504.0], dtype=torch.float16),
        "bf16": torch.tensor([1.0, -2.0, 0.15625], dtype=torch.bfloat16),
        "i64": torch.tensor([-1, 1 << 62], dtype=torch.int64),
        "i32": torch.tensor([-7, (1 << 31) - 1], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.tensor([1.5 - 2.0j, 3.25j], dtype=torch.complex64),
        "f8_e4m3": torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.tensor([1.0, -2.0, 57344.0]).to(torch.float8_e5m2),
    }
    optional = {
        "u16": ("uint16", lambda d: torch.tensor([65535, 7], dtype=d)),
        "u32": ("uint32", lambda d: torch.tensor([(1 << 32) - 1, 3], dtype=d)),
        "u64": ("uint64", lambda d: torch.tensor([1, 2], dtype=d)),
        "f8_e4m3fnuz": ("float8_e4m3fnuz", lambda d: torch.tensor([1.0, -2.0, 0.25]).to(d)),
        "f8_e5m2fnuz": ("float8_e5m2fnuz", lambda d: torch.tensor([1.0, -2.0, 0.25]).to(d)),
        "f8_e8m0": ("float8_e8m0fnu", lambda d: torch.tensor([[1.0, 2.0, 0.5], [2.0 ** -10, 2.0 ** 20, 4.0]]).to(d)),
        # Two FP4 values a byte; torch has no casts to it, so the bytes are given.
        "f4": ("float4_e2m1fn_x2",
               lambda d: torch.tensor([[0x32, 0x54, 0x76], [0x1A, 0x00, 0xF7]], dtype=torch.uint8).view(d)),
    }
    missing = []
    for name, (dtype, make) in optional.items():
        if hasattr(torch, dtype):
            t[name] = make(getattr(torch, dtype))
        else:
            missing.append(dtype)
    return t, missing


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    t, missing = tensors()
    # A dtype this safetensors release cannot write is reported and left out, not fatal.
    refused = []
    for name in list(t):
        try:
            save_file({name: t[name]}, os.path.join(out, "probe.safetensors"))
        except Exception as e:  # noqa: BLE001 - any refusal of the library
            refused.append("%s (%s: %s)" % (name, type(e).__name__, e))
            del t[name]
    if os.path.exists(os.path.join(out, "probe.safetensors")):
        os.remove(os.path.join(out, "probe.safetensors"))
    save_file(t, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    expected = []
    for name, v in t.items():
        raw = v.contiguous().view(torch.uint8).numpy().tobytes()
        expected.append({"name": name, "dtype": header[name]["dtype"], "shape": header[name]["shape"],
                         "hex": raw.hex(), "values": None, "torch_dtype": str(v.dtype), "torch_shape": list(v.shape)})
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"tensors": expected}, f, indent=1)
    import safetensors
    print("safetensors %s, torch %s: wrote %d tensors (%s) to %s; torch lacks: %s; the library refused: %s" % (
        safetensors.__version__, torch.__version__, len(t), " ".join(sorted({e["dtype"] for e in expected})), path,
        " ".join(missing) or "nothing", "; ".join(refused) or "nothing"))


if __name__ == "__main__":
    main()
