// The daemon's log under journald: every line carries its syslog priority ("<N>" prefix, what
// journald records as PRIORITY=), so that `journalctl -p err` filters; checked by what the real
// daemon writes to a stderr announced as a journal stream (JOURNAL_STREAM), and elsewhere.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "log.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd {
namespace {

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// The first line containing `what`, or "".
std::string LineWith(const std::string& log, const std::string& what) {
  for (const auto& l : Lines(log))
    if (l.find(what) != std::string::npos) return l;
  return "";
}

TEST(Log, ParsesJournalStream) {
  auto id = ParseJournalStream("8:1234567");
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(id->dev, 8u);
  EXPECT_EQ(id->ino, 1234567u);
  for (const char* bad : {"", ":", "8:", ":9", "8", "x:9", "8:9x", "8:9:10", "-1:2"})
    EXPECT_FALSE(ParseJournalStream(bad).has_value()) << bad;
}

TEST(Log, UnderJournaldEveryLineCarriesItsPriority) {
  testing::TempDir models;
  ASSERT_TRUE(testing::WriteModel(models.file("good"), testing::SmallTensors(3), 1).ok());
  // A header length beyond the file: the load fails, which the daemon logs as an error.
  ASSERT_EQ(::mkdir(models.file("bad").c_str(), 0755), 0);
  std::ofstream(models.file("bad/model.safetensors"), std::ios::binary) << std::string(8, '\x7f') << "{}";
  auto d = testing::DaemonProcess::Start(
      {.models = {{"good", models.file("good")}, {"bad", models.file("bad")}}, .journal_stream = true});
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  auto c = (*d)->Connect();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_TRUE(c->Acquire("good").ok());
  ASSERT_FALSE(c->Acquire("bad").ok());
  const std::string log = (*d)->Log();

  const std::string failed = LineWith(log, "model 'bad' failed to load");
  EXPECT_EQ(failed.substr(0, 3), "<3>") << failed;
  const std::string loaded = LineWith(log, "model 'good' resident");
  EXPECT_EQ(loaded.substr(0, 3), "<6>") << loaded;
  // journald timestamps the lines itself; the prefix is the whole of the decoration.
  EXPECT_EQ(log.find("] ["), std::string::npos) << log;
  for (const auto& l : Lines(log)) {
    ASSERT_GE(l.size(), 3u) << "a line without a priority: '" << l << "'";
    EXPECT_TRUE(l[0] == '<' && l[1] >= '0' && l[1] <= '7' && l[2] == '>') << "a line without a priority: " << l;
  }
}

TEST(Log, UnderJournaldWarningsAndFatalErrorsHaveTheirPriorities) {
  // An empty catalog is a warning.
  auto d = testing::DaemonProcess::Start({.journal_stream = true});
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  const std::string warned = LineWith((*d)->Log(), "the catalog is empty");
  EXPECT_EQ(warned.substr(0, 3), "<4>") << (*d)->Log();

  // A configuration error ends the daemon with a critical line.
  testing::TempDir dir;
  const std::string path = dir.file("stderr.log");
  struct stat st;
  std::ofstream(dir.file("empty.toml")) << "";
  std::ofstream(path) << "";
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  const std::string cmd = "JOURNAL_STREAM=" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + " " +
                          WEIGHTD_DAEMON_PATH + " --config " + dir.file("empty.toml") + " --socket ipc://" +
                          dir.file("s.sock") + " --model 'no-equals-sign' 2>>" + path;
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), 2);
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  ASSERT_FALSE(text.str().empty());
  EXPECT_EQ(text.str().substr(0, 3), "<2>") << text.str();
}

TEST(Log, ElsewhereLinesCarryTimestampsAndLevelNames) {
  // JOURNAL_STREAM inherited by a process whose stderr is not that stream must be ignored.
  testing::TempDir dir;
  const std::string path = dir.file("stderr.log");
  std::ofstream(dir.file("empty.toml")) << "";
  const std::string cmd = std::string("JOURNAL_STREAM=1:1 ") + WEIGHTD_DAEMON_PATH + " --config " + dir.file("empty.toml") +
                          " --socket ipc://" + dir.file("s.sock") + " --model 'no-equals-sign' 2>" + path;
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str().rfind("[", 0), 0u) << text.str();
  EXPECT_NE(text.str().find("] [critical] "), std::string::npos) << text.str();
  EXPECT_EQ(text.str().find("<2>"), std::string::npos) << text.str();
}

}  // namespace
}  // namespace weightd
