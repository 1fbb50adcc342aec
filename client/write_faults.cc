// write_faults.cc — the table of read-only lease mappings and the SIGSEGV/SIGBUS explainer.

#include "write_faults.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>

namespace weightd::write_faults {
namespace {

// One live mapping. `state`: 0 free, 1 being written or cleared, 2 live.
struct Slot {
  std::atomic<int> state{0};
  std::atomic<int> readers{0};
  std::atomic<std::uintptr_t> begin{0};
  std::atomic<std::uintptr_t> end{0};
  std::atomic<const RangeInfo*> info{nullptr};
};

// A process maps one range per shard of each lease it holds; 4096 covers thousands of leases.
constexpr std::size_t kSlots = 4096;
Slot g_slots[kSlots];

std::atomic<bool> g_installed{false};
struct sigaction g_previous_segv;
struct sigaction g_previous_bus;

// An async-signal-safe line builder (no malloc, no stdio).
class Line {
 public:
  Line& operator<<(const char* s) { return Append(s, std::strlen(s)); }
  Line& operator<<(const std::string& s) { return Append(s.data(), s.size()); }
  Line& Append(const char* s, std::size_t n) {
    n = n < sizeof buf_ - len_ ? n : sizeof buf_ - len_;
    std::memcpy(buf_ + len_, s, n);
    len_ += n;
    return *this;
  }
  Line& Hex(std::uintptr_t v) {
    char digits[2 + 2 * sizeof v];
    std::size_t n = 0;
    do {
      digits[n++] = "0123456789abcdef"[v & 0xf];
      v >>= 4;
    } while (v != 0);
    Append("0x", 2);
    while (n > 0) Append(&digits[--n], 1);
    return *this;
  }
  void Write() const {
    std::size_t done = 0;
    while (done < len_) {
      ssize_t w = ::write(STDERR_FILENO, buf_ + done, len_ - done);
      if (w <= 0) return;
      done += static_cast<std::size_t>(w);
    }
  }

 private:
  char buf_[1024];
  std::size_t len_ = 0;
};

// Writes the explanation if `addr` lies in a registered range. Returns whether it did.
bool Explain(int sig, std::uintptr_t addr) {
  for (Slot& s : g_slots) {
    if (s.state.load() != 2) continue;
    s.readers.fetch_add(1);
    bool said = false;
    if (s.state.load() == 2 && addr >= s.begin.load() && addr < s.end.load()) {
      const RangeInfo* info = s.info.load();
      const char* tensor = nullptr;
      std::size_t tensor_len = 0;
      if (info->tensors != nullptr) {
        for (const Tensor& t : *info->tensors) {
          const auto b = reinterpret_cast<std::uintptr_t>(t.data);
          if (addr >= b && addr < b + t.nbytes) {
            tensor = t.name.data();
            tensor_len = t.name.size();
            break;
          }
        }
      }
      Line line;
      line << "weightd: this process wrote to ";
      if (tensor != nullptr) line.Append("tensor '", 8).Append(tensor, tensor_len) << "' of ";
      line << "model '" << info->model << "' (shard " << info->shard_file << ", address ";
      line.Hex(addr) << "), which is the daemon's shared copy, mapped read-only. Ask for a private writable copy "
                        "instead: acquire(..., writable=True) in Python, AcquireOptions::writable in C++, "
                        "shim::Options::private_copy in LibTorch. The process now ends with "
                     << (sig == SIGBUS ? "SIGBUS" : "SIGSEGV") << ".\n";
      line.Write();
      said = true;
    }
    s.readers.fetch_sub(1);
    if (said) return true;
  }
  return false;
}

void Handler(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  // Only a write to a page without write permission is ours to explain.
  if (sig == SIGSEGV && info != nullptr && info->si_code == SEGV_ACCERR)
    Explain(sig, reinterpret_cast<std::uintptr_t>(info->si_addr));
  errno = saved_errno;
  // Hand the signal on: to the previous handler if there was one, else to the default action
  // (returning re-runs the faulting instruction, which now ends the process as before).
  const struct sigaction& prev = sig == SIGBUS ? g_previous_bus : g_previous_segv;
  if ((prev.sa_flags & SA_SIGINFO) != 0 && prev.sa_sigaction != nullptr) {
    prev.sa_sigaction(sig, info, context);
    return;
  }
  if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    prev.sa_handler(sig);
    return;
  }
  struct sigaction dfl{};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(sig, &dfl, nullptr);
}

}  // namespace

std::size_t Register(const std::byte* begin, std::size_t size, const RangeInfo* info) noexcept {
  if (begin == nullptr || size == 0) return 0;
  for (std::size_t i = 0; i < kSlots; ++i) {
    int expected = 0;
    if (!g_slots[i].state.compare_exchange_strong(expected, 1)) continue;
    g_slots[i].begin = reinterpret_cast<std::uintptr_t>(begin);
    g_slots[i].end = reinterpret_cast<std::uintptr_t>(begin) + size;
    g_slots[i].info = info;
    g_slots[i].state = 2;
    return i + 1;
  }
  return 0;
}

void Unregister(std::size_t id) noexcept {
  if (id == 0 || id > kSlots) return;
  Slot& s = g_slots[id - 1];
  s.state = 1;
  while (s.readers.load() != 0) {
  }
  s.begin = 0;
  s.end = 0;
  s.info = nullptr;
  s.state = 0;
}

void Install() noexcept {
  if (g_installed.exchange(true)) return;
  struct sigaction sa{};
  sa.sa_sigaction = Handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGSEGV, &sa, &g_previous_segv);
  ::sigaction(SIGBUS, &sa, &g_previous_bus);
}

}  // namespace weightd::write_faults

namespace weightd {
void ExplainWriteFaults() { write_faults::Install(); }
}  // namespace weightd
