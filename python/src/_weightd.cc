// _weightd.cc — the compiled half of the Python package: libweightd's Client and Lease for
// Python, with DLPack capsules and buffers over a lease's memory. The pure-Python layer
// (python/weightd/) turns these into torch tensors, numpy arrays and bound modules.
//
// Why DLPack and not LibTorch's C++ API: the extension then links libweightd alone, so one
// build serves every torch version in the process (Debian's 1.13 on the CPU machines, pip's
// 2.x with CUDA on the GPU machine) and never breaks with an engine's torch upgrade; torch,
// numpy, CuPy and JAX all import DLPack without a copy.
//
// Lifetimes: every capsule and buffer holds a copy of the weightd::Lease, so the mapping stays
// until the last tensor over it is freed, whatever the Python Lease object does meanwhile. A
// DLPack deleter may run on any thread without the GIL: it touches no Python object.
//
// GIL: released around every call that talks to the daemon, and around dropping a lease
// (which may wait for the daemon's answer to its Release).

#include <dlpack/dlpack.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "weightd/client.h"

namespace py = pybind11;

namespace weightd::python {
namespace {

// A weightd::Status on its way to Python: translated into weightd.<Code>(message, reason).
struct StatusError {
  weightd::Status status;
};

template <class T>
T Unwrap(Result<T> r) {
  if (!r.ok()) throw StatusError{r.status()};
  return std::move(r).value();
}
void Check(const weightd::Status& s) {
  if (!s.ok()) throw StatusError{s};
}

// weightd.errors' classes by code, looked up once at import (kept for the process's life).
PyObject* g_error_classes[16] = {};

void RaiseStatus(const weightd::Status& s) {
  const auto code = static_cast<std::size_t>(s.code());
  PyObject* cls = code < std::size(g_error_classes) && g_error_classes[code] != nullptr
                      ? g_error_classes[code]
                      : g_error_classes[static_cast<std::size_t>(Code::kInternal)];
  py::object exc = py::reinterpret_borrow<py::object>(cls)(s.message(), s.reason());
  PyErr_SetObject(cls, exc.ptr());
}

std::chrono::milliseconds Millis(double seconds, const char* what) {
  if (!(seconds > 0) || seconds > 1e9)
    throw StatusError{InvalidArgument(std::string(what) + " must be a positive number of seconds, not " +
                                          std::to_string(seconds),
                                      "python.bad_timeout")};
  return std::chrono::milliseconds(static_cast<std::int64_t>(seconds * 1000.0 + 0.5));
}

// ---- leases ---------------------------------------------------------------------------------

// What a Python Lease holds. release() drops the handle; tensors keep their own copies.
class PyLease {
 public:
  explicit PyLease(Lease lease) : lease_(std::move(lease)) {}
  PyLease(const PyLease&) = delete;
  PyLease& operator=(const PyLease&) = delete;
  ~PyLease() {
    // Dropping the last handle may wait for the daemon's answer to Release.
    if (lease_.valid() && Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release nogil;
      lease_.release();
    }
  }

  const Lease& Get() const {
    if (!lease_.valid())
      throw StatusError{FailedPrecondition("this lease was released; acquire the model again", "python.released")};
    return lease_;
  }
  bool valid() const { return lease_.valid(); }
  void Release() {
    Lease dropped = std::move(lease_);
    lease_ = Lease();
    py::gil_scoped_release nogil;
    dropped.release();
  }

  const Tensor& At(std::size_t index) const {
    const auto& ts = Get().tensors();
    if (index >= ts.size())
      throw StatusError{InvalidArgument("tensor index " + std::to_string(index) + " out of range (" +
                                            std::to_string(ts.size()) + " tensors)",
                                        "python.bad_index")};
    return ts[index];
  }

 private:
  Lease lease_;
};

// One DLPack export: the DLManagedTensor, its shape, and the lease that keeps the memory.
struct Export {
  DLManagedTensor managed{};
  std::vector<std::int64_t> shape;
  Lease lease;
};

void DeleteExport(DLManagedTensor* self) { delete static_cast<Export*>(self->manager_ctx); }

// A capsule the consumer never took frees its export; a taken one is renamed "used_dltensor"
// and freed by the consumer through the deleter.
void CapsuleDestructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "used_dltensor")) return;
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    return;
  }
  managed->deleter(managed);
}

// A DLPack capsule over tensor `index`: as (code, bits) elements in `shape`, which must cover
// exactly the tensor's bytes (the Python layer views sub-byte and exotic dtypes as bytes).
py::capsule DLPackOf(const PyLease& self, std::size_t index, int code, int bits, std::vector<std::int64_t> shape) {
  const Lease& lease = self.Get();
  const Tensor& t = self.At(index);
  if (bits <= 0 || bits % 8 != 0 || code < 0 || code > 255)
    throw StatusError{InvalidArgument("DLPack element of code " + std::to_string(code) + " and " +
                                          std::to_string(bits) + " bits",
                                      "python.bad_dlpack_type")};
  std::uint64_t elements = 1;
  for (std::int64_t d : shape) {
    if (d < 0) throw StatusError{InvalidArgument("negative dimension", "python.bad_shape")};
    elements *= static_cast<std::uint64_t>(d);
  }
  if (elements * static_cast<std::uint64_t>(bits / 8) != t.nbytes)
    throw StatusError{InvalidArgument("a view of tensor '" + t.name + "' (" + std::to_string(t.nbytes) +
                                          " bytes) as " + std::to_string(elements) + " elements of " +
                                          std::to_string(bits) + " bits",
                                      "python.bad_shape")};
  auto ex = std::make_unique<Export>();
  ex->shape = std::move(shape);
  ex->lease = lease;
  DLTensor& dl = ex->managed.dl_tensor;
  dl.data = const_cast<std::byte*>(t.data);
  dl.device = lease.cuda_device() >= 0 ? DLDevice{kDLCUDA, lease.cuda_device()} : DLDevice{kDLCPU, 0};
  dl.ndim = static_cast<std::int32_t>(ex->shape.size());
  dl.dtype = DLDataType{static_cast<std::uint8_t>(code), static_cast<std::uint8_t>(bits), 1};
  dl.shape = ex->shape.data();
  dl.strides = nullptr;  // compact, row-major
  dl.byte_offset = 0;
  ex->managed.manager_ctx = ex.get();
  ex->managed.deleter = DeleteExport;
  DLManagedTensor* managed = &ex->managed;
  PyObject* capsule = PyCapsule_New(managed, "dltensor", CapsuleDestructor);
  if (capsule == nullptr) throw py::error_already_set();
  ex.release();
  return py::reinterpret_steal<py::capsule>(capsule);
}

// A host tensor's bytes through the buffer protocol (read-only unless the lease is writable),
// for numpy.frombuffer; the buffer object keeps the lease.
struct HostBuffer {
  Lease lease;
  const Tensor* tensor;
};

HostBuffer BufferOf(const PyLease& self, std::size_t index) {
  const Lease& lease = self.Get();
  if (lease.cuda_device() >= 0)
    throw StatusError{InvalidArgument("the tensors of a lease on " + lease.device() +
                                          " are in GPU memory; numpy needs a cpu lease (or use DLPack with CuPy)",
                                      "python.not_host_memory")};
  return HostBuffer{lease, &self.At(index)};
}

// ---- the client -----------------------------------------------------------------------------

py::dict GpuCopyDict(const GpuCopyInfo& g) {
  py::dict d;
  d["device"] = g.device;
  d["uuid"] = g.uuid;
  d["state"] = g.state;
  d["bytes"] = g.bytes;
  d["leases"] = g.leases;
  d["copy_ms"] = g.copy_ms;
  d["h2d_us"] = g.h2d_us;
  d["idle_ms"] = g.idle_ms;
  d["last_error"] = g.last_error.ok() ? py::object(py::none()) : py::object(py::str(g.last_error.ToString()));
  return d;
}

py::dict ModelDict(const ModelInfo& m) {
  py::dict d;
  d["name"] = m.name;
  d["dir"] = m.dir;
  d["state"] = m.state;
  d["shards"] = m.shards;
  d["tensors"] = m.tensors;
  d["bytes"] = m.bytes;
  d["resident_bytes"] = m.resident_bytes;
  d["leases"] = m.leases;
  d["loads"] = m.loads;
  d["last_load_ms"] = m.last_load_ms;
  d["idle_ms"] = m.idle_ms;
  d["last_error"] = m.last_error.ok() ? py::object(py::none()) : py::object(py::str(m.last_error.ToString()));
  py::list gpus;
  for (const auto& g : m.gpus) gpus.append(GpuCopyDict(g));
  d["gpus"] = gpus;
  d["pinned"] = m.pinned;
  d["priority"] = m.priority;
  d["loaded_bytes"] = m.loaded_bytes;
  d["waiting_for"] = m.waiting_for;
  return d;
}

py::dict StatsDict(const DaemonStats& s) {
  py::dict d;
  d["daemon_version"] = s.daemon_version;
  d["uptime_ms"] = s.uptime_ms;
  d["sessions"] = s.sessions;
  d["leases"] = s.leases;
  d["host_resident_bytes"] = s.host_resident_bytes;
  d["bytes_read_from_disk"] = s.bytes_read_from_disk;
  d["loads_ok"] = s.loads_ok;
  d["loads_failed"] = s.loads_failed;
  d["requests"] = s.requests;
  d["malformed_requests"] = s.malformed_requests;
  py::list models;
  for (const auto& m : s.models) models.append(ModelDict(m));
  d["models"] = models;
  py::list gpus;
  for (const auto& g : s.gpus) {
    py::dict gd;
    gd["device"] = g.device;
    gd["uuid"] = g.uuid;
    gd["name"] = g.name;
    gd["total_bytes"] = g.total_bytes;
    gd["resident_bytes"] = g.resident_bytes;
    gd["copies"] = g.copies;
    gd["leases"] = g.leases;
    gd["budget_bytes"] = g.budget_bytes;
    gpus.append(gd);
  }
  d["gpus"] = gpus;
  d["gpu_unavailable"] = s.gpu_unavailable;
  d["host_budget_bytes"] = s.host_budget_bytes;
  d["host_total_bytes"] = s.host_total_bytes;
  d["ready"] = s.ready;
  d["ready_ms"] = s.ready_ms;
  d["metrics"] = s.metrics;
  return d;
}

class PyClient {
  // Helpers first: members with deduced return types must be defined before their use.
  Client& Get() {
    if (!client_) throw StatusError{FailedPrecondition("this Client was closed", "python.closed")};
    return *client_;
  }
  template <class F>
  auto Call(F&& f) {
    Client& c = Get();
    auto r = [&] {
      py::gil_scoped_release nogil;
      return f(c);
    }();
    return Unwrap(std::move(r));
  }
  void Drop() {
    if (!client_) return;
    std::optional<Client> dropped = std::move(client_);
    client_.reset();
    if (Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release nogil;
      dropped.reset();
    }
  }

 public:
  PyClient(const std::string& endpoint, double timeout, double request_timeout, const std::string& name,
           int prepare_cuda_device) {
    ClientOptions o;
    o.endpoint = endpoint;
    o.client_name = name;
    o.connect_timeout = Millis(timeout, "timeout");
    o.request_timeout = Millis(request_timeout, "request_timeout");
    o.prepare_cuda_device = prepare_cuda_device;
    Result<Client> c = [&] {
      py::gil_scoped_release nogil;
      return Client::Connect(std::move(o));
    }();
    client_.emplace(Unwrap(std::move(c)));
  }
  PyClient(const PyClient&) = delete;
  PyClient& operator=(const PyClient&) = delete;
  ~PyClient() { Drop(); }

  // Ends this handle's connection; leases keep theirs (and the connection) until they go.
  void Close() { Drop(); }
  bool closed() const { return !client_.has_value(); }

  std::unique_ptr<PyLease> Acquire(const std::string& model, const std::string& device,
                                   std::vector<std::string> tensors, bool writable) {
    AcquireOptions o;
    o.device = device;
    o.tensor_filter = std::move(tensors);
    o.writable = writable;
    Client& c = Get();
    Result<Lease> r = [&] {
      py::gil_scoped_release nogil;
      return c.Acquire(model, o);
    }();
    return std::make_unique<PyLease>(Unwrap(std::move(r)));
  }

  py::list List() {
    Client& c = Get();
    auto r = [&] {
      py::gil_scoped_release nogil;
      return c.List();
    }();
    py::list out;
    for (const auto& m : Unwrap(std::move(r))) out.append(ModelDict(m));
    return out;
  }
  py::dict Status(const std::string& model) { return ModelDict(Call([&](Client& c) { return c.Status(model); })); }
  py::dict Load(const std::string& model) { return ModelDict(Call([&](Client& c) { return c.Load(model); })); }
  void Evict(const std::string& model, const std::string& device) {
    Client& c = Get();
    weightd::Status s = [&] {
      py::gil_scoped_release nogil;
      return c.Evict(model, device);
    }();
    Check(s);
  }
  py::dict Stats() { return StatsDict(Call([&](Client& c) { return c.Stats(); })); }
  std::uint64_t reconnects() const { return client_ ? client_->reconnects() : 0; }

 private:
  std::optional<Client> client_;
};

py::tuple TensorInfo(const Tensor& t, std::size_t index) {
  return py::make_tuple(t.name, std::string(DTypeName(t.dtype)), py::tuple(py::cast(t.shape)), t.nbytes,
                        reinterpret_cast<std::uintptr_t>(t.data), t.shard, t.offset, index);
}

}  // namespace
}  // namespace weightd::python

PYBIND11_MODULE(_weightd, m) {
  using namespace weightd::python;
  using weightd::Code;
  m.doc() = "The compiled core of the weightd package; use the `weightd` module instead.";

  py::module_ errors = py::module_::import("weightd.errors");
  const std::pair<Code, const char*> classes[] = {
      {Code::kInvalidArgument, "InvalidArgument"},   {Code::kNotFound, "NotFound"},
      {Code::kPermissionDenied, "PermissionDenied"}, {Code::kResourceExhausted, "ResourceExhausted"},
      {Code::kFailedPrecondition, "FailedPrecondition"}, {Code::kUnavailable, "Unavailable"},
      {Code::kDataLoss, "DataLoss"},                 {Code::kInternal, "Internal"},
      {Code::kDeadlineExceeded, "DeadlineExceeded"},
  };
  for (const auto& [code, name] : classes) {
    py::object cls = errors.attr(name);
    g_error_classes[static_cast<std::size_t>(code)] = cls.release().ptr();  // kept for the process
  }
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      RaiseStatus(e.status);
    } catch (const weightd::Error& e) {
      RaiseStatus(e.status());
    }
  });

  py::class_<PyClient>(m, "_Client")
      .def(py::init<const std::string&, double, double, const std::string&, int>(), py::arg("endpoint"),
           py::arg("timeout"), py::arg("request_timeout"), py::arg("name"), py::arg("prepare_cuda_device"))
      .def("acquire", &PyClient::Acquire, py::arg("model"), py::arg("device"), py::arg("tensors"),
           py::arg("writable"))
      .def("list", &PyClient::List)
      .def("status", &PyClient::Status, py::arg("model"))
      .def("load", &PyClient::Load, py::arg("model"))
      .def("evict", &PyClient::Evict, py::arg("model"), py::arg("device"))
      .def("stats", &PyClient::Stats)
      .def("close", &PyClient::Close)
      .def_property_readonly("closed", &PyClient::closed)
      .def_property_readonly("reconnects", &PyClient::reconnects);

  py::class_<PyLease>(m, "_Lease")
      .def_property_readonly("valid", &PyLease::valid)
      .def_property_readonly("id", [](const PyLease& l) { return l.Get().id(); })
      .def_property_readonly("model", [](const PyLease& l) { return l.Get().model(); })
      .def_property_readonly("device", [](const PyLease& l) { return l.Get().device(); })
      .def_property_readonly("cuda_device", [](const PyLease& l) { return l.Get().cuda_device(); })
      .def_property_readonly("gpu_uuid", [](const PyLease& l) { return l.Get().gpu_uuid(); })
      .def_property_readonly("model_dir", [](const PyLease& l) { return l.Get().model_dir(); })
      .def_property_readonly("writable", [](const PyLease& l) { return l.Get().writable(); })
      .def_property_readonly("total_bytes", [](const PyLease& l) { return l.Get().total_bytes(); })
      .def_property_readonly("attach_seconds",
                             [](const PyLease& l) { return static_cast<double>(l.Get().attach_time().count()) / 1e6; })
      .def("tensor_info",
           [](const PyLease& l) {
             const auto& ts = l.Get().tensors();
             py::list out;
             for (std::size_t i = 0; i < ts.size(); ++i) out.append(TensorInfo(ts[i], i));
             return out;
           })
      .def("shards",
           [](const PyLease& l) {
             py::list out;
             for (const auto& s : l.Get().shards()) out.append(py::make_tuple(s.file, s.file_data_offset, s.data_size));
             return out;
           })
      .def("dlpack", &DLPackOf, py::arg("index"), py::arg("code"), py::arg("bits"), py::arg("shape"))
      .def("buffer", &BufferOf, py::arg("index"))
      .def("release", &PyLease::Release);

  py::class_<HostBuffer>(m, "_HostBuffer", py::buffer_protocol())
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(const_cast<std::byte*>(b.tensor->data), 1, "B", 1,
                               {static_cast<py::ssize_t>(b.tensor->nbytes)}, {1}, /*readonly=*/!b.lease.writable());
      });

  m.def("explain_write_faults", &weightd::ExplainWriteFaults,
        "Installs the SIGSEGV handler that names the tensor a process wrote to (see ExplainWriteFaults).");
  m.attr("DEFAULT_SOCKET") = weightd::kDefaultEndpoint;
  m.attr("DLPACK_CPU") = static_cast<int>(kDLCPU);
  m.attr("DLPACK_CUDA") = static_cast<int>(kDLCUDA);
}
