"""Test support for the Python package: an independent safetensors writer and reader (numpy,
json and struct only: nothing of weightd's), and the real weightd binary on a private socket.

Environment: WEIGHTD_BIN (the daemon; default build/cached/weightd beside this checkout) and
PYTHONPATH pointing at the build tree's python/ folder (ctest sets both).
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WEIGHTD_BIN = os.environ.get("WEIGHTD_BIN", os.path.join(REPO, "build", "cached", "weightd"))

# safetensors dtype -> numpy dtype of the same bytes (bf16 as its raw 16 bits).
NUMPY_OF = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def random_tensor(rng, dtype, shape):
    """A numpy array holding the bytes of a tensor of safetensors `dtype`."""
    np_dtype = NUMPY_OF[dtype]
    if dtype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype == "BF16":
        # Real bf16 values: the top halves of float32s.
        return (rng.standard_normal(size=shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if np.issubdtype(np_dtype, np.floating):
        return rng.standard_normal(size=shape).astype(np_dtype)
    info = np.iinfo(np_dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=np_dtype, endpoint=True)


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: (dtype, ndarray)} following the safetensors format: an 8-byte little-endian
    header length, a JSON header padded with spaces to 8 bytes, then the data, in order."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def write_model(directory, tensors, shards=1):
    """Writes {name: (dtype, ndarray)} as one model.safetensors, or as `shards` files with a
    model.safetensors.index.json, in Hugging Face's layout."""
    os.makedirs(directory, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
        return
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(directory, fname), {n: tensors[n] for n in part})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def read_model_bytes(directory):
    """{name: (dtype, shape, bytes)} of every tensor in the directory's safetensors files, parsed
    here from the format (not by weightd)."""
    out = {}
    for fname in sorted(os.listdir(directory)):
        if not fname.endswith(".safetensors"):
            continue
        with open(os.path.join(directory, fname), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            out[name] = (info["dtype"], tuple(info["shape"]), data[b:e])
    return out


def tensor_bytes(t):
    """The bytes of a torch tensor of any dtype."""
    import torch
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    if t.dtype != torch.uint8:
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


class Daemon:
    """The real weightd on ipc://<tmp>/weightd.sock with segment prefix wdpy-<pid>-<n>.

    Start() waits for READY=1 on a private NOTIFY_SOCKET, as systemd would."""

    count = 0

    def __init__(self, models, config="", args=(), world_readable=False):
        Daemon.count += 1
        self.dir = tempfile.mkdtemp(prefix="wdpy-")
        if world_readable:
            os.chmod(self.dir, 0o755)
        self.prefix = f"wdpy-{os.getpid()}-{Daemon.count}"
        self.socket_path = os.path.join(self.dir, "run", "weightd.sock")
        self.endpoint = "ipc://" + self.socket_path
        cmd = [WEIGHTD_BIN, "--socket", self.endpoint, "--shm-prefix", self.prefix, "--no-gpu"]
        if os.environ.get("WEIGHTD_TEST_GPU") == "1":
            cmd.remove("--no-gpu")
        for name, d in models.items():
            cmd += ["--model", f"{name}={d}"]
        if config:
            path = os.path.join(self.dir, "weightd.toml")
            with open(path, "w") as f:
                f.write(config)
            cmd += ["--config", path]
        cmd += list(args)
        self.cmd = cmd
        self.log_path = os.path.join(self.dir, "weightd.log")
        self.proc = None
        self.start()

    def start(self):
        notify_path = os.path.join(self.dir, "notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_"))}
        env["NOTIFY_SOCKET"] = notify_path
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weightd exited with {self.proc.returncode}:\n{self.read_log()}")
                notify.settimeout(0.2)
                try:
                    msg = notify.recv(4096).decode(errors="replace")
                except socket.timeout:
                    continue
                if "READY=1" in msg.split("\n"):
                    return
            raise RuntimeError("weightd did not report READY=1 within 30 s:\n" + self.read_log())
        finally:
            notify.close()

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def segments(self):
        return [n for n in os.listdir("/dev/shm") if n.startswith(self.prefix + ".")]

    def close(self):
        self.kill(signal.SIGTERM)
        self.log.close()
        for n in self.segments():
            try:
                os.unlink(os.path.join("/dev/shm", n))
            except FileNotFoundError:
                pass
        try:
            os.unlink(os.path.join("/dev/shm", self.prefix + ".lock"))
        except FileNotFoundError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def python_child(code, env=None, user=None, timeout=120):
    """Runs `code` in a fresh interpreter (this one, with this PYTHONPATH); returns the
    CompletedProcess. `user`: a uid to run it as."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)

    def demote():
        if user is not None:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)

    p = subprocess.Popen([sys.executable, "-c", code], env=full_env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=demote if user is not None else None)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"the child did not finish within {timeout} s; it printed:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def mappings_of(pid="self"):
    """[(begin, end, perms, path)] from /proc/<pid>/maps."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            b, e = (int(x, 16) for x in parts[0].split("-"))
            out.append((b, e, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out
