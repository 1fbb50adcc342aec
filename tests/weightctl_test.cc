// weightctl's --json output, as scripts read it: one JSON object, ids as strings (a random
// 64-bit lease id is not exact as a JSON number in jq or JavaScript, which hold doubles).
#include <cstdint>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "support/daemon_process.h"

namespace weightd {
namespace {

constexpr std::uint64_t kExactInDoubles = std::uint64_t{1} << 53;

// Every number in `j`, recursively, is one a double holds exactly; `path` names the culprit.
::testing::AssertionResult NumbersExactInDoubles(const nlohmann::json& j, const std::string& path = "") {
  if (j.is_number_unsigned() && j.get<std::uint64_t>() > kExactInDoubles)
    return ::testing::AssertionFailure() << path << " = " << j.dump() << " is not exact in a double";
  if (j.is_number_integer() && !j.is_number_unsigned() &&
      (j.get<std::int64_t>() > static_cast<std::int64_t>(kExactInDoubles) ||
       j.get<std::int64_t>() < -static_cast<std::int64_t>(kExactInDoubles)))
    return ::testing::AssertionFailure() << path << " = " << j.dump() << " is not exact in a double";
  if (j.is_object() || j.is_array())
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string sub = path + "/" + (j.is_object() ? it.key() : std::to_string(std::distance(j.begin(), it)));
      if (auto r = NumbersExactInDoubles(*it, sub); !r) return r;
    }
  return ::testing::AssertionSuccess();
}

class WeightctlJson : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::WriteModel(models_.file("m"), testing::SmallTensors(4), 3).ok());
    auto d = testing::DaemonProcess::Start({.models = {{"m", models_.file("m")}}});
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
  }

  nlohmann::json Run(const std::vector<std::string>& args) {
    std::vector<std::string> full = {"--json"};
    full.insert(full.end(), args.begin(), args.end());
    int rc = -1;
    const std::string out = daemon_->Weightctl(full, &rc);
    EXPECT_EQ(rc, 0) << out;
    auto j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << out;
    return j;
  }

  testing::TempDir models_;
  std::unique_ptr<testing::DaemonProcess> daemon_;
};

TEST_F(WeightctlJson, LeaseIdIsADecimalString) {
  // Lease ids are random 64-bit numbers: over a few attaches, one is above 2^53 with
  // probability 1 - 2^-40.
  bool above = false;
  for (int i = 0; i < 5; ++i) {
    const auto j = Run({"attach", "m", "--verify"});
    ASSERT_TRUE(j.at("lease_id").is_string()) << j.dump();
    const std::string id = j["lease_id"].get<std::string>();
    ASSERT_FALSE(id.empty());
    EXPECT_EQ(id.find_first_not_of("0123456789"), std::string::npos) << id;
    const std::uint64_t v = std::stoull(id);
    EXPECT_EQ(std::to_string(v), id) << "not the canonical decimal";
    above = above || v > kExactInDoubles;
    EXPECT_TRUE(j.at("verify").at("ok").get<bool>()) << j.dump();
    EXPECT_TRUE(NumbersExactInDoubles(j));
  }
  EXPECT_TRUE(above) << "no lease id above 2^53 in 5 attaches: are ids still random 64-bit numbers?";
}

TEST_F(WeightctlJson, EveryNumberIsExactInADouble) {
  Run({"load", "m"});
  for (const auto& args : std::vector<std::vector<std::string>>{{"list"}, {"status", "m"}, {"stats"}})
    EXPECT_TRUE(NumbersExactInDoubles(Run(args))) << args[0];
}

}  // namespace
}  // namespace weightd
