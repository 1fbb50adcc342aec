// The cache policy's pure decisions (cached/policy.h) and the metrics text format.
#include "policy.h"

#include <gtest/gtest.h>

#include "config.h"
#include "metrics.h"

namespace weightd::policy {
namespace {

using namespace std::chrono_literals;

Clock::TimePoint At(int seconds) { return Clock::TimePoint(std::chrono::seconds(seconds)); }

Copy C(std::string name, std::uint64_t bytes, int last_used, bool evictable = true, int priority = 0) {
  Copy c;
  c.model = std::move(name);
  c.bytes = bytes;
  c.evictable = evictable;
  c.priority = priority;
  c.last_used = At(last_used);
  return c;
}

TEST(Policy, AdmitsWithoutEvictionWhenItFits) {
  std::vector<Copy> copies{C("a", 10, 1)};
  Admission a = Admit(copies, 10, 1, 5, 0, 20, 0);
  EXPECT_TRUE(a.fits);
  EXPECT_TRUE(a.victims.empty());
}

TEST(Policy, EvictsLeastRecentlyUsedFirstAndOnlyWhatIsNeeded) {
  std::vector<Copy> copies{C("a", 10, 3), C("b", 10, 1), C("c", 10, 2)};
  Admission a = Admit(copies, 30, 3, 10, 0, 30, 0);
  ASSERT_TRUE(a.fits);
  EXPECT_EQ(a.victims, (std::vector<std::size_t>{1}));  // b, the oldest
  EXPECT_EQ(a.freed, 10u);
  a = Admit(copies, 30, 3, 20, 0, 30, 0);
  ASSERT_TRUE(a.fits);
  EXPECT_EQ(a.victims, (std::vector<std::size_t>{1, 2}));  // b, then c
}

TEST(Policy, LowerPriorityFirstAndNeverAboveTheNewcomers) {
  std::vector<Copy> copies{C("old-important", 10, 1, true, 5), C("new-cheap", 10, 9, true, -1)};
  Admission a = Admit(copies, 20, 2, 10, 0, 20, 0);
  ASSERT_TRUE(a.fits);
  EXPECT_EQ(a.victims, (std::vector<std::size_t>{1}));
  // A newcomer of priority 0 may not evict the priority-5 model even when that is all there is.
  std::vector<Copy> only{C("important", 10, 1, true, 5)};
  EXPECT_FALSE(Admit(only, 10, 1, 10, 0, 10, 0).fits);
  EXPECT_TRUE(Admit(only, 10, 1, 10, 5, 10, 0).fits);
}

TEST(Policy, NothingIsEvictedWhenEvictingEverythingAllowedIsNotEnough) {
  std::vector<Copy> copies{C("a", 10, 1), C("leased", 10, 0, false)};
  Admission a = Admit(copies, 20, 2, 15, 0, 20, 0);
  EXPECT_FALSE(a.fits);
  EXPECT_TRUE(a.victims.empty());
  EXPECT_FALSE(Admit({}, 0, 0, 21, 0, 20, 0).fits);  // larger than the budget
}

TEST(Policy, TheWarmPoolCapCountsCopies) {
  std::vector<Copy> copies{C("a", 1, 2), C("b", 1, 1)};
  Admission a = Admit(copies, 2, 2, 1, 0, 100, 2);
  ASSERT_TRUE(a.fits);
  EXPECT_EQ(a.victims, (std::vector<std::size_t>{1}));
}

TEST(Policy, TheLeastFrequentlyUsedGoesFirstAndRecencyBreaksTies) {
  std::vector<Copy> copies{C("hot", 10, 1), C("cold", 10, 3), C("warm", 10, 2), C("cold2", 10, 4)};
  copies[0].frequency = 9;
  copies[1].frequency = 1;
  copies[2].frequency = 5;
  copies[3].frequency = 1;
  // hot is the least recently used, but the most frequently: it goes last.
  EXPECT_EQ(EvictionOrder(copies, 0), (std::vector<std::size_t>{1, 3, 2, 0}));
  Admission a = Admit(copies, 40, 4, 10, 0, 40, 0);
  ASSERT_TRUE(a.fits);
  EXPECT_EQ(a.victims, std::vector<std::size_t>{1});
  // Priority still comes first.
  copies[0].priority = -1;
  EXPECT_EQ(EvictionOrder(copies, 0).front(), 0u);
}

TEST(Frequency, CountsHalveEveryPeriodAndForgetNamesThatReachZero) {
  Frequency f(/*period=*/10);
  for (int i = 0; i < 6; ++i) f.Record("a");
  for (int i = 0; i < 3; ++i) f.Record("b");
  EXPECT_EQ(f.Count("a"), 6u);
  EXPECT_EQ(f.Count("b"), 3u);
  EXPECT_EQ(f.Count("never"), 0u);
  f.Record("c");  // the 10th access: every count is halved
  EXPECT_EQ(f.halvings(), 1u);
  EXPECT_EQ(f.Count("a"), 3u);
  EXPECT_EQ(f.Count("b"), 1u);
  EXPECT_EQ(f.Count("c"), 0u);
  EXPECT_EQ(f.names(), 2u) << "c's count reached 0: forgotten";
}

TEST(Frequency, RemembersAtMostMaxNames) {
  Frequency f(/*period=*/1'000'000, /*max_names=*/4);
  for (int i = 0; i < 100; ++i) f.Record("n" + std::to_string(i));
  EXPECT_LE(f.names(), 4u);
  for (int i = 0; i < 8; ++i) f.Record("hot");
  for (int i = 0; i < 100; ++i) f.Record("m" + std::to_string(i));
  EXPECT_LE(f.names(), 4u);
  EXPECT_GT(f.Count("hot"), 0u) << "a hot name outlives the one-offs";
}

TEST(Policy, ExpiredHonoursEachCopysTtl) {
  std::vector<Copy> copies{C("a", 1, 0), C("b", 1, 0), C("c", 1, 0, false), C("d", 1, 0)};
  copies[0].idle_ttl = 10s;
  copies[1].idle_ttl = 60s;
  copies[2].idle_ttl = 10s;  // leased
  copies[3].idle_ttl = 0s;   // no TTL
  EXPECT_TRUE(Expired(copies, At(9)).empty());
  EXPECT_EQ(Expired(copies, At(10)), (std::vector<std::size_t>{0}));
  EXPECT_EQ(Expired(copies, At(61)), (std::vector<std::size_t>{0, 1}));
}

TEST(Policy, RelieveGivesBackAtLeastTheExcess) {
  std::vector<Copy> copies{C("a", 10, 3), C("b", 10, 1), C("c", 10, 2, false)};
  EXPECT_EQ(Relieve(copies, 5), (std::vector<std::size_t>{1}));
  EXPECT_EQ(Relieve(copies, 15), (std::vector<std::size_t>{1, 0}));
  EXPECT_EQ(Relieve(copies, 100), (std::vector<std::size_t>{1, 0}));  // all it may
  EXPECT_TRUE(Relieve(copies, 0).empty());
}

TEST(Budget, ParsesBytesAndShares) {
  EXPECT_EQ(ParseBudget("64GiB")->bytes, 64ull << 30);
  EXPECT_DOUBLE_EQ(ParseBudget("80%")->fraction, 0.8);
  EXPECT_FALSE(ParseBudget("0%").ok());
  EXPECT_FALSE(ParseBudget("120%").ok());
  EXPECT_EQ((Budget{0, 0.5}).Resolve(1000), 500u);
  EXPECT_EQ((Budget{300, 0}).Resolve(1000), 300u);
  EXPECT_EQ((Budget{3000, 0}).Resolve(1000), 1000u);
  EXPECT_EQ((Budget{0, 0}).Resolve(1000), 1000u);
}

TEST(Metrics, WritesTheTextFormat) {
  metrics::Writer w;
  w.Family("x_total", "counter", "Things.");
  w.Sample("x_total", {{"model", "a\"b\\c\nd"}}, 12345678901234);
  metrics::Histogram h({0.1, 1});
  h.Observe(0.05);
  h.Observe(0.1);
  h.Observe(5);
  w.Family("d_seconds", "histogram", "Durations.");
  w.HistogramSamples("d_seconds", {{"tier", "host"}}, h);
  EXPECT_EQ(w.text(),
            "# HELP x_total Things.\n# TYPE x_total counter\n"
            "x_total{model=\"a\\\"b\\\\c\\nd\"} 12345678901234\n"
            "# HELP d_seconds Durations.\n# TYPE d_seconds histogram\n"
            "d_seconds_bucket{tier=\"host\",le=\"0.1\"} 2\n"
            "d_seconds_bucket{tier=\"host\",le=\"1\"} 2\n"
            "d_seconds_bucket{tier=\"host\",le=\"+Inf\"} 3\n"
            "d_seconds_sum{tier=\"host\"} 5.15\n"
            "d_seconds_count{tier=\"host\"} 3\n");
}

}  // namespace
}  // namespace weightd::policy
