// libFuzzer target for the configuration parser (cached/config.cc): ApplyToml on arbitrary
// text, then Finalize on what it accepted, and ParseSize and ParseDuration, which also parse
// command-line flags.
//
// The config file is written by root, so this is defence in depth rather than an attack
// surface; but a daemon that crashes, hangs or reads out of bounds on a typo is a bug. The
// seeds (tests/fuzz/corpus/config) are valid and invalid configs and size/duration strings;
// config.dict gives the fuzzer the keys and units.
//
// Properties checked besides the sanitizers (a violation aborts):
//  - every failure is InvalidArgument with a "config." reason: no exception escapes, no
//    other code;
//  - ParseSize never returns more than the documented 9e18 bytes, ParseDuration never a
//    negative duration;
//  - a config that ApplyToml accepted keeps the models sorted and unique.
//
// A finding of this target: toml++ 3.3.0 (Debian 12's) reaches __builtin_unreachable() in
// impl::is_non_ascii_horizontal_whitespace() for some non-ASCII code points outside strings,
// e.g. the 4-byte file "49\xC6\x8E" or `a = 1é` (marzer/tomlplusplus#295, fixed after 3.4.0).
// ApplyToml now refuses any non-ASCII byte before calling toml::parse (\uXXXX escapes remain);
// the seed corpus keeps such inputs so that the guard stays covered.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "config.h"

namespace {

void Check(bool ok) {
  if (!ok) std::abort();
}

void CheckFailure(const weightd::Status& s) {
  Check(s.code() == weightd::Code::kInvalidArgument);
  Check(s.reason().rfind("config.", 0) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);

  weightd::DaemonConfig cfg;
  if (weightd::Status s = weightd::ApplyToml(text, "fuzz.toml", &cfg); s.ok()) {
    for (std::size_t i = 1; i < cfg.models.size(); ++i) Check(cfg.models[i - 1].name < cfg.models[i].name);
    // Finalize derives the shm prefix and fd socket from what the file set.
    if (weightd::Status f = weightd::Finalize(&cfg); !f.ok()) CheckFailure(f);
  } else {
    CheckFailure(s);
  }

  if (auto r = weightd::ParseSize(text); r.ok()) {
    Check(*r <= 9'000'000'000'000'000'000ull);
  } else {
    CheckFailure(r.status());
  }
  if (auto r = weightd::ParseDuration(text); r.ok()) {
    Check(r->count() >= 0);
  } else {
    CheckFailure(r.status());
  }
  return 0;
}
