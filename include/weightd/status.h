// weightd/status.h — the error vocabulary shared by the client library, the shim and the
// daemon.
//
// Contract:
//  - A Status is a value: cheap to copy, immutable after construction, safe to share between
//    threads. An OK status carries no message.
//  - `reason` is a stable, machine-readable tag (for example "safetensors.duplicate_key" or
//    "protocol.version_mismatch"); `message` is for humans and may change between releases.
//    Tests and programs that branch on a particular failure compare `code` and `reason`.
//  - Result<T> holds either a T or a non-OK Status. Accessing value() of an error Result
//    throws weightd::Error; check ok() first.
//  - Everything here is header-only so that the daemon, the client library and programs
//    built with another compiler agree on the layout without exporting symbols.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace weightd {

enum class Code : std::uint8_t {
  kOk = 0,
  kInvalidArgument = 1,     // the caller sent something malformed or impossible
  kNotFound = 2,            // no such model, lease, tensor or file
  kPermissionDenied = 3,    // the peer may not do this
  kResourceExhausted = 4,   // a budget, cap or limit is reached
  kFailedPrecondition = 5,  // the request is valid but the state forbids it (e.g. evict while leased)
  kUnavailable = 6,         // the daemon is unreachable, shutting down or not ready yet
  kDataLoss = 7,            // a file or segment is corrupt or changed
  kInternal = 8,            // a bug or an unexpected system failure
  kDeadlineExceeded = 9,    // a timeout elapsed
};

inline std::string_view CodeName(Code c) {
  switch (c) {
    case Code::kOk: return "OK";
    case Code::kInvalidArgument: return "InvalidArgument";
    case Code::kNotFound: return "NotFound";
    case Code::kPermissionDenied: return "PermissionDenied";
    case Code::kResourceExhausted: return "ResourceExhausted";
    case Code::kFailedPrecondition: return "FailedPrecondition";
    case Code::kUnavailable: return "Unavailable";
    case Code::kDataLoss: return "DataLoss";
    case Code::kInternal: return "Internal";
    case Code::kDeadlineExceeded: return "DeadlineExceeded";
  }
  return "Unknown";
}

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message, std::string reason = {})
      : code_(code), message_(std::move(message)), reason_(std::move(reason)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  const std::string& reason() const { return reason_; }

  // "NotFound: model 'x' is not in the catalog [catalog.unknown_model]"
  std::string ToString() const {
    if (ok()) return "OK";
    std::string s(CodeName(code_));
    s += ": ";
    s += message_;
    if (!reason_.empty()) {
      s += " [";
      s += reason_;
      s += "]";
    }
    return s;
  }

  // Prefixes context ("loading model 'x': ") to the message, keeping code and reason.
  Status WithContext(std::string_view context) const {
    if (ok()) return *this;
    std::string m(context);
    m += ": ";
    m += message_;
    return Status(code_, std::move(m), reason_);
  }

 private:
  Code code_ = Code::kOk;
  std::string message_;
  std::string reason_;
};

inline Status InvalidArgument(std::string m, std::string r = {}) { return {Code::kInvalidArgument, std::move(m), std::move(r)}; }
inline Status NotFound(std::string m, std::string r = {}) { return {Code::kNotFound, std::move(m), std::move(r)}; }
inline Status PermissionDenied(std::string m, std::string r = {}) { return {Code::kPermissionDenied, std::move(m), std::move(r)}; }
inline Status ResourceExhausted(std::string m, std::string r = {}) { return {Code::kResourceExhausted, std::move(m), std::move(r)}; }
inline Status FailedPrecondition(std::string m, std::string r = {}) { return {Code::kFailedPrecondition, std::move(m), std::move(r)}; }
inline Status Unavailable(std::string m, std::string r = {}) { return {Code::kUnavailable, std::move(m), std::move(r)}; }
inline Status DataLoss(std::string m, std::string r = {}) { return {Code::kDataLoss, std::move(m), std::move(r)}; }
inline Status Internal(std::string m, std::string r = {}) { return {Code::kInternal, std::move(m), std::move(r)}; }
inline Status DeadlineExceeded(std::string m, std::string r = {}) { return {Code::kDeadlineExceeded, std::move(m), std::move(r)}; }

// The exception the shim (and Result<T>::value() on error) throws. It carries the Status.
class Error : public std::runtime_error {
 public:
  explicit Error(Status s) : std::runtime_error(s.ToString()), status_(std::move(s)) {}
  const Status& status() const noexcept { return status_; }

 private:
  Status status_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    if (std::get<Status>(v_).ok()) v_ = Status(Code::kInternal, "Result constructed from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }

  T& value() & { Check(); return std::get<T>(v_); }
  const T& value() const& { Check(); return std::get<T>(v_); }
  T&& value() && { Check(); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  void Check() const {
    if (!ok()) throw Error(std::get<Status>(v_));
  }
  std::variant<T, Status> v_;
};

}  // namespace weightd
