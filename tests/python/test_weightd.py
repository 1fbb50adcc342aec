"""The Python package against the real daemon: tensors, zero-copy, bind, DLPack, errors, writable
leases, fork, lifetimes. Runs with Debian's python3-torch (1.13, CPU) in CI and with pip's
torch 2.x on the GPU machine (WEIGHTD_TEST_GPU=1 adds the CUDA cases)."""

import gc
import grp
import os
import pwd
import signal
import sys
import threading
import time
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

import weightd  # noqa: E402

CUDA = os.environ.get("WEIGHTD_TEST_GPU") == "1" and torch.cuda.is_available()

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]


def many_dtypes_model(rng):
    """Every dtype Debian's torch 1.13 has, odd shapes and byte counts (so that tensors sit at
    unaligned offsets), a scalar and an empty tensor."""
    tensors = {}
    for i, dt in enumerate(DTYPES):
        tensors[f"t.{i}.{dt.lower()}"] = (dt, support.random_tensor(rng, dt, (3, 5 + i)))
    tensors["scalar"] = ("F32", support.random_tensor(rng, "F32", ()))
    tensors["empty"] = ("BF16", support.random_tensor(rng, "BF16", (0, 4)))
    tensors["odd.u8"] = ("U8", support.random_tensor(rng, "U8", (7,)))
    tensors["after.odd.f32"] = ("F32", support.random_tensor(rng, "F32", (2, 3)))
    return tensors


class TinyNet(torch.nn.Module):
    """A small network with a tied weight, a buffer and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.LayerNorm(8))
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("cache", torch.arange(8, dtype=torch.float32), persistent=False)

    def forward(self, ids):
        h = self.body(self.embed(ids) * self.scale + self.cache)
        return self.head(h)


def tiny_net_tensors(rng):
    net = TinyNet()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(size=tuple(p.shape)).astype(np.float32)))
        net.scale.copy_(torch.from_numpy(rng.standard_normal(size=(8,)).astype(np.float32)))
    # A checkpoint keeps one copy of a tied weight, as save_pretrained does.
    return {k: ("F32", v.numpy().copy()) for k, v in net.state_dict().items() if k != "head.weight"}


class DaemonTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rng = np.random.default_rng(1234)
        cls.models_dir = support.tempfile.mkdtemp(prefix="wdpy-models-")
        os.chmod(cls.models_dir, 0o755)
        cls.dirs = {}
        cls.dirs["many"] = os.path.join(cls.models_dir, "many")
        support.write_model(cls.dirs["many"], many_dtypes_model(cls.rng), shards=2)
        cls.dirs["net"] = os.path.join(cls.models_dir, "net")
        support.write_model(cls.dirs["net"], tiny_net_tensors(cls.rng))
        cls.dirs["big"] = os.path.join(cls.models_dir, "big")
        # 48 MiB in 3 shards, for the sharing and lifetime checks.
        support.write_model(cls.dirs["big"], {f"w.{i}": ("F32", cls.rng.standard_normal(size=(1024, 2048)).astype(
            np.float32)) for i in range(6)}, shards=3)
        cls.daemon = support.Daemon(cls.dirs, world_readable=True)
        cls.client = weightd.connect(cls.daemon.endpoint, timeout=10)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        gc.collect()
        cls.daemon.close()
        support.shutil.rmtree(cls.models_dir, ignore_errors=True)

    def leases_of(self, name):
        return self.client.status(name)["leases"]

    def wait_leases(self, name, n, limit=10.0):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            gc.collect()
            if self.leases_of(name) == n:
                return True
            time.sleep(0.02)
        return self.leases_of(name) == n

    def child(self, code, **kw):
        env = {"WEIGHTD_SOCKET": self.daemon.endpoint}
        env.update(kw.pop("env", {}))
        return support.python_child(code, env=env, **kw)


class Tensors(DaemonTest):
    def check_bitwise(self, tensors, directory):
        expected = support.read_model_bytes(directory)
        self.assertEqual(set(tensors), set(expected))
        for name, (dtype, shape, raw) in expected.items():
            t = tensors[name]
            self.assertEqual(tuple(t.shape), shape, name)
            self.assertEqual(str(t.dtype), "torch." + weightd._tensors._TORCH_DTYPE[dtype], name)
            self.assertEqual(support.tensor_bytes(t), raw, name)

    def test_every_tensor_is_bitwise_the_file_in_its_dtype_and_shape(self):
        with self.client.acquire("many") as lease:
            self.assertEqual(lease.device, "cpu")
            self.assertFalse(lease.writable)
            self.check_bitwise(lease.tensors, self.dirs["many"])

    def test_cuda_tensors_are_bitwise_the_file(self):
        if not CUDA:
            self.skipTest("no CUDA device (or WEIGHTD_TEST_GPU unset)")
        with self.client.acquire("many", device="cuda:0") as lease:
            self.assertEqual(lease.device, "cuda:0")
            for t in lease.tensors.values():
                self.assertTrue(t.is_cuda)
            self.check_bitwise(lease.tensors, self.dirs["many"])

    def test_tensors_are_views_of_the_daemons_shared_memory(self):
        with self.client.acquire("big") as lease:
            maps = [m for m in support.mappings_of() if self.daemon.prefix in m[3]]
            self.assertEqual(len(maps), 3, "one mapping per shard")
            for name, t in lease.tensors.items():
                end = t.data_ptr() + t.numel() * t.element_size()
                inside = [m for m in maps if m[0] <= t.data_ptr() and end <= m[1]]
                self.assertTrue(inside, f"{name} at {t.data_ptr():#x} lies in no segment mapping")
                self.assertEqual(inside[0][2], "r--s", name)

    def test_a_tensor_filter_maps_only_those_tensors(self):
        with self.client.acquire("big", tensors=["w.1", "w.4"]) as lease:
            self.assertEqual(sorted(lease.tensors), ["w.1", "w.4"])

    def test_processes_holding_the_model_share_one_copy(self):
        # Each child maps the 48 MiB model, reads every byte, and reports what the kernel says of
        # the mapping: resident, and none of it a private copy (Anonymous: the pages a write to a
        # private mapping would copy). Not Private_Clean/Private_Dirty: those count the segment's
        # own pages that no other process maps at that moment, and a write-filled segment is not
        # mapped by the daemon (it writes through the fd), so a child that reads its pages before
        # the other children do is, for a while, their only mapper.
        code = r"""
import os, sys, weightd, torch
lease = weightd.connect().acquire("big")
total = sum(float(t.double().sum()) for t in lease.tensors.values())
prefix = sys.argv[1] if len(sys.argv) > 1 else os.environ["PREFIX"]
rss = anonymous = 0
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            inside = prefix in line
        elif inside and head[0] == "Rss:":
            rss += int(head[1]) * 1024
        elif inside and head[0] == "Anonymous:":
            anonymous += int(head[1]) * 1024
print(rss, anonymous, total, flush=True)
sys.stdin.read()
"""
        import subprocess
        env = dict(os.environ, WEIGHTD_SOCKET=self.daemon.endpoint, PREFIX=self.daemon.prefix)
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
        try:
            rows = [p.stdout.readline().split() for p in procs]
            size = 6 * 1024 * 2048 * 4
            for rss, anonymous, total in rows:
                self.assertGreaterEqual(int(rss), size, "the child did not map and touch the whole model")
                self.assertEqual(int(anonymous), 0, "pages of the shared copy became private to a child")
            self.assertEqual(len({r[2] for r in rows}), 1)
            self.assertEqual(self.client.status("big")["leases"], 4)
            self.assertEqual(self.client.status("big")["resident_bytes"], size)
        finally:
            for p in procs:
                p.stdin.close()
                p.stdout.close()
                p.wait(timeout=60)


class GpuSharing(DaemonTest):
    def gpu_used_mib(self):
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return float(out.split()[0])

    def hold(self, n, code):
        """Starts n children running `code` and waiting on stdin; returns the GPU memory they
        add (MiB), measured while all of them hold what they took."""
        import subprocess
        env = dict(os.environ, WEIGHTD_SOCKET=self.daemon.endpoint)
        before = self.gpu_used_mib()
        procs = [subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\nsys.stdin.read()"],
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        try:
            for p in procs:
                self.assertEqual(p.stdout.readline().strip(), "ready")
            return self.gpu_used_mib() - before
        finally:
            for p in procs:
                p.stdin.close()
                p.stdout.close()
                p.wait(timeout=60)

    def test_eight_python_processes_use_one_gpu_copy_plus_their_contexts(self):
        if not CUDA:
            self.skipTest("no CUDA device (or WEIGHTD_TEST_GPU unset)")
        size_mib = 6 * 1024 * 2048 * 4 / 2**20
        with self.client.acquire("big", device="cuda:0"):
            pass  # the daemon's copy exists before the children come
        contexts = self.hold(8, "import sys, torch; torch.ones(1, device='cuda:0')")
        held = self.hold(8, "import sys, torch, weightd\n"
                            "lease = weightd.connect().acquire('big', device='cuda:0')\n"
                            "assert all(t.is_cuda for t in lease.tensors.values())")
        print(f"\n8 Python processes: contexts alone {contexts:.0f} MiB, holding the model {held:.0f} MiB "
              f"(one private copy each would add {8 * size_mib:.0f} MiB)")
        self.assertLess(held - contexts, size_mib, "the processes hold more than the contexts plus one copy")


class Bind(DaemonTest):
    def reference_net(self):
        net = TinyNet()
        expected = support.read_model_bytes(self.dirs["net"])
        state = {k: torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(shape).copy())
                 for k, (_, shape, raw) in expected.items()}
        net.load_state_dict(state, strict=False)
        return net.eval()

    def test_bind_is_zero_copy_keeps_ties_and_computes_as_the_files(self):
        ids = torch.tensor([[1, 2, 3, 9]])
        with torch.no_grad():
            want = self.reference_net()(ids)
        with self.client.acquire("net") as lease:
            net = TinyNet().eval()
            report = weightd.bind(net, lease)
            self.assertEqual(report.missing, [])
            self.assertEqual(report.unexpected, [])
            self.assertIs(net.head.weight, net.embed.weight, "the tie was broken")
            self.assertEqual(net.embed.weight.data_ptr(), lease.tensors["embed.weight"].data_ptr())
            self.assertFalse(net.embed.weight.requires_grad)
            with torch.no_grad():
                got = net(ids)
            self.assertTrue(torch.equal(got, want))

    def test_a_module_built_on_the_meta_device_binds(self):
        with self.client.acquire("net") as lease:
            with weightd.transformers.empty_weights():  # parameters on meta, no memory
                net = TinyNet()
            self.assertEqual(net.embed.weight.device.type, "meta")
            weightd.bind(net, lease)
            self.assertEqual(net.embed.weight.device.type, "cpu")
            with torch.no_grad():
                out = net(torch.tensor([[4]]))
            self.assertTrue(torch.isfinite(out).all())

    def test_strict_bind_names_every_problem_at_once_and_changes_nothing(self):
        class Other(TinyNet):
            def __init__(self):
                super().__init__()
                self.extra = torch.nn.Linear(2, 2)
                self.body[0] = torch.nn.Linear(8, 4)  # a wrong shape
                self.body[2] = torch.nn.LayerNorm(4)
                self.head = torch.nn.Linear(4, 10, bias=False)

        with self.client.acquire("net") as lease:
            net = Other()
            before = {k: v.clone() for k, v in net.state_dict().items()}
            with self.assertRaises(weightd.BindError) as ctx:
                weightd.bind(net, lease)
            e = ctx.exception
            self.assertIsInstance(e, weightd.InvalidArgument)
            self.assertIn("extra.weight", e.missing)
            self.assertIn("head.weight", e.missing)
            self.assertEqual(e.unexpected, [])
            self.assertTrue(any(m.startswith("body.0.weight: [8, 8] float32 vs expected [4, 8]") for m in e.mismatched),
                            e.mismatched)
            for k, v in net.state_dict().items():
                self.assertTrue(torch.equal(v, before[k]), f"{k} changed by a refused bind")
            tensors = dict(lease.tensors)
            tensors["stray"] = torch.zeros(1)
            net = TinyNet()
            with self.assertRaises(weightd.BindError) as ctx:
                weightd.bind(net, tensors)
            self.assertEqual(ctx.exception.unexpected, ["stray"])
            report = weightd.bind(net, tensors, strict=False)
            self.assertEqual(report.unexpected, ["stray"])
            self.assertIn("embed.weight", report.bound)


class DLPack(DaemonTest):
    def test_numpy_takes_the_tensors_through_dlpack_without_a_copy(self):
        with self.client.acquire("big") as lease:
            t = lease.tensors["w.2"]
            a = np.from_dlpack(t)
            self.assertEqual(a.__array_interface__["data"][0], t.data_ptr())
            self.assertTrue(np.array_equal(a, t.numpy()))

    def test_lease_numpy_is_zero_copy_and_read_only(self):
        with self.client.acquire("many") as lease:
            raw = lease.numpy(as_bytes=True)
            expected = support.read_model_bytes(self.dirs["many"])
            for name, (_, _, data) in expected.items():
                self.assertEqual(raw[name].tobytes(), data, name)
            if self._has_ml_dtypes():
                self.assertEqual(lease.numpy()["t.3.bf16"].tobytes(), expected["t.3.bf16"][2])
            else:  # numpy has no bfloat16 of its own
                with self.assertRaises(weightd.InvalidArgument) as ctx:
                    lease.numpy()
                self.assertEqual(ctx.exception.reason, "python.unsupported_dtype")
                self.assertIn("'t.3.bf16' (BF16)", ctx.exception.message)
        with self.client.acquire("big") as lease:
            arrays = lease.numpy()
            a = arrays["w.0"]
            self.assertEqual(a.dtype, np.float32)
            self.assertEqual(a.shape, (1024, 2048))
            self.assertFalse(a.flags.writeable)
            with self.assertRaises(ValueError):
                a[0, 0] = 1.0
            self.assertEqual(a.__array_interface__["data"][0], lease.tensors["w.0"].data_ptr())

    @staticmethod
    def _has_ml_dtypes():
        try:
            import ml_dtypes  # noqa: F401
            return True
        except ImportError:
            return False


class Errors(DaemonTest):
    def test_errors_are_typed_with_code_and_reason(self):
        with self.assertRaises(weightd.NotFound) as ctx:
            self.client.acquire("no-such-model")
        self.assertIsInstance(ctx.exception, weightd.Error)
        self.assertIsInstance(ctx.exception, LookupError)
        self.assertEqual(ctx.exception.code, "NotFound")
        self.assertEqual(ctx.exception.reason, "catalog.unknown_model")
        self.assertIn("no-such-model", str(ctx.exception))

    def test_bad_input_raises_clear_errors(self):
        with self.assertRaises(weightd.InvalidArgument) as ctx:
            self.client.acquire("many", device="tpu:0")
        self.assertEqual(ctx.exception.reason, "client.bad_device")
        with self.assertRaises(weightd.NotFound) as ctx:
            self.client.acquire("many", tensors=["t.0.f64", "nope"])
        self.assertEqual(ctx.exception.reason, "acquire.unknown_tensor")
        self.assertIn("nope", ctx.exception.message)
        with self.assertRaises(weightd.InvalidArgument):
            self.client.acquire("many", tensors=[])
        with self.assertRaises(weightd.InvalidArgument):
            weightd.connect(self.daemon.endpoint, timeout=-1)
        lease = self.client.acquire("many")
        lease.release()
        with self.assertRaises(weightd.FailedPrecondition) as ctx:
            lease.tensors
        self.assertEqual(ctx.exception.reason, "python.released")
        lease.release()  # idempotent

    def test_no_daemon_is_unavailable(self):
        with self.assertRaises(weightd.Unavailable) as ctx:
            weightd.connect(os.path.join(self.daemon.dir, "nobody.sock"), timeout=0.3)
        self.assertEqual(ctx.exception.reason, "client.no_daemon")

    def test_a_daemon_that_died_mid_use_raises_unavailable_not_a_hang(self):
        d = support.Daemon({"net": self.dirs["net"]})
        try:
            c = weightd.connect(d.endpoint, timeout=1.0, request_timeout=300)
            lease = c.acquire("net")
            t = lease.tensors["embed.weight"]
            d.kill()
            start = time.monotonic()
            with self.assertRaises(weightd.Unavailable) as ctx:
                c.list()
            self.assertLess(time.monotonic() - start, 60, "list() waited far beyond the connect timeout")
            self.assertEqual(ctx.exception.reason, "client.no_daemon")
            self.assertTrue(torch.isfinite(t).all(), "the mapping must outlive the daemon")
            del t, lease
            c.close()
        finally:
            d.close()

    def test_a_model_the_user_may_not_see_is_permission_denied(self):
        nobody = pwd.getpwnam("nobody")
        if os.getuid() != 0:
            self.skipTest("needs root to run a child as another user")
        config = f"""
[daemon]
client_group = "{grp.getgrgid(nobody.pw_gid).gr_name}"
[models.open]
path = "{self.dirs['net']}"
[models.secret]
path = "{self.dirs['net']}"
allow_users = ["root"]
"""
        d = support.Daemon({}, config=config, world_readable=True)
        try:
            os.chmod(d.dir, 0o755)
            code = r"""
import weightd
c = weightd.connect()
with c.acquire("open") as lease:
    assert len(lease.tensors) > 0
try:
    c.acquire("secret")
except weightd.PermissionDenied as e:
    print("denied", e.reason)
try:
    c.stats()
except weightd.PermissionDenied as e:
    print("admin", e.reason)
"""
            r = support.python_child(code, env={"WEIGHTD_SOCKET": d.endpoint}, user=nobody.pw_uid)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("denied auth.model_denied", r.stdout)
            self.assertIn("admin auth.admin_only", r.stdout)
        finally:
            d.close()

    def test_blocking_calls_release_the_gil(self):
        ticks = []
        stop = threading.Event()

        def count():
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.001)

        t = threading.Thread(target=count)
        t.start()
        try:
            before = len(ticks)
            with self.assertRaises(weightd.Unavailable):
                weightd.connect(os.path.join(self.daemon.dir, "nobody.sock"), timeout=0.5)
            during = len(ticks) - before
        finally:
            stop.set()
            t.join()
        self.assertGreater(during, 20, "another thread did not run while connect() waited")


class Writable(DaemonTest):
    def test_a_writable_lease_is_private_copy_on_write(self):
        with self.client.acquire("big", writable=True) as mine:
            self.assertTrue(mine.writable)
            w = mine.tensors["w.3"]
            original = w[0, :4].clone()
            w[0, :4] += 1000.0  # in place: the process's own pages
            self.assertTrue(torch.equal(w[0, :4], original + 1000.0))
            with self.client.acquire("big") as shared:
                self.assertTrue(torch.equal(shared.tensors["w.3"][0, :4], original))
            r = self.child('import weightd; print(weightd.connect().acquire("big").tensors["w.3"][0, :4].tolist())')
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(eval(r.stdout), original.tolist())
            maps = [m for m in support.mappings_of() if self.daemon.prefix in m[3]]
            self.assertIn("rw-p", {m[2] for m in maps})

    def test_a_writable_cuda_lease_is_a_private_device_copy(self):
        if not CUDA:
            self.skipTest("no CUDA device (or WEIGHTD_TEST_GPU unset)")
        with self.client.acquire("big", device="cuda:0", writable=True) as mine:
            self.assertEqual(self.leases_of("big"), 0, "a private device copy holds no lease")
            w = mine.tensors["w.3"]
            original = w.clone()
            w.add_(1.0)
            self.assertFalse(torch.equal(w, original))
            with self.client.acquire("big", device="cuda:0") as shared:
                self.assertTrue(torch.equal(shared.tensors["w.3"], original))

    def test_an_in_place_write_to_a_shared_tensor_says_which_tensor_before_the_process_dies(self):
        code = r"""
import torch, weightd
lease = weightd.connect().acquire("net")
t = lease.tensors["body.0.weight"]
t.add_(1.0)
print("survived")
"""
        r = self.child(code)
        self.assertEqual(r.returncode, -signal.SIGSEGV, r.stdout + r.stderr)
        self.assertNotIn("survived", r.stdout)
        self.assertIn("weightd: this process wrote to tensor 'body.0.weight' of model 'net'", r.stderr)


class Processes(DaemonTest):
    def test_fork_after_acquire_breaks_neither_parent_nor_tensors(self):
        # Digests through numpy: torch's own thread pool is not usable in a forked child
        # (OpenMP), which is torch's limitation, not weightd's.
        code = r"""
import hashlib, os, sys, torch, weightd
c = weightd.connect()
lease = c.acquire("big")
t = lease.tensors["w.1"]
digest = lambda: hashlib.sha1(t.numpy().tobytes()).hexdigest()
want = digest()
pid = os.fork()
if pid == 0:
    # The child reads the inherited tensors, cannot use the connection, and exits normally
    # (interpreter teardown drops the inherited Client and Lease).
    print("child: inherited tensor intact", digest() == want, flush=True)
    try:
        c.list()
        print("child: list() worked", flush=True)
    except weightd.FailedPrecondition as e:
        print("child:", e.reason, flush=True)
    c2 = weightd.connect()
    with c2.acquire("net") as own:
        print("child: own lease", len(own.tensors), flush=True)
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("child status", status, flush=True)
assert digest() == want
print("parent leases", c.status("big")["leases"], flush=True)
with c.acquire("big") as again:
    print("parent again", len(again.tensors), flush=True)
"""
        r = self.child(code, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("child: inherited tensor intact True", r.stdout)
        self.assertIn("child: client.forked", r.stdout)
        self.assertIn("child: own lease 6", r.stdout)
        self.assertIn("child status 0", r.stdout)
        self.assertIn("parent leases 1", r.stdout)
        self.assertIn("parent again 6", r.stdout)

    def test_a_dataloader_with_forked_workers_reads_the_weights(self):
        code = r"""
import torch, weightd
from torch.utils.data import DataLoader, Dataset
lease = weightd.connect().acquire("big")
w = lease.tensors["w.5"]
class Rows(Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return w[i].sum()
ctx = torch.multiprocessing.get_context("fork")
got = torch.stack(list(DataLoader(Rows(), batch_size=None, num_workers=2, multiprocessing_context=ctx)))
print(bool(torch.allclose(got, w[:8].sum(dim=1))))
print(weightd.connect().status("big")["leases"])
"""
        r = self.child(code, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(r.stdout.split(), ["True", "1"])

    def test_release_while_tensors_live_keeps_their_memory(self):
        lease = self.client.acquire("big")
        t = lease.tensors["w.0"]
        want = support.read_model_bytes(self.dirs["big"])["w.0"][2]
        lease.release()
        with self.assertRaises(weightd.FailedPrecondition):
            lease.tensors
        gc.collect()
        self.assertEqual(self.leases_of("big"), 1, "the daemon's lease must last while a tensor lives")
        self.assertEqual(support.tensor_bytes(t), want)
        a = np.from_dlpack(t)  # a DLPack consumer keeps it too
        del t
        gc.collect()
        self.assertEqual(self.leases_of("big"), 1)
        self.assertEqual(a.tobytes(), want)
        del a
        self.assertTrue(self.wait_leases("big", 0), "the lease outlived its last tensor")


if __name__ == "__main__":
    unittest.main()
