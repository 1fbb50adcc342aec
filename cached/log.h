// log.h — where the daemon's log lines go, and in what form.
//
// Under journald (the service's stderr is a journal stream) each line starts with its syslog
// priority as a "<N>" prefix, which journald strips and records as PRIORITY=, so that
// `journalctl -p err` and `-p warning` filter; journald adds the timestamps. Anywhere else the
// lines carry a timestamp and the level name. Called once from main(), before any other thread
// logs; not thread-safe itself.
#pragma once

#include <optional>
#include <string_view>

namespace weightd {

// "dev:inode" from $JOURNAL_STREAM, parsed; nullopt when malformed or absent.
struct StreamId {
  unsigned long long dev = 0, ino = 0;
};
std::optional<StreamId> ParseJournalStream(std::string_view value);

// True if stderr is the journal stream that $JOURNAL_STREAM names (systemd.exec(5): compare
// it with fstat() of the fd, since a child may inherit the variable with another stderr).
bool StderrIsJournal();

// Makes the default logger write to stderr in the form above.
void SetUpLogging();

}  // namespace weightd
