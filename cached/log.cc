#include "log.h"

#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstdlib>
#include <memory>
#include <string>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace weightd {
namespace {

// sd-daemon(3)'s "<N>" for each spdlog level.
std::string_view PriorityPrefix(spdlog::level::level_enum l) {
  switch (l) {
    case spdlog::level::critical: return "<2>";  // SD_CRIT
    case spdlog::level::err: return "<3>";       // SD_ERR
    case spdlog::level::warn: return "<4>";      // SD_WARNING
    case spdlog::level::info: return "<6>";      // SD_INFO
    default: return "<7>";                       // SD_DEBUG: debug and trace
  }
}

// %J: the message with its priority prefix. journald reads a prefix at the start of each
// line, so a message that spans lines gets it again after every newline (else its later
// lines would be recorded at the default priority).
class JournalMessage : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    const std::string_view prefix = PriorityPrefix(msg.level);
    dest.append(prefix.data(), prefix.data() + prefix.size());
    for (char c : std::string_view(msg.payload.data(), msg.payload.size())) {
      dest.push_back(c);
      if (c == '\n') dest.append(prefix.data(), prefix.data() + prefix.size());
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<JournalMessage>(); }
};

}  // namespace

std::optional<StreamId> ParseJournalStream(std::string_view v) {
  const auto colon = v.find(':');
  if (colon == std::string_view::npos) return std::nullopt;
  StreamId id;
  const char* end = v.data() + v.size();
  auto [p1, e1] = std::from_chars(v.data(), v.data() + colon, id.dev);
  auto [p2, e2] = std::from_chars(v.data() + colon + 1, end, id.ino);
  if (e1 != std::errc() || p1 != v.data() + colon || colon == 0 || e2 != std::errc() || p2 != end ||
      colon + 1 == v.size())
    return std::nullopt;
  return id;
}

bool StderrIsJournal() {
  const char* env = std::getenv("JOURNAL_STREAM");
  if (env == nullptr) return false;
  const auto id = ParseJournalStream(env);
  struct stat st;
  if (!id || ::fstat(STDERR_FILENO, &st) != 0) return false;
  return static_cast<unsigned long long>(st.st_dev) == id->dev && static_cast<unsigned long long>(st.st_ino) == id->ino;
}

void SetUpLogging() {
  auto logger = spdlog::stderr_color_mt("weightd");
  spdlog::set_default_logger(logger);
  if (StderrIsJournal()) {
    auto f = std::make_unique<spdlog::pattern_formatter>();
    f->add_flag<JournalMessage>('J').set_pattern("%J");
    spdlog::set_formatter(std::move(f));
  } else {
    spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  }
}

}  // namespace weightd
