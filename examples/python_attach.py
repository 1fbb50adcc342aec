#!/usr/bin/env python3
"""A Python process attaching to a model weightd keeps resident (the demo's Python row).

    PYTHONPATH=build/python python3 examples/python_attach.py MODEL [--socket ipc://...] [--device cpu|cuda:0]

Imports torch and weightd, acquires MODEL, and prints how long the tensors took and whether
every tensor is bitwise equal to the model's safetensors files (read here with numpy; the
check reads the disk, the attach does not). Exit status 1 if any byte differs.
"""

import argparse
import json
import os
import struct
import sys
import time

import numpy as np


def file_tensors(directory):
    """{name: bytes} of every tensor in the directory's safetensors files."""
    out = {}
    for fname in sorted(os.listdir(directory)):
        if fname.endswith(".safetensors"):
            with open(os.path.join(directory, fname), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                data = f.read()
            for name, info in header.items():
                if name != "__metadata__":
                    b, e = info["data_offsets"]
                    out[name] = data[b:e]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--socket", default=None, help="default: $WEIGHTD_SOCKET, else the system socket")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    t0 = time.monotonic()
    import torch
    import weightd
    t_import = time.monotonic()
    client = weightd.connect(a.socket)
    with client.acquire(a.model, device=a.device) as lease:
        tensors = lease.tensors
        t_ready = time.monotonic()
        expected = file_tensors(lease.model_dir)
        differ = [n for n, t in tensors.items()
                  if t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() != expected.get(n)]
        print(f"import torch+weightd: {(t_import - t0) * 1e3:.1f} ms; acquire to {len(tensors)} tensors "
              f"({lease.nbytes / 1e6:.1f} MB on {lease.device}): {(t_ready - t_import) * 1e3:.1f} ms")
        print("bitwise equal to the files: " + ("yes" if not differ else "NO: " + ", ".join(differ[:5])))
    return 1 if differ else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
