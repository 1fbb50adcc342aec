#!/usr/bin/env python3
"""One fresh process of the end-to-end harness (run.py): the peer loaders and the physical limits.

Each mode prints one JSON line on stdout (the last line is the result) with CLOCK_MONOTONIC
timestamps in seconds (time.monotonic()), so that run.py can time the row from the moment it
spawned this process:
  t_main   first line of this script (the interpreter has started)
  t_torch  torch (and safetensors) imported
  t_ctx    CUDA context made, with LibTorch's CUDA state (one tiny tensor on the device)
  t_ready  every tensor on the device (after torch.cuda.synchronize())

Modes:
  probe                         what this Python has: torch, CUDA, safetensors, matplotlib
  st-load DIR DEVICE [--hold]   safetensors.torch.load_file(f, device=DEVICE) for every shard file
  pt-load FILE DEVICE           torch.load(FILE, mmap=True, weights_only=True), then .to(DEVICE)
  make-pt DIR FILE              writes FILE: torch.save of the state dict of DIR's shards
  ipc DIR DEVICE REPS           the producer: loads DIR onto DEVICE, then REPS times spawns a
                                fresh consumer (torch.multiprocessing, spawn) and hands it every
                                tensor through a queue; one JSON line per consumer
  h2d BYTES ITERS               pinned host-to-device copies of BYTES, ITERS times (GB/s each)
  ctx DEVICE [--hold]           a CUDA context alone (its time and, held, its memory)
  disk MODE STREAMS BYTES FILE...  reads the first BYTES of the files (in order) with STREAMS
                                threads; MODE direct (O_DIRECT) or buffered. Stdlib only.
  wd-py SOCKET MODEL DEVICE [--writable]
                                the Python package: import torch, weightd; context; acquire until
                                every tensor is a torch tensor on DEVICE (t_torch includes weightd);
                                --writable: acquire(writable=True), on a GPU the private
                                device-to-device copy, synchronized
  hf-make DIR GB                writes a LlamaForCausalLM of about GB gigabytes (bf16) with
                                save_pretrained (sharded) into DIR
  hf-disk DIR DEVICE            transformers' from_pretrained(DIR) in bf16 onto DEVICE
  hf-wd SOCKET MODEL DEVICE     weightd.transformers.from_pretrained(MODEL) onto DEVICE
  (hf-*: t_ready is the model ready to generate; a one-token generate checks it.)
Errors: {"error": "..."} and exit status 1.
WD_E2E_PROFILE=1 in the environment: the mode runs under cProfile, and the 30 most expensive
calls (cumulative) go to stderr, which run.py keeps in the child's log.
"""
import json
import os
import sys
import time

T_MAIN = time.monotonic()


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def hold():
    while sys.stdin.read(1):
        pass


def shard_files(d):
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        raise RuntimeError("no .safetensors files in " + d)
    return files


def make_context(torch, device):
    one = torch.ones(1, device=device)
    one.sum().item()
    return time.monotonic()


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def mode_probe():
    out = {"python": sys.version.split()[0]}
    try:
        import torch
        out["torch"] = torch.__version__
        out["cuda"] = bool(torch.cuda.is_available())
        if out["cuda"]:
            out["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 - any import failure means "no torch"
        out["torch"] = None
        out["cuda"] = False
        out["torch_error"] = repr(e)
    try:
        import safetensors  # noqa: F401
        out["safetensors"] = getattr(safetensors, "__version__", "yes")
    except Exception:  # noqa: BLE001
        out["safetensors"] = None
    try:
        import matplotlib  # noqa: F401
        out["matplotlib"] = matplotlib.__version__
    except Exception:  # noqa: BLE001
        out["matplotlib"] = None
    emit(out)


def mode_st_load(d, device, do_hold):
    import torch
    from safetensors.torch import load_file
    t_torch = time.monotonic()
    t_ctx = make_context(torch, device)
    tensors = {}
    for f in shard_files(d):
        tensors.update(load_file(f, device=device))
    torch.cuda.synchronize()
    t_ready = time.monotonic()
    emit({"t_main": T_MAIN, "t_torch": t_torch, "t_ctx": t_ctx, "t_ready": t_ready,
          "tensors": len(tensors), "bytes": nbytes(tensors)})
    if do_hold:
        hold()


def mode_pt_load(path, device):
    import torch
    t_torch = time.monotonic()
    t_ctx = make_context(torch, device)
    sd = torch.load(path, mmap=True, weights_only=True)
    tensors = {k: v.to(device) for k, v in sd.items()}
    torch.cuda.synchronize()
    t_ready = time.monotonic()
    emit({"t_main": T_MAIN, "t_torch": t_torch, "t_ctx": t_ctx, "t_ready": t_ready,
          "tensors": len(tensors), "bytes": nbytes(tensors)})


def mode_make_pt(d, path):
    import torch
    from safetensors.torch import load_file
    sd = {}
    for f in shard_files(d):
        sd.update(load_file(f, device="cpu"))
    tmp = path + ".tmp"
    torch.save(sd, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.rename(tmp, path)
    emit({"tensors": len(sd), "bytes": nbytes(sd), "seconds": time.monotonic() - T_MAIN})


def ipc_consumer(q, rq, done, device):
    t_entry = time.monotonic()
    import torch
    import torch.multiprocessing  # noqa: F401 - registers the CUDA tensor reductions
    t_torch = time.monotonic()
    t_ctx = make_context(torch, device)
    tensors = q.get()
    torch.cuda.synchronize()
    t_ready = time.monotonic()
    rq.put({"t_main": t_entry, "t_torch": t_torch, "t_ctx": t_ctx, "t_ready": t_ready,
            "tensors": len(tensors), "bytes": nbytes(tensors)})
    done.wait(120)
    del tensors


def mode_ipc(d, device, reps):
    import torch
    import torch.multiprocessing as tmp
    from safetensors.torch import load_file
    tensors = {}
    for f in shard_files(d):
        tensors.update(load_file(f, device=device))
    torch.cuda.synchronize()
    ctx = tmp.get_context("spawn")
    for _ in range(reps):
        q, rq, done = ctx.Queue(), ctx.Queue(), ctx.Event()
        t_spawn = time.monotonic()
        p = ctx.Process(target=ipc_consumer, args=(q, rq, done, device))
        p.start()
        q.put(tensors)
        try:
            r = rq.get(timeout=300)
            r["t_spawn"] = t_spawn
        except Exception as e:  # noqa: BLE001
            r = {"error": "consumer: " + repr(e)}
        done.set()
        p.join(60)
        if p.is_alive():
            p.kill()
        emit(r)


def mode_h2d(nb, iters):
    import torch
    host = torch.empty(nb, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nb, dtype=torch.uint8, device="cuda:0")
    dev.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    gbps = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        gbps.append(nb / (time.perf_counter() - t0) / 1e9)
    emit({"bytes": nb, "gbps": gbps})


def mode_ctx(device, do_hold):
    import torch
    t_torch = time.monotonic()
    t_ctx = make_context(torch, device)
    emit({"t_main": T_MAIN, "t_torch": t_torch, "t_ctx": t_ctx, "t_ready": t_ctx})
    if do_hold:
        hold()


def mode_disk(how, streams, limit, files):
    """Reads the first `limit` bytes of `files` (taken in order) in 16 MiB requests spread over
    `streams` threads (os.preadv releases the GIL). O_DIRECT needs aligned buffers, offsets and
    sizes: anonymous mmaps are page-aligned, and each file's length is rounded down to 4 KiB."""
    import mmap
    import threading
    chunk = 16 << 20
    jobs = []  # (path, offset, length)
    left = limit
    for f in files:
        size = os.path.getsize(f) // 4096 * 4096
        off = 0
        while off < size and left > 0:
            n = min(chunk, size - off, left)
            n = n // 4096 * 4096
            if n == 0:
                break
            jobs.append((f, off, n))
            off += n
            left -= n
        if left <= 0:
            break
    flags = os.O_RDONLY | (os.O_DIRECT if how == "direct" else 0)
    fds = {}
    for f in {j[0] for j in jobs}:
        fds[f] = os.open(f, flags)  # raises EINVAL where O_DIRECT is unsupported
    lock = threading.Lock()
    state = {"next": 0, "bytes": 0, "error": None}

    bufs = []
    for _ in range(streams):  # page-aligned, and faulted in before the clock starts
        b = mmap.mmap(-1, chunk)
        b.write(bytes(chunk))
        bufs.append(b)

    def worker(buf):
        try:
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= len(jobs):
                    return
                f, off, n = jobs[i]
                view = memoryview(buf)[:n]
                got = os.preadv(fds[f], [view], off)
                view.release()
                with lock:
                    state["bytes"] += got
        except OSError as e:
            state["error"] = repr(e)

    threads = [threading.Thread(target=worker, args=(b,)) for b in bufs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    for b in bufs:
        b.close()
    if state["error"]:
        raise RuntimeError(state["error"])
    emit({"mode": how, "streams": streams, "bytes": state["bytes"], "seconds": dt,
          "gbps": state["bytes"] / dt / 1e9})


def mode_wd_py(sock, model, device, writable=False):
    import torch
    import weightd
    t_torch = time.monotonic()
    t_ctx = make_context(torch, device)
    client = weightd.connect(sock)
    lease = client.acquire(model, device=device, writable=writable)
    tensors = lease.tensors
    if device != "cpu":
        assert all(t.is_cuda for t in tensors.values())
        # The private copy is queued on the current stream; the row ends when it is done.
        torch.cuda.synchronize()
    t_ready = time.monotonic()
    emit({"t_main": T_MAIN, "t_torch": t_torch, "t_ctx": t_ctx, "t_ready": t_ready,
          "tensors": len(tensors), "bytes": nbytes(tensors), "attach_s": lease.attach_seconds})


def hf_config(gb):
    from transformers import LlamaConfig
    # 4096-wide layers of ~0.4 GB each in bf16, plus a 128k-token embedding (1 GB).
    layers = max(1, int(round((gb - 1.05) / 0.405)))
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       tie_word_embeddings=True)


def mode_hf_make(d, gb):
    import torch
    from transformers import LlamaForCausalLM
    config = hf_config(float(gb))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(d, max_shard_size="2GB")
    emit({"bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "layers": config.num_hidden_layers,
          "seconds": time.monotonic() - T_MAIN})


def hf_ready(torch, model, device, t_torch, t_ctx):
    ids = torch.tensor([[1, 2, 3]], device=device)
    torch.cuda.synchronize()
    t_ready = time.monotonic()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=1, do_sample=False)
    torch.cuda.synchronize()
    emit({"t_main": T_MAIN, "t_torch": t_torch, "t_ctx": t_ctx, "t_ready": t_ready,
          "generate_ms": (time.monotonic() - t_ready) * 1e3, "tokens": int(out.shape[1]),
          "bytes": sum(p.numel() * p.element_size() for p in model.parameters())})


def import_modeling(transformers):
    """transformers imports a model's code lazily, on the first use of its class (seconds in
    transformers 5). A server does that once; both hf rows do it before their clock starts, so
    that they time building the model and loading its weights."""
    transformers.LlamaForCausalLM  # noqa: B018 - the attribute access is the import


def mode_hf_disk(d, device):
    import torch
    import transformers
    import_modeling(transformers)
    t_torch = time.monotonic()
    t_ctx = make_context(torch, device)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map=device)
    except TypeError:  # transformers 4 spells it torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16, device_map=device)
    hf_ready(torch, model.eval(), device, t_torch, t_ctx)


def mode_hf_wd(sock, name, device):
    import torch
    import transformers
    import weightd
    import weightd.transformers
    import_modeling(transformers)
    t_torch = time.monotonic()
    t_ctx = make_context(torch, device)
    client = weightd.connect(sock)
    model = weightd.transformers.from_pretrained(name, transformers.AutoModelForCausalLM, device=device, client=client)
    hf_ready(torch, model, device, t_torch, t_ctx)


def main(argv):
    m = argv[1]
    a = argv[2:]
    if m == "probe":
        mode_probe()
    elif m == "st-load":
        mode_st_load(a[0], a[1], "--hold" in a)
    elif m == "pt-load":
        mode_pt_load(a[0], a[1])
    elif m == "make-pt":
        mode_make_pt(a[0], a[1])
    elif m == "ipc":
        mode_ipc(a[0], a[1], int(a[2]))
    elif m == "h2d":
        mode_h2d(int(a[0]), int(a[1]))
    elif m == "ctx":
        mode_ctx(a[0], "--hold" in a)
    elif m == "disk":
        mode_disk(a[0], int(a[1]), int(a[2]), a[3:])
    elif m == "wd-py":
        mode_wd_py(a[0], a[1], a[2], "--writable" in a[3:])
    elif m == "hf-make":
        mode_hf_make(a[0], a[1])
    elif m == "hf-disk":
        mode_hf_disk(a[0], a[1])
    elif m == "hf-wd":
        mode_hf_wd(a[0], a[1], a[2])
    else:
        raise SystemExit("unknown mode " + m)


def profiled(argv):
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    try:
        prof.runcall(main, argv)
    finally:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
        sys.stderr.write(text.getvalue())


if __name__ == "__main__":
    try:
        (profiled if os.environ.get("WD_E2E_PROFILE") == "1" else main)(sys.argv)
    except Exception as e:  # noqa: BLE001 - reported to the harness as a JSON error
        emit({"error": "%s: %r" % (sys.argv[1] if len(sys.argv) > 1 else "?", e)})
        sys.exit(1)
