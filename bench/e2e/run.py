#!/usr/bin/env python3
"""End-to-end harness (issue 6): how long a freshly started process waits for its weights, and
how much GPU memory N processes use, with weightd and with the loaders users use today, next to
the physical limits measured in the same run. Python 3 standard library only; torch,
safetensors and matplotlib are used from child processes where they are importable, and rows
that need what is missing are skipped with the reason.

  python3 bench/e2e/run.py --build build-gpucheck --out OUT [--models dit5b,glm9b,classifier]
                           [--phases limits,rows,memory] [--reps 3] [--work /tmp/wd-e2e]
  python3 bench/e2e/run.py --merge A.json B.json ... --out OUT

Every row runs in fresh processes. Times are taken from the moment the harness spawns the
process (CLOCK_MONOTONIC, which the children report too). Cold rows drop the page cache first
(`sync; echo 3 > /proc/sys/vm/drop_caches`, root only; otherwise the row says it ran warm).
See docs/benchmarks.md, "End-to-end harness".
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CHILD = os.path.join(HERE, "child.py")
PRESET_BYTES = {"dit5b": 10.2e9, "glm9b": 18.8e9, "classifier": 0.11e9, "tiny": 0.01e9, "hf3b": 3.0e9}
# Presets that are transformers checkpoints (LlamaForCausalLM of about N GB, from child.py hf-make).
HF_PRESETS = {"hf3b": 3.0}
GiB = 1 << 30

ROW_LABELS = {
    "st_cold": "safetensors load_file(cuda), cold",
    "st_warm": "safetensors load_file(cuda), warm",
    "pt_cold": "torch.load(mmap)+.cuda(), cold",
    "pt_warm": "torch.load(mmap)+.cuda(), warm",
    "torch_ipc": "PyTorch CUDA IPC (torch.multiprocessing)",
    "wd_cold": "weightd cold (disk -> GPU)",
    "wd_pagecache": "weightd page cache -> GPU (fresh daemon)",
    "wd_host_warm": "weightd host-warm (shm -> GPU)",
    "wd_gpu_warm": "weightd GPU-warm attach (ctx first)",
    "wd_gpu_warm_overlap": "weightd GPU-warm, ctx overlapped",
    "ex_file_cold": "example: file -> 1st forward, cold",
    "ex_file_warm": "example: file -> 1st forward, warm",
    "ex_attach_warm": "example: weightd -> 1st forward",
    "wd_py_gpu_warm": "weightd Python, GPU-warm (ctx first)",
    "wd_py_host_warm": "weightd Python, host-warm (shm -> GPU)",
    "wd_py_gpu_private": "weightd Python, GPU-warm, writable copy",
    "hf_disk_cold": "transformers from_pretrained, cold",
    "hf_disk_warm": "transformers from_pretrained, warm",
    "hf_wd_gpu_warm": "weightd.transformers.from_pretrained, GPU-warm",
    "hf_wd_host_warm": "weightd.transformers.from_pretrained, host-warm",
}
CPU_LABELS = {
    "wd_cold": "weightd cold (disk -> host shm, cpu)",
    "wd_pagecache": "weightd page cache -> host shm (fresh daemon, cpu)",
    "wd_host_warm": "weightd host-resident attach (cpu)",
}


def wait_or_kill(p, seconds):
    """Waits for `p` to exit, and kills it after `seconds`."""
    try:
        p.wait(seconds)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stats(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)


class Harness:
    def __init__(self, args):
        self.a = args
        self.t0 = time.monotonic()
        self.work = os.path.abspath(args.work)
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.work, "logs-" + args.tag)
        shutil.rmtree(self.logs, ignore_errors=True)  # this call's logs only
        for d in (self.work, self.out, self.logs, os.path.join(self.work, "models"), os.path.join(self.work, "parts")):
            os.makedirs(d, exist_ok=True)
        b = os.path.abspath(args.build)
        self.bin = {
            "weightd": os.path.join(b, "cached", "weightd"),
            "weightctl": os.path.join(b, "client", "weightctl"),
            "gen": os.path.join(b, "examples", "weightd-gen"),
            "example": os.path.join(b, "examples", "weightd-example"),
            "attach": os.path.join(b, "bench", "weightd_bench_e2e_attach"),
        }
        # The Python package of the same build, for the wd_py_* and hf_wd_* rows.
        self.pythonpath = os.path.join(b, "python")
        os.environ["PYTHONPATH"] = self.pythonpath + (os.pathsep + os.environ["PYTHONPATH"]
                                                      if os.environ.get("PYTHONPATH") else "")
        self.result = {"meta": {}, "limits": {}, "rows": [], "memory": None, "skipped": [], "tag": args.tag}
        self.nlog = 0
        self.daemon = None

    # ---- bookkeeping -------------------------------------------------------------------------
    def say(self, msg):
        print("[e2e %6.1fs] %s" % (time.monotonic() - self.t0, msg), flush=True)

    def left(self):
        return self.a.deadline_s - (time.monotonic() - self.t0)

    def save(self):
        path = os.path.join(self.out, "e2e-part-%s.json" % self.a.tag)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1)
        os.replace(tmp, path)
        shutil.copy(path, os.path.join(self.work, "parts", os.path.basename(path)))

    def skip(self, what, why):
        self.say("skip %s: %s" % (what, why))
        self.result["skipped"].append({"what": what, "why": why})

    def logfile(self, name):
        self.nlog += 1
        return os.path.join(self.logs, "%03d-%s.log" % (self.nlog, name))

    def run_child(self, name, cmd, timeout=None):
        """Runs cmd; returns (t_spawn, list of JSON objects from stdout, error or None)."""
        timeout = min(timeout or self.a.child_timeout_s, max(30.0, self.left() + 60))
        log = self.logfile(name)
        t_spawn = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "timed out after %.0f s" % timeout, -1
        with open(log, "w") as f:
            f.write("$ %s\nrc=%s\n--- stdout\n%s\n--- stderr\n%s\n" % (" ".join(cmd), rc, out, err))
        objs = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    objs.append(json.loads(line))
                except ValueError:
                    pass
        errs = [o["error"] for o in objs if "error" in o]
        if errs:
            return t_spawn, objs, errs[0]
        if rc != 0 or not objs:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            return t_spawn, objs, "rc=%s: %s" % (rc, tail[:300])
        return t_spawn, objs, None

    # ---- machine -----------------------------------------------------------------------------
    def probe(self):
        m = self.result["meta"]
        m["date"] = now_utc()
        m["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
        g = sh(["git", "-C", REPO, "rev-parse", "HEAD"])
        m["commit"] = g.stdout.strip() if g.returncode == 0 else None
        d = sh(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
        m["dirty"] = bool(d.stdout.strip()) if d.returncode == 0 else None
        m["host"] = platform.node()
        m["kernel"] = platform.release()
        cpu = None
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        m["cpu"] = cpu
        m["cores"] = os.cpu_count()
        try:
            with open("/proc/meminfo") as f:
                m["mem_total_kib"] = int(f.readline().split()[1])
        except (OSError, ValueError, IndexError):
            m["mem_total_kib"] = None
        self.gpu = None
        if shutil.which("nvidia-smi"):
            q = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
            if q.returncode == 0 and q.stdout.strip():
                self.gpu = q.stdout.strip().splitlines()[0]
        m["gpu"] = self.gpu
        m["root"] = os.geteuid() == 0
        _, objs, err = self.run_child("probe", [sys.executable, CHILD, "probe"], timeout=120)
        m["python"] = objs[-1] if objs else {"error": err}
        py = m["python"]
        self.torch_cuda = bool(py.get("torch") and py.get("cuda") and py.get("safetensors"))
        if not py.get("torch"):
            self.torch_why = "python3 cannot import torch"
        elif not py.get("cuda"):
            self.torch_why = "torch sees no CUDA device"
        elif not py.get("safetensors"):
            self.torch_why = "python3 cannot import safetensors"
        else:
            self.torch_why = None
        self.device = "cuda:0" if self.gpu else "cpu"
        if self.a.device != "auto":
            self.device = self.a.device
        missing = [k for k, v in self.bin.items() if not os.access(v, os.X_OK)]
        m["missing_binaries"] = missing
        self.say("machine: gpu=%s cpu=%s cores=%s root=%s torch=%s cuda=%s safetensors=%s; weightd device %s"
                 % (self.gpu, cpu, m["cores"], m["root"], py.get("torch"), py.get("cuda"), py.get("safetensors"),
                    self.device))
        if missing:
            self.say("missing binaries (rows that need them are skipped): " + ", ".join(missing))

    def gpu_used_mib(self):
        if not self.gpu:
            return None
        q = sh(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        try:
            return float(q.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None

    def drop_caches(self):
        """Returns None when the page cache was dropped, else why not."""
        os.sync()
        if os.geteuid() != 0:
            return "not root: page cache NOT dropped (warm cache)"
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return None
        except OSError as e:
            return "drop_caches failed (%s): warm cache" % e

    # ---- checkpoints -------------------------------------------------------------------------
    def model_dir(self, preset):
        return os.path.join(self.work, "models", preset)

    def ensure_model(self, preset):
        d = self.model_dir(preset)
        if preset in HF_PRESETS:
            return self.ensure_hf_model(preset, d)
        if os.path.exists(os.path.join(d, "model.safetensors.index.json")) or os.path.exists(
                os.path.join(d, "model.safetensors")):
            return d, None
        if not os.access(self.bin["gen"], os.X_OK):
            return None, "weightd-gen not built"
        need = PRESET_BYTES.get(preset, 1e9) + 1e9
        free = shutil.disk_usage(self.work).free
        if free < need:
            return None, "disk: %.1f GB free under %s, %s needs %.1f GB" % (free / 1e9, self.work, preset, need / 1e9)
        self.say("generating %s into %s" % (preset, d))
        _, _, err = self.run_child("gen-" + preset, [self.bin["gen"], "--preset", preset, "--out", d, "--seed", "1"],
                                   timeout=600)
        # run_child wants JSON; weightd-gen prints text: only its exit status matters.
        ok = os.path.exists(os.path.join(d, "model.safetensors.index.json")) or os.path.exists(
            os.path.join(d, "model.safetensors"))
        if not ok:
            return None, "weightd-gen failed: %s" % err
        os.sync()
        return d, None

    def ensure_hf_model(self, preset, d):
        if os.path.exists(os.path.join(d, "config.json")):
            return d, None
        self.say("writing the transformers checkpoint %s into %s" % (preset, d))
        _, _, err = self.run_child("hf-make-" + preset, [sys.executable, CHILD, "hf-make", d, str(HF_PRESETS[preset])],
                                   timeout=900)
        if err:
            shutil.rmtree(d, ignore_errors=True)
            return None, "writing the transformers checkpoint failed: %s" % err
        os.sync()
        return d, None

    def shard_files(self, d):
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))

    def warm_files(self, files):
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass

    # ---- the daemon --------------------------------------------------------------------------
    def start_daemon(self, models):
        self.stop_daemon()
        run = os.path.join(self.work, "run")
        os.makedirs(run, exist_ok=True)
        sock = "ipc://" + os.path.join(run, "w.sock")
        cmd = [self.bin["weightd"], "--socket", sock, "--shm-prefix", "wde2e%d" % os.getpid()]
        for name, d in models.items():
            cmd += ["--model", "%s=%s" % (name, d)]
        if not self.gpu:
            cmd.append("--no-gpu")
        cmd += shlex.split(self.a.daemon_args)
        log = open(self.logfile("weightd"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.daemon = (p, sock, log)
        for _ in range(300):
            if p.poll() is not None:
                raise RuntimeError("weightd exited with %s (see %s)" % (p.returncode, log.name))
            r = sh([self.bin["weightctl"], "--socket", sock, "--timeout", "1", "list"])
            if r.returncode == 0:
                return sock
            time.sleep(0.1)
        raise RuntimeError("weightd did not answer within 30 s")

    def stop_daemon(self):
        if not self.daemon:
            return
        p, _, log = self.daemon
        self.daemon = None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            wait_or_kill(p, 60)
        log.close()

    def weightctl(self, *args):
        _, sock, _ = self.daemon
        r = sh([self.bin["weightctl"], "--socket", sock, "--timeout", "900"] + list(args))
        if r.returncode != 0:
            raise RuntimeError("weightctl %s: %s" % (" ".join(args), (r.stderr or r.stdout).strip()[-300:]))
        return r.stdout

    def py_cmd(self, model, extra=()):
        _, sock, _ = self.daemon
        return [sys.executable, CHILD, "wd-py", sock, model, self.device] + list(extra)

    def hf_rows(self, preset):
        """transformers: from_pretrained from disk (cold, warm) against weightd.transformers."""
        d, why = self.ensure_model(preset)
        rids = ("hf_disk_cold", "hf_disk_warm", "hf_wd_gpu_warm", "hf_wd_host_warm")
        if d is None or not self.torch_cuda:
            for rid in rids:
                if self.want(rid):
                    self.new_row(preset, rid)["skipped"] = why or self.torch_why
            return
        files = self.shard_files(d)
        device = self.device
        if self.want("hf_wd_host_warm"):
            row = self.new_row(preset, "hf_wd_host_warm")
            self.say("%s hf_wd_host_warm" % preset)

            def host_only():
                self.start_daemon({preset: d})
                self.weightctl("load", preset)
            self.measure(row, "%s-hf_wd_host_warm" % preset,
                         lambda: [sys.executable, CHILD, "hf-wd", self.daemon[1], preset, device], before=host_only)
        if self.want("hf_wd_gpu_warm"):
            row = self.new_row(preset, "hf_wd_gpu_warm")
            self.say("%s hf_wd_gpu_warm" % preset)
            try:
                if not self.daemon:
                    self.start_daemon({preset: d})
                _, _, err = self.run_child("%s-hf_make_resident" % preset, self.py_cmd(preset))
                if err:
                    raise RuntimeError(err)
                self.measure(row, "%s-hf_wd_gpu_warm" % preset,
                             lambda: [sys.executable, CHILD, "hf-wd", self.daemon[1], preset, device])
            except Exception as e:  # noqa: BLE001
                row["skipped"] = "could not make the model GPU resident: %s" % e
        self.stop_daemon()
        for rid, cold in (("hf_disk_cold", True), ("hf_disk_warm", False)):
            if not self.want(rid):
                continue
            row = self.new_row(preset, rid)
            self.say("%s %s" % (preset, rid))
            self.measure(row, "%s-%s" % (preset, rid), lambda: [sys.executable, CHILD, "hf-disk", d, device],
                         before=None if cold else (lambda: self.warm_files(files)), cold=cold)

    def attach_cmd(self, model, extra=()):
        _, sock, _ = self.daemon
        return [self.bin["attach"], "--socket", sock, "--model", model, "--device", self.device] + list(extra)

    # ---- rows --------------------------------------------------------------------------------
    def new_row(self, preset, rid, label=None):
        row = {"model": preset, "row": rid, "label": label or ROW_LABELS[rid], "reps": [], "notes": [],
               "skipped": None, "model_bytes": None}
        self.result["rows"].append(row)
        return row

    def want(self, rid):
        return not self.a.rows or rid in self.a.rows

    def rep_from(self, t_spawn, o):
        r = {"ready_ms": (o["t_ready"] - t_spawn) * 1e3}
        if o.get("t_ctx") is not None:
            r["after_ctx_ms"] = (o["t_ready"] - o["t_ctx"]) * 1e3
            start = o.get("t_torch", o.get("t_main"))
            r["ctx_ms"] = (o["t_ctx"] - start) * 1e3
        if o.get("t_torch") is not None:
            r["start_ms"] = (o["t_torch"] - t_spawn) * 1e3  # interpreter + import torch
        elif o.get("t_main") is not None:
            r["start_ms"] = (o["t_main"] - t_spawn) * 1e3
        for k in ("tensors", "bytes"):
            if k in o:
                r[k] = o[k]
        return r

    def measure(self, row, name, make_cmd, before=None, cold=False):
        """Runs the row's reps: before() (not timed) then one fresh process each."""
        for i in range(self.a.reps):
            if self.left() < 0:
                row["notes"].append("stopped by --deadline-s after %d reps" % i)
                break
            try:
                if before:
                    before()
            except Exception as e:  # noqa: BLE001
                row["skipped"] = row["skipped"] or "setup failed: %s" % e
                self.say("  %s: setup failed: %s" % (name, e))
                break
            if cold:
                why = self.drop_caches()
                if why and why not in row["notes"]:
                    row["notes"].append(why)
            t_spawn, objs, err = self.run_child(name, make_cmd())
            if err:
                row["reps"].append({"error": err})
                self.say("  %s rep %d: ERROR %s" % (name, i + 1, err))
                continue
            r = self.rep_from(t_spawn, objs[-1])
            row["reps"].append(r)
            if r.get("bytes"):
                row["model_bytes"] = r["bytes"]
            self.say("  %s rep %d: ready %.1f ms%s" % (name, i + 1, r["ready_ms"], (
                ", after ctx %.1f ms" % r["after_ctx_ms"]) if "after_ctx_ms" in r else ""))
        self.save()

    def rows_for(self, preset):
        if preset in HF_PRESETS:
            self.hf_rows(preset)
            return
        d, why = self.ensure_model(preset)
        if d is None:
            self.skip(preset, why)
            return
        files = self.shard_files(d)
        device = self.device
        torch_ok = self.torch_cuda
        # weightd first: with --deadline-s, the headline rows are the last to be cut
        # 4-6. weightd
        if not all(os.access(self.bin[k], os.X_OK) for k in ("weightd", "weightctl", "attach")):
            for rid in ("wd_cold", "wd_pagecache", "wd_host_warm", "wd_gpu_warm", "wd_gpu_warm_overlap"):
                if self.want(rid):
                    self.new_row(preset, rid)["skipped"] = "weightd, weightctl or weightd_bench_e2e_attach not built"
        else:
            self.weightd_rows(preset, d, files)
        # 7. the example network
        if preset in ("classifier", "tiny"):
            self.example_rows(preset, d, files)
        self.stop_daemon()  # the peers run without a daemon holding memory
        # 1. safetensors
        for rid, cold in (("st_cold", True), ("st_warm", False)):
            if not self.want(rid):
                continue
            row = self.new_row(preset, rid)
            if not torch_ok:
                row["skipped"] = self.torch_why
                continue
            self.say("%s %s" % (preset, rid))
            self.measure(row, "%s-%s" % (preset, rid), lambda: [sys.executable, CHILD, "st-load", d, device],
                         before=None if cold else (lambda: self.warm_files(files)), cold=cold)
        # 2. torch.load(mmap=True) of a .pt
        if preset in self.a.pt_models and (self.want("pt_cold") or self.want("pt_warm")):
            pt = os.path.join(self.work, "models", preset + ".pt")
            why = None if torch_ok else self.torch_why
            if why is None and not os.path.exists(pt):
                need = PRESET_BYTES.get(preset, 1e9) + 1e9
                if shutil.disk_usage(self.work).free < need:
                    why = "disk: not enough free space for %s" % pt
                else:
                    self.say("writing %s" % pt)
                    _, _, err = self.run_child("make-pt-" + preset, [sys.executable, CHILD, "make-pt", d, pt], timeout=600)
                    why = ("writing the .pt failed: %s" % err) if err else None
                    os.sync()
            for rid, cold in (("pt_cold", True), ("pt_warm", False)):
                if not self.want(rid):
                    continue
                row = self.new_row(preset, rid)
                if why:
                    row["skipped"] = why
                    continue
                self.say("%s %s" % (preset, rid))
                self.measure(row, "%s-%s" % (preset, rid), lambda: [sys.executable, CHILD, "pt-load", pt, device],
                             before=None if cold else (lambda: self.warm_files([pt])), cold=cold)
        # 3. PyTorch CUDA IPC: one producer process, a fresh consumer per rep
        if self.want("torch_ipc"):
            row = self.new_row(preset, "torch_ipc")
            if not torch_ok:
                row["skipped"] = self.torch_why
            elif self.left() < 0:
                row["skipped"] = "--deadline-s reached"
            else:
                self.say("%s torch_ipc" % preset)
                self.warm_files(files)
                _, objs, err = self.run_child("%s-torch_ipc" % preset,
                                              [sys.executable, CHILD, "ipc", d, device, str(self.a.reps)])
                for o in objs:
                    if "error" in o:
                        row["reps"].append({"error": o["error"]})
                        continue
                    r = self.rep_from(o["t_spawn"], o)
                    row["reps"].append(r)
                    row["model_bytes"] = r.get("bytes")
                    self.say("  torch_ipc: ready %.1f ms, after ctx %.1f ms" % (r["ready_ms"], r["after_ctx_ms"]))
                if err and not objs:
                    row["reps"].append({"error": err})
                row["notes"].append("the producer (parent) loaded the model and stays alive")
                self.save()

    def weightd_rows(self, preset, d, files):
        gpu = self.device != "cpu"
        ctx = ["--context-first"] if gpu else []
        label = ROW_LABELS if gpu else dict(ROW_LABELS, **CPU_LABELS)
        if self.want("wd_cold"):
            row = self.new_row(preset, "wd_cold", label["wd_cold"])
            self.say("%s wd_cold (a fresh daemon per rep)" % preset)
            self.measure(row, "%s-wd_cold" % preset, lambda: self.attach_cmd(preset, ctx),
                         before=lambda: self.start_daemon({preset: d}), cold=True)
            row["notes"].append("fresh daemon per rep" + ("; the client makes its context first" if gpu else ""))
        if self.want("wd_pagecache"):
            # Issue 18: the daemon holds nothing, the files are in the page cache; the client's
            # acquire makes the host copy (the fill) and the GPU copy streams behind it.
            row = self.new_row(preset, "wd_pagecache", label["wd_pagecache"])
            self.say("%s wd_pagecache (a fresh daemon per rep, the files in the page cache)" % preset)

            def fresh_daemon_warm_files():
                self.start_daemon({preset: d})
                self.warm_files(files)
            self.measure(row, "%s-wd_pagecache" % preset, lambda: self.attach_cmd(preset, ctx),
                         before=fresh_daemon_warm_files)
            row["notes"].append("fresh daemon per rep, shard files read once before it (page cache)" +
                                ("; the client makes its context first" if gpu else ""))
        if self.want("wd_host_warm"):
            row = self.new_row(preset, "wd_host_warm", label["wd_host_warm"])
            self.say("%s wd_host_warm (a fresh daemon per rep, weightctl load)" % preset)

            def host_only():
                self.start_daemon({preset: d})
                self.weightctl("load", preset)
            self.measure(row, "%s-wd_host_warm" % preset, lambda: self.attach_cmd(preset, ctx), before=host_only)
            row["notes"].append("fresh daemon + `weightctl load` (host tier only) per rep")
        if gpu and any(self.want(rid) for rid in ("wd_gpu_warm", "wd_gpu_warm_overlap", "ex_attach_warm",
                                                  "wd_py_gpu_warm", "wd_py_gpu_private")):
            try:
                if not self.daemon:
                    self.start_daemon({preset: d})
                _, objs, err = self.run_child("%s-wd_make_resident" % preset, self.attach_cmd(preset))
                if err:
                    raise RuntimeError(err)
            except Exception as e:  # noqa: BLE001
                for rid in ("wd_gpu_warm", "wd_gpu_warm_overlap", "wd_py_gpu_warm", "wd_py_gpu_private"):
                    if self.want(rid):
                        self.new_row(preset, rid)["skipped"] = "could not make the model GPU resident: %s" % e
                return
            for rid, extra in (("wd_gpu_warm", ["--context-first"]), ("wd_gpu_warm_overlap", [])):
                if not self.want(rid):
                    continue
                row = self.new_row(preset, rid)
                self.say("%s %s" % (preset, rid))
                self.measure(row, "%s-%s" % (preset, rid), lambda e=extra: self.attach_cmd(preset, e))
            if self.want("wd_py_gpu_warm"):
                row = self.new_row(preset, "wd_py_gpu_warm")
                self.say("%s wd_py_gpu_warm" % preset)
                self.measure(row, "%s-wd_py_gpu_warm" % preset, lambda: self.py_cmd(preset))
            if self.want("wd_py_gpu_private"):
                row = self.new_row(preset, "wd_py_gpu_private")
                self.say("%s wd_py_gpu_private" % preset)
                self.measure(row, "%s-wd_py_gpu_private" % preset, lambda: self.py_cmd(preset, ["--writable"]))
                row["notes"].append("acquire(writable=True): attach + a device-to-device copy; GB/s = bytes / after ctx")
        if gpu and self.want("wd_py_host_warm"):
            row = self.new_row(preset, "wd_py_host_warm")
            self.say("%s wd_py_host_warm (a fresh daemon per rep, weightctl load)" % preset)

            def host_only_py():
                self.start_daemon({preset: d})
                self.weightctl("load", preset)
            self.measure(row, "%s-wd_py_host_warm" % preset, lambda: self.py_cmd(preset), before=host_only_py)
            row["notes"].append("fresh daemon + `weightctl load` (host tier only) per rep")
        elif not gpu:
            for rid in ("wd_gpu_warm", "wd_gpu_warm_overlap"):
                if self.want(rid):
                    self.new_row(preset, rid)["skipped"] = "no CUDA device (nvidia-smi lists no GPU)"

    def example_rows(self, preset, d, files):
        if not os.access(self.bin["example"], os.X_OK):
            for rid in ("ex_file_cold", "ex_file_warm", "ex_attach_warm"):
                if self.want(rid):
                    self.new_row(preset, rid)["skipped"] = "weightd-example not built"
            return
        base = [self.bin["example"], "--preset", preset, "--device", self.device, "--json"]
        digests = set()

        def run(rid, cmd, before=None, cold=False):
            row = self.new_row(preset, rid)
            self.say("%s %s" % (preset, rid))
            for i in range(self.a.reps):
                if self.left() < 0:
                    row["notes"].append("stopped by --deadline-s after %d reps" % i)
                    break
                if before:
                    before()
                if cold:
                    why = self.drop_caches()
                    if why and why not in row["notes"]:
                        row["notes"].append(why)
                t_spawn, objs, err = self.run_child("%s-%s" % (preset, rid), cmd)
                if err:
                    row["reps"].append({"error": err})
                    self.say("  %s rep %d: ERROR %s" % (rid, i + 1, err))
                    continue
                o = objs[-1]
                r = {"ready_ms": (o["first_forward_mono_s"] - t_spawn) * 1e3,
                     "weights_ready_ms": (o["ready_mono_s"] - t_spawn) * 1e3,
                     "forward_ms": o.get("forward_ms"), "digest": o.get("scores_digest")}
                digests.add(o.get("scores_digest"))
                row["reps"].append(r)
                self.say("  %s rep %d: first forward %.1f ms (weights ready %.1f ms)" % (
                    rid, i + 1, r["ready_ms"], r["weights_ready_ms"]))
            row["notes"].append("spawn -> first forward pass done (logits on the host)")
            self.save()
            return row

        if self.want("ex_file_cold"):
            run("ex_file_cold", base + ["--from-file", d], cold=True)
        if self.want("ex_file_warm"):
            run("ex_file_warm", base + ["--from-file", d], before=lambda: self.warm_files(files))
        if self.want("ex_attach_warm"):
            if not self.daemon:
                self.start_daemon({preset: d})
            _, sock, _ = self.daemon
            row = run("ex_attach_warm", base + ["--attach", preset, "--socket", sock])
            state = "GPU-resident" if self.device != "cpu" else "host-resident"
            row["notes"].append("daemon already holds the model %s (the first rep of a fresh daemon would load it)"
                                % state)
        if len(digests) > 1:
            self.result["skipped"].append({"what": "%s example" % preset,
                                           "why": "MISMATCH: runs computed different scores %s" % sorted(digests)})
            self.say("WARNING: example runs computed different scores: %s" % sorted(digests))
        elif digests:
            self.say("example: every run computed the same scores (%s)" % digests.pop())

    # ---- limits ------------------------------------------------------------------------------
    def limits(self, files):
        L = self.result["limits"]
        # pinned H2D
        if self.torch_cuda or (self.result["meta"]["python"].get("cuda")):
            self.say("limit: pinned H2D")
            _, objs, err = self.run_child("h2d", [sys.executable, CHILD, "h2d", str(GiB), str(max(5, self.a.reps * 3))])
            if err:
                L["pinned_h2d"] = {"skipped": err}
            else:
                L["pinned_h2d"] = dict(stats(objs[-1]["gbps"]), unit="GB/s", what="1 GiB pinned -> device copies")
        else:
            L["pinned_h2d"] = {"skipped": self.torch_why or "no CUDA device"}
        if not files:
            L["disk"] = {"skipped": "no checkpoint files to read"}
            return
        limit = int(self.a.disk_bytes)
        total = sum(os.path.getsize(f) for f in files)
        limit = min(limit, total // 4096 * 4096)
        L["disk_file_bytes"] = limit
        L["disk_files"] = files
        modes = [("direct", True), ("buffered", True), ("buffered", False)]  # (mode, cold)
        for how, cold in modes:
            key = {"direct": "disk_odirect", "buffered": "disk_buffered_cold"}[how] if cold else "page_cache"
            per_rep_best, runs = [], []
            note = None
            for _ in range(self.a.reps):
                best = None
                for streams in (1, 4, 16):
                    if cold:
                        why = self.drop_caches()
                        if why and how == "buffered":
                            note = why
                    elif not runs:  # bring the bytes this reads into the page cache, untimed
                        self.run_child("disk-warmup", [sys.executable, CHILD, "disk", "buffered", "4", str(limit)] + files)
                    _, objs, err = self.run_child("disk-%s-%d" % (key, streams),
                                                  [sys.executable, CHILD, "disk", how, str(streams), str(limit)] + files)
                    if err:
                        note = err
                        continue
                    runs.append({"streams": streams, "gbps": objs[-1]["gbps"]})
                    if best is None or objs[-1]["gbps"] > best[1]:
                        best = (streams, objs[-1]["gbps"])
                if best:
                    per_rep_best.append(best)
            if not per_rep_best:
                L[key] = {"skipped": note or "no result"}
                continue
            s = stats([b[1] for b in per_rep_best])
            s.update(unit="GB/s", runs=runs, best_streams=[b[0] for b in per_rep_best],
                     what="best of 1/4/16 streams per rep, %d MB of the checkpoint" % (limit // 10**6))
            if note:
                s["note"] = note
            L[key] = s
            self.say("limit %s: %.2f GB/s (streams %s)%s" % (key, s["median"], s["best_streams"],
                                                               (" [" + note + "]") if note else ""))
        self.save()

    # ---- GPU memory --------------------------------------------------------------------------
    def memory(self):
        preset = self.a.memory_model
        mem = {"model": preset, "unit": "MiB", "weightd": {}, "safetensors": {}}
        self.result["memory"] = mem
        if not self.gpu:
            mem["skipped"] = "no CUDA device (nvidia-smi lists no GPU)"
            return
        d, why = self.ensure_model(preset)
        if d is None:
            mem["skipped"] = why
            return
        files = self.shard_files(d)
        self.stop_daemon()
        time.sleep(1)
        mem["idle"] = self.gpu_used_mib()
        total = sh(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]).stdout.strip()
        mem["total"] = float(total.splitlines()[0]) if total else None
        self.say("memory: idle %.0f MiB of %s" % (mem["idle"] or -1, mem["total"]))

        def hold_group(cmds, name):
            procs = []
            for i, c in enumerate(cmds):
                log = open(self.logfile("%s-%d" % (name, i)), "w")
                procs.append((subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                               text=True), log))
            err = None
            for p, _ in procs:
                line = p.stdout.readline()
                if not line.startswith("{") or "error" in json.loads(line):
                    err = err or (line.strip() or "exited with %s" % p.poll())
            time.sleep(0.5)
            used = self.gpu_used_mib()
            for p, log in procs:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            for p, log in procs:
                wait_or_kill(p, 120)
                log.close()
            time.sleep(1.0)  # let the driver reclaim
            return used, err

        # contexts alone
        ctx_cpp, ctx_py = [], []
        for _ in range(self.a.mem_reps):
            u, err = hold_group([[self.bin["attach"], "--context-only", "--device", "cuda:0", "--hold"]], "ctx-cpp")
            if not err and u is not None:
                ctx_cpp.append(u - mem["idle"])
            if self.torch_cuda:
                u, err = hold_group([[sys.executable, CHILD, "ctx", "cuda:0", "--hold"]], "ctx-py")
                if not err and u is not None:
                    ctx_py.append(u - mem["idle"])
        mem["context_cpp"] = stats(ctx_cpp)
        mem["context_torch"] = stats(ctx_py)
        # weightd: the daemon holds one copy; N clients import it
        try:
            self.start_daemon({preset: d})
            self.weightctl("load", preset)
            _, _, err = self.run_child("mem-make-resident", self.attach_cmd(preset))
            if err:
                raise RuntimeError(err)
            time.sleep(0.5)
            mem["daemon_only"] = self.gpu_used_mib()
            for n in self.a.mem_n:
                vals, errs = [], []
                for _ in range(self.a.mem_reps):
                    if self.left() < 0:
                        errs.append("--deadline-s reached")
                        break
                    u, err = hold_group([self.attach_cmd(preset, ["--hold"]) for _ in range(n)], "mem-wd-%d" % n)
                    (errs.append(err) if err else vals.append(u))
                mem["weightd"][str(n)] = {"used": stats(vals), "errors": errs}
                self.say("memory weightd N=%d: %s MiB used" % (n, mem["weightd"][str(n)]["used"]))
        except Exception as e:  # noqa: BLE001
            mem["weightd_error"] = str(e)
        self.stop_daemon()
        time.sleep(1)
        # safetensors: N private copies, until they no longer fit
        if not self.torch_cuda:
            mem["safetensors_skipped"] = self.torch_why
        else:
            self.warm_files(files)
            model_mib = sum(os.path.getsize(f) for f in files) / 2**20
            per = model_mib + (mem["context_torch"]["median"] if mem["context_torch"] else 600)
            for n in self.a.mem_n:
                free = (mem["total"] or 0) - (self.gpu_used_mib() or 0)
                if n * per > free:
                    mem["safetensors"][str(n)] = {"used": None, "errors": [
                        "does not fit: needs ~%.0f MiB, %.0f MiB free" % (n * per, free)]}
                    self.say("memory safetensors N=%d: does not fit" % n)
                    continue
                vals, errs = [], []
                for _ in range(self.a.mem_reps):
                    if self.left() < 0:
                        errs.append("--deadline-s reached")
                        break
                    u, err = hold_group([[sys.executable, CHILD, "st-load", d, "cuda:0", "--hold"] for _ in range(n)],
                                        "mem-st-%d" % n)
                    (errs.append(err) if err else vals.append(u))
                mem["safetensors"][str(n)] = {"used": stats(vals), "errors": errs}
                self.say("memory safetensors N=%d: %s MiB used" % (n, mem["safetensors"][str(n)]["used"]))
        mem["model_mib"] = sum(os.path.getsize(f) for f in files) / 2**20
        self.save()

    # ---- main --------------------------------------------------------------------------------
    def run(self):
        self.probe()
        self.save()
        try:
            if "limits" in self.a.phases:
                first = None
                for p in self.a.models + [self.a.memory_model]:
                    d = self.model_dir(p)
                    if os.path.isdir(d) and self.shard_files(d) and PRESET_BYTES.get(p, 0) > 1e9:
                        first = p
                        break
                if first is None:
                    big = [p for p in self.a.models if PRESET_BYTES.get(p, 0) > 1e9] or self.a.models
                    d, why = self.ensure_model(big[0])
                    first = big[0] if d else None
                self.limits(self.shard_files(self.model_dir(first)) if first else [])
            if "rows" in self.a.phases:
                for p in self.a.models:
                    self.rows_for(p)
                    self.stop_daemon()
            if "memory" in self.a.phases:
                self.memory()
        finally:
            self.stop_daemon()
            try:  # the daemons' lock file of this harness's segment prefix
                os.unlink("/dev/shm/wde2e%d.lock" % os.getpid())
            except OSError:
                pass
            self.finish()

    def finish(self):
        self.result["meta"]["seconds"] = time.monotonic() - self.t0
        self.save()
        tar = os.path.join(self.out, "e2e-logs-%s.tar.gz" % self.a.tag)
        with tarfile.open(tar, "w:gz") as t:
            t.add(self.logs, arcname=os.path.basename(self.logs))
        if self.a.merge_parts:  # this part and the earlier ones kept under --work/parts
            pdir = os.path.join(self.work, "parts")
            parts = []
            for f in sorted(os.listdir(pdir)):
                if f.endswith(".json"):
                    with open(os.path.join(pdir, f)) as fh:
                        parts.append(json.load(fh))
            report(parts, self.out, "e2e-merged")
        else:
            report([self.result], self.out, "e2e-" + self.a.tag)


# ---- report --------------------------------------------------------------------------------
def fmt_s(s, digits=1):
    if not s:
        return "-"
    f = "%%.%df" % digits
    return (f + " [" + f + "-" + f + "]") % (s["median"], s["min"], s["max"])


def row_summary(row, limits):
    ok = [r for r in row["reps"] if "error" not in r]
    s = {"ready_ms": stats([r.get("ready_ms") for r in ok]),
         "after_ctx_ms": stats([r.get("after_ctx_ms") for r in ok]),
         "ctx_ms": stats([r.get("ctx_ms") for r in ok]),
         "start_ms": stats([r.get("start_ms") for r in ok]),
         "weights_ready_ms": stats([r.get("weights_ready_ms") for r in ok]),
         "errors": [r["error"] for r in row["reps"] if "error" in r]}
    b = row.get("model_bytes")
    t = s["after_ctx_ms"]
    if b and t and row["row"] not in ("wd_gpu_warm", "torch_ipc", "wd_gpu_warm_overlap", "wd_py_gpu_warm",
                                      "hf_wd_gpu_warm"):
        s["gbps"] = b / (t["median"] / 1e3) / 1e9
    lim = None
    if row["row"] == "wd_cold":
        cands = [limits.get(k, {}).get("median") for k in ("disk_odirect", "disk_buffered_cold")
                 if "note" not in limits.get(k, {}) or k == "disk_odirect"]
        cands = [c for c in cands if c]
        if cands:
            lim = ("raw disk", max(cands))
    elif row["row"] in ("wd_host_warm", "wd_py_host_warm") and limits.get("pinned_h2d", {}).get("median"):
        lim = ("pinned H2D", limits["pinned_h2d"]["median"])
    elif row["row"] == "wd_pagecache" and limits.get("page_cache", {}).get("median"):
        lim = ("page cache", limits["page_cache"]["median"])
    if lim and s.get("gbps"):
        s["limit"] = lim[0]
        s["limit_gbps"] = lim[1]
        s["of_limit"] = s["gbps"] / lim[1]
    return s


def targets(rows, mem):
    out = []
    by = {(r["model"], r["row"]): r for r in rows}

    def med(m, rid, key="after_ctx_ms"):
        r = by.get((m, rid))
        v = r and r.get("summary", {}).get(key)
        return v["median"] if v else None
    for m in sorted({r["model"] for r in rows}):
        g = med(m, "wd_gpu_warm")
        for rid, need, what in (("st_warm", 300, "GPU-warm attach vs safetensors warm (after ctx)"),
                                ("torch_ipc", 3, "GPU-warm attach vs PyTorch CUDA IPC (after ctx)")):
            p = med(m, rid)
            if g and p:
                x = p / g
                out.append({"model": m, "what": what, "value": "%.0fx" % x if x >= 10 else "%.2fx" % x,
                            "target": ">= %dx" % need, "met": x >= need})
        gp = med(m, "wd_py_gpu_warm")
        if gp:
            out.append({"model": m, "what": "Python GPU-warm (after ctx)", "value": "%.1f ms" % gp,
                        "target": "<= 10 ms", "met": gp <= 10})
            for rid, need, what in (("st_warm", 150, "Python GPU-warm vs safetensors warm (after ctx)"),
                                    ("torch_ipc", 1.5, "Python GPU-warm vs PyTorch CUDA IPC (after ctx)")):
                p = med(m, rid)
                if p:
                    x = p / gp
                    out.append({"model": m, "what": what, "value": "%.0fx" % x if x >= 10 else "%.2fx" % x,
                                "target": ">= %gx" % need, "met": x >= need})
        hw, hd = med(m, "hf_wd_gpu_warm"), med(m, "hf_disk_warm")
        if hw and hd:
            x = hd / hw
            out.append({"model": m, "what": "transformers: weightd GPU-warm vs from_pretrained warm (after ctx)",
                        "value": "%.1fx" % x, "target": "faster", "met": x > 1})
        # Issue 18: page cache -> GPU at >= 12 GB/s and >= 2x safetensors warm (both after ctx).
        pc, sw = med(m, "wd_pagecache"), med(m, "st_warm")
        pcr = by.get((m, "wd_pagecache"))
        pc_gbps = pcr and pcr.get("summary", {}).get("gbps")
        if pc_gbps:
            out.append({"model": m, "what": "page cache -> GPU, fresh daemon (after ctx)", "value": "%.1f GB/s" % pc_gbps,
                        "target": ">= 12 GB/s", "met": pc_gbps >= 12})
        if pc and sw:
            x = sw / pc
            out.append({"model": m, "what": "page cache -> GPU vs safetensors warm (after ctx)", "value": "%.2fx" % x,
                        "target": ">= 2x", "met": x >= 2})
        for rid, need, what in (("wd_host_warm", 0.8, "host-warm of pinned H2D"), ("wd_cold", 0.9, "cold of raw disk")):
            r = by.get((m, rid))
            f = r and r.get("summary", {}).get("of_limit")
            if f:
                out.append({"model": m, "what": what, "value": "%.0f%%" % (f * 100), "target": ">= %.0f%%" % (need * 100),
                            "met": f >= need})
    if mem and mem.get("weightd", {}).get("8", {}).get("used") and mem.get("context_cpp") and mem.get("idle") is not None:
        used = mem["weightd"]["8"]["used"]["median"] - mem["idle"]
        budget = (mem["model_mib"] + 8 * mem["context_cpp"]["median"]) * 1.02
        daemon = (mem.get("daemon_only") or 0) - mem["idle"]
        out.append({"model": mem["model"], "what": "8 weightd clients (incl. the daemon) vs 1 copy + 8 ctx + 2%",
                    "value": "%.0f MiB (budget %.0f; daemon %.0f)" % (used, budget, daemon),
                    "target": "<= %.0f MiB" % budget, "met": used <= budget})
    return out


def report(parts, out_dir, stem):
    rows, limits_by_tag, mem, skipped = [], {}, None, []
    for p in parts:
        tag = p.get("tag", "?")
        limits_by_tag[tag] = p.get("limits", {})
        for r in p.get("rows", []):
            r = dict(r)
            r["summary"] = row_summary(r, p.get("limits", {}))
            r["part"] = tag
            rows = [x for x in rows if (x["model"], x["row"]) != (r["model"], r["row"])] + [r]
        if p.get("memory") and (p["memory"].get("weightd") or p["memory"].get("skipped")):
            mem = p["memory"] if not mem or p["memory"].get("weightd") else mem
        skipped += p.get("skipped", [])
    tg = targets(rows, mem)
    final = {"meta": [p.get("meta", {}) for p in parts], "limits": limits_by_tag, "rows": rows, "memory": mem,
             "targets": tg, "skipped": skipped}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(final, f, indent=1)
    plot(rows, os.path.join(out_dir, stem + ".png"))
    lines = table(parts, rows, limits_by_tag, mem, tg, skipped)
    with open(os.path.join(out_dir, stem + "-table.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(parts, rows, limits_by_tag, mem, tg, skipped):
    L = []
    L.append("=" * 30 + " weightd end-to-end: time to tensors ready in a fresh process " + "=" * 30)
    for p in parts:
        m = p.get("meta", {})
        L.append("part %s: %s | gpu %s | cpu %s x%s | commit %s%s | torch %s | %.0f s" % (
            p.get("tag"), m.get("date"), m.get("gpu"), m.get("cpu"), m.get("cores"), (m.get("commit") or "?")[:10],
            "+dirty" if m.get("dirty") else "", (m.get("python") or {}).get("torch"), m.get("seconds") or 0))
    L.append("times in ms, median [min-max] of the reps; READY = from the harness spawning the process; AFTER CTX ="
             " after the process's CUDA context (and torch) were ready; start = spawn -> main() (C++) or -> torch"
             " imported (Python); ctx = the context alone")
    hdr = "%-11s %-40s %-28s %-28s %7s %8s  %s" % ("MODEL", "ROW", "READY ms", "AFTER CTX ms", "GB/s", "OF LIMIT", "NOTE")
    L.append(hdr)
    L.append("-" * len(hdr))
    for r in rows:
        s = r["summary"]
        if r.get("skipped") and not s["ready_ms"]:
            L.append("%-11s %-40s %-28s %-28s %7s %8s  skipped: %s" % (r["model"], r["label"], "-", "-", "", "", r["skipped"]))
            continue
        note = list(r.get("notes", []))
        if s.get("weights_ready_ms"):
            note.insert(0, "weights ready %s" % fmt_s(s["weights_ready_ms"]))
        if s["errors"]:
            note.insert(0, "%d ERRORS: %s" % (len(s["errors"]), s["errors"][0][:120]))
        if s.get("ctx_ms"):
            note.insert(0, "ctx %s" % fmt_s(s["ctx_ms"]))
        if s.get("start_ms"):
            note.insert(0, "start %s" % fmt_s(s["start_ms"]))
        L.append("%-11s %-40s %-28s %-28s %7s %8s  %s" % (
            r["model"], r["label"], fmt_s(s["ready_ms"]), fmt_s(s["after_ctx_ms"], 2),
            "%.2f" % s["gbps"] if s.get("gbps") else "",
            ("%.0f%%" % (s["of_limit"] * 100)) if s.get("of_limit") else "", "; ".join(note)))
    names = {"pinned_h2d": "pinned H2D (1 GiB copies)", "disk_odirect": "disk O_DIRECT, best of 1/4/16 streams",
             "disk_buffered_cold": "disk buffered cold, best of 1/4/16", "page_cache": "page cache, best of 1/4/16"}
    for tag, lim in limits_by_tag.items():
        for k, name in names.items():
            v = lim.get(k)
            if not v:
                continue
            if "skipped" in v:
                L.append("%-11s %-40s %-28s %-28s %7s %8s  skipped: %s" % ("limit", name, "", "", "", "", v["skipped"]))
            else:
                L.append("%-11s %-40s %-28s %-28s %7.2f %8s  GB/s %s (part %s)%s" % (
                    "limit", name, "", "", v["median"], "", fmt_s(v, 2), tag, ("; " + v["note"]) if v.get("note") else ""))
    if mem:
        if mem.get("skipped"):
            L.append("%-11s %-40s %-28s %-28s %7s %8s  skipped: %s" % ("memory", "GPU memory of N processes", "", "", "", "",
                                                                    mem["skipped"]))
        else:
            L.append("%-11s %-40s %-28s %-28s %7s %8s  idle %.0f MiB, daemon holding the copy %s MiB, model %.0f MiB, "
                     "ctx C++ %s, ctx torch %s MiB" % (
                         "memory", mem["model"] + ": nvidia-smi memory.used", "", "", "", "", mem.get("idle") or 0,
                         "%.0f" % mem["daemon_only"] if mem.get("daemon_only") else "-", mem.get("model_mib") or 0,
                         fmt_s(mem.get("context_cpp"), 0), fmt_s(mem.get("context_torch"), 0)))
            for who in ("weightd", "safetensors"):
                for n, v in sorted(mem.get(who, {}).items(), key=lambda kv: int(kv[0])):
                    u = v.get("used")
                    txt = ("used %s MiB = +%.0f MiB over idle" % (fmt_s(u, 0), u["median"] - (mem.get("idle") or 0))
                           if u else "; ".join(v.get("errors") or ["no result"]))
                    L.append("%-11s %-40s %-28s %-28s %7s %8s  %s" % ("memory", "%s N=%s" % (who, n), "", "", "", "", txt))
            if mem.get("safetensors_skipped"):
                L.append("%-11s %-40s %-28s %-28s %7s %8s  skipped: %s" % ("memory", "safetensors N=*", "", "", "", "",
                                                                        mem["safetensors_skipped"]))
    for t in tg:
        L.append("%-11s %-40s %-28s %-28s %7s %8s  %s: %s (target %s)" % (
            "target", t["model"], "", "", "", "MET" if t["met"] else "MISSED", t["what"], t["value"], t["target"]))
    for s in skipped:
        L.append("%-11s %-40s %-28s %-28s %7s %8s  %s" % ("skipped", s["what"][:40], "", "", "", "", s["why"]))
    return L


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print("no PNG: matplotlib is not importable (%s)" % e)
        return
    items = [r for r in rows if r["summary"]["ready_ms"]]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(items) + 1.5))
    ys = list(range(len(items)))[::-1]
    for key, color, lab, off in (("ready_ms", "tab:blue", "spawn -> ready", 0.2),
                                 ("after_ctx_ms", "tab:orange", "after CUDA context", -0.2)):
        xs, lo, hi, yy = [], [], [], []
        for y, r in zip(ys, items):
            s = r["summary"].get(key)
            if s:
                xs.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
                yy.append(y + off)
        ax.barh(yy, xs, height=0.38, color=color, label=lab, xerr=[lo, hi], capsize=2)
    ax.set_yticks(ys)
    ax.set_yticklabels(["%s: %s" % (r["model"], r["label"]) for r in items], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale), median with min-max")
    ax.set_title("Time to tensors ready in a fresh process")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote " + path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(REPO, "build-gpucheck"), help="CMake build folder")
    ap.add_argument("--out", required=True, help="results folder (JSON, table, PNG, logs tar)")
    ap.add_argument("--work", default="/tmp/wd-e2e", help="checkpoints, .pt, runtime files (reused across calls)")
    ap.add_argument("--models", default="dit5b,glm9b,classifier")
    ap.add_argument("--phases", default="limits,rows,memory", help="any of limits,rows,memory")
    ap.add_argument("--rows", default="", help="only these row ids (comma-separated); default all")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto", help="device the weightd rows acquire: auto (cuda:0 when a GPU is "
                    "seen, else cpu), cpu (host residency only), cuda:N")
    ap.add_argument("--daemon-args", default="", help="extra weightd options, e.g. '--loader-threads 16'")
    ap.add_argument("--pt-models", default="dit5b", help="checkpoints that get the torch.load rows")
    ap.add_argument("--memory-model", default="dit5b")
    ap.add_argument("--mem-n", default="1,2,4,8")
    ap.add_argument("--mem-reps", type=int, default=3)
    ap.add_argument("--disk-bytes", type=float, default=2e9, help="bytes read per disk-bandwidth run")
    ap.add_argument("--deadline-s", type=float, default=440, help="start no new rep after this many seconds")
    ap.add_argument("--child-timeout-s", type=float, default=300)
    ap.add_argument("--tag", default=None, help="name of this part (default: models + phases)")
    ap.add_argument("--merge", nargs="+", metavar="PART_JSON", help="merge part files into one table, JSON and PNG")
    ap.add_argument("--merge-parts", action="store_true",
                    help="report every part under --work/parts (earlier calls and this one) as e2e-merged.*")
    ap.add_argument("--clean", action="store_true", help="delete the checkpoints under --work at the end")
    a = ap.parse_args()
    if a.merge:
        parts = []
        for f in a.merge:
            with open(f) as fh:
                parts.append(json.load(fh))
        report(parts, os.path.abspath(a.out), "e2e-merged")
        return 0
    a.models = [m for m in a.models.split(",") if m]
    a.phases = [p for p in a.phases.split(",") if p]
    a.rows = [r for r in a.rows.split(",") if r]
    a.pt_models = [m for m in a.pt_models.split(",") if m]
    a.mem_n = [int(n) for n in a.mem_n.split(",") if n]
    if a.tag is None:
        a.tag = "-".join(a.models) + ("" if a.phases == ["limits", "rows", "memory"] else "_" + "-".join(a.phases))
    h = Harness(a)
    h.run()
    if a.clean:
        shutil.rmtree(os.path.join(h.work, "models"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
