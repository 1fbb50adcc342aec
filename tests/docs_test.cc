// The documents agree with the code: README.md's metrics table lists every metric family the
// daemon serves (and no other), with its type; the protocol version is the same in the
// code, docs/protocol.md and README.md; protocol.md's DType table is weightd/dtype.h's.
#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "protocol.h"
#include "support/daemon_process.h"
#include "weightd/client.h"
#include "weightd/dtype.h"

namespace weightd {
namespace {

std::string ReadSource(const std::string& relative) {
  std::ifstream f(std::string(WEIGHTD_SOURCE_DIR) + "/" + relative);
  std::stringstream s;
  s << f.rdbuf();
  EXPECT_FALSE(s.str().empty()) << relative;
  return s.str();
}

// The text from the line starting with `from` to the next line starting with `until`.
std::string Section(const std::string& text, const std::string& from, const std::string& until) {
  const auto b = text.find("\n" + from);
  if (b == std::string::npos) return "";
  const auto e = text.find("\n" + until, b + 1);
  return text.substr(b, e == std::string::npos ? std::string::npos : e - b);
}

TEST(Docs, ReadmeMetricsTableListsEveryServedMetricWithItsType) {
  auto d = testing::DaemonProcess::Start({});
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  auto c = (*d)->Connect();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto stats = c->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  std::map<std::string, std::string> served;  // family -> type
  const std::regex type_line(R"(# TYPE (weightd_[a-z0-9_]+) ([a-z]+))");
  for (std::sregex_iterator it(stats->metrics.begin(), stats->metrics.end(), type_line), end; it != end; ++it)
    served[(*it)[1]] = (*it)[2];
  ASSERT_GE(served.size(), 20u) << stats->metrics;

  const std::string table = Section(ReadSource("README.md"), "**Metrics.**", "## ");
  ASSERT_FALSE(table.empty()) << "README.md has no **Metrics.** section";
  std::map<std::string, std::string> documented;
  const std::regex row(R"(\n\| `(weightd_[a-z0-9_]+)` \| ([a-z]+) \|)");
  for (std::sregex_iterator it(table.begin(), table.end(), row), end; it != end; ++it) documented[(*it)[1]] = (*it)[2];
  for (const auto& [name, type] : served) {
    ASSERT_TRUE(documented.count(name)) << name << " is served but not in README.md's metrics table";
    EXPECT_EQ(documented[name], type) << name;
  }
  for (const auto& [name, type] : documented) EXPECT_TRUE(served.count(name)) << name << " is documented but not served";
}

TEST(Docs, ProtocolVersionIsTheSameInTheCodeAndTheDocuments) {
  const std::string version = std::to_string(proto::kVersionMajor) + "." + std::to_string(proto::kVersionMinor);
  const std::string protocol = ReadSource("docs/protocol.md");
  EXPECT_EQ(protocol.rfind("# weightd control protocol, version " + version + "\n", 0), 0u);
  EXPECT_NE(protocol.find("This is protocol **" + version + "**"), std::string::npos);
  const std::string readme = ReadSource("README.md");
  const std::regex speaks(R"(speaks (\d+\.\d+))");
  int mentions = 0;
  for (std::sregex_iterator it(readme.begin(), readme.end(), speaks), end; it != end; ++it, ++mentions)
    EXPECT_EQ((*it)[1], version) << "README.md: " << (*it)[0];
  EXPECT_GE(mentions, 1) << "README.md does not say which protocol version this release speaks";
}

TEST(Docs, ProtocolDtypeTableIsDtypeH) {
  const std::string table = Section(ReadSource("docs/protocol.md"), "### 4.4 DType codes", "## 5.");
  ASSERT_FALSE(table.empty());
  std::set<int> seen;
  const std::regex cell(R"(\| (\d+) \| ([A-Z0-9_]+) \| (\d+) )");
  for (std::sregex_iterator it(table.begin(), table.end(), cell), end; it != end; ++it) {
    const int code = std::stoi((*it)[1]);
    ASSERT_TRUE(IsValidDType(static_cast<std::uint8_t>(code))) << (*it)[0];
    const auto t = static_cast<DType>(code);
    EXPECT_EQ(DTypeName(t), (*it)[2].str()) << "code " << code;
    EXPECT_EQ(DTypeBits(t), static_cast<unsigned>(std::stoi((*it)[3]))) << "code " << code;
    seen.insert(code);
  }
  EXPECT_EQ(seen.size(), std::size(kAllDTypes));
}

// "57 54 44 00 03 00 01 00  02 00 ..." as protocol.md prints a frame: the 8-byte header, then
// the body in groups as its one-line examples do (u64 id, i32 variant index, the rest).
std::string DocHex(const std::string& frame) {
  std::string out;
  char buf[4];
  for (std::size_t i = 0; i < frame.size(); ++i) {
    if (i > 0) out += (i == 8 || i == 16 || i == 20) ? "  " : " ";
    std::snprintf(buf, sizeof buf, "%02x", static_cast<unsigned char>(frame[i]));
    out += buf;
  }
  return out;
}

TEST(Docs, ProtocolExamplesAreWhatTheEncoderWrites) {
  const std::string protocol = ReadSource("docs/protocol.md");
  const std::string frames[] = {
      proto::EncodeRequest(proto::Request{2, proto::Heartbeat{}}),
      proto::EncodeRequest(proto::Request{5, proto::Goodbye{}}),
      proto::EncodeRequest(proto::Request{3, proto::Release{0x1122334455667788}}),
      proto::EncodeReply(proto::Reply{2, proto::OkReply{}}),
  };
  for (const std::string& f : frames)
    EXPECT_NE(protocol.find("\n" + DocHex(f) + "\n"), std::string::npos) << "docs/protocol.md lacks " << DocHex(f);
}

}  // namespace
}  // namespace weightd
