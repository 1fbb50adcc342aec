// The identity and policy rules of cached/auth.h, without sockets: the ZAP stamp's format, the
// groups of a process, and who may connect, acquire and administer.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>

#include "auth.h"
#include "config.h"

namespace weightd::auth {
namespace {

Identity Who(uid_t uid, std::vector<gid_t> groups) {
  Identity id;
  id.known = true;
  id.uid = uid;
  id.gid = groups.empty() ? 60000 : groups[0];
  id.pid = 1234;
  id.groups = std::move(groups);
  id.groups.push_back(id.gid);
  std::sort(id.groups.begin(), id.groups.end());
  id.groups.erase(std::unique(id.groups.begin(), id.groups.end()), id.groups.end());
  return id;
}

TEST(AuthIdentity, ParsesTheStampAndRefusesAnythingElse) {
  auto id = ParseIdentity("1001:100:4242", "27,100,1001");
  ASSERT_TRUE(id.has_value());
  EXPECT_TRUE(id->known);
  EXPECT_EQ(id->uid, 1001u);
  EXPECT_EQ(id->gid, 100u);
  EXPECT_EQ(id->pid, 4242);
  EXPECT_EQ(id->groups, (std::vector<gid_t>{27, 100, 1001}));
  EXPECT_TRUE(id->InGroup(27));
  EXPECT_FALSE(id->InGroup(28));
  auto no_groups = ParseIdentity("0:0:1", "");
  ASSERT_TRUE(no_groups.has_value());
  EXPECT_EQ(no_groups->groups, (std::vector<gid_t>{0}));  // the primary group always counts
  for (const char* bad : {"", "1001", "1001:100", "a:100:1", "1001:100:1:2", "1001::1", "1001:100:-1", " 1:2:3"})
    EXPECT_FALSE(ParseIdentity(bad, "").has_value()) << bad;
  EXPECT_FALSE(ParseIdentity("1:2:3", "4,,5").has_value());
  EXPECT_FALSE(ParseIdentity("1:2:3", "x").has_value());
  EXPECT_FALSE(Identity{}.InGroup(0)) << "an unknown peer is in no group";
}

TEST(AuthIdentity, PeerGroupsOfThisProcessAreItsKernelGroups) {
  std::vector<gid_t> mine(static_cast<std::size_t>(::getgroups(0, nullptr)));
  ASSERT_EQ(::getgroups(static_cast<int>(mine.size()), mine.data()), static_cast<int>(mine.size()));
  mine.push_back(::getgid());
  std::sort(mine.begin(), mine.end());
  mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
  EXPECT_EQ(PeerGroups(::getuid(), ::getgid(), ::getpid()), mine);
  // A pid whose real uid is not the claimed one is not trusted for its groups: the result is
  // then the user database's, which always holds the primary group.
  auto other = PeerGroups(::getuid() + 1, 4242, ::getpid());
  EXPECT_TRUE(std::binary_search(other.begin(), other.end(), 4242u));
}

// What stands in for a pidfd where there is none: a process's start time tells it from a later
// process with the same pid.
TEST(AuthIdentity, ProcessStartTimeTellsProcessesApart) {
  const std::uint64_t self = ProcessStartTime(::getpid());
  EXPECT_GT(self, 0u);
  EXPECT_EQ(ProcessStartTime(::getpid()), self);
  ::usleep(20'000);  // at least one clock tick (10 ms at USER_HZ 100) later
  pid_t child = ::fork();
  if (child == 0) {
    ::pause();
    std::_Exit(0);
  }
  ASSERT_GT(child, 0);
  const std::uint64_t kid = ProcessStartTime(child);
  EXPECT_GT(kid, self);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_EQ(ProcessStartTime(child), 0u);  // reaped: no such process
  EXPECT_EQ(ProcessStartTime(0), 0u);
  EXPECT_EQ(ProcessStartTime(-5), 0u);
}

TEST(AuthIdentity, NamesResolveAndUnknownOnesAreConfigErrors) {
  EXPECT_EQ(*ResolveUser("root"), 0u);
  EXPECT_EQ(*ResolveUser("4242"), 4242u);
  EXPECT_EQ(*ResolveGroup("root"), 0u);
  EXPECT_EQ(ResolveUser("no-such-user-weightd").status().reason(), "config.unknown_user");
  EXPECT_EQ(ResolveGroup("no-such-group-weightd").status().reason(), "config.unknown_group");
}

DaemonConfig Config() {
  DaemonConfig c;
  c.client_group = "5000";
  c.admin_group = "5001";
  UpsertModel(&c, ModelConfig{"open", "/m/open"});
  ModelConfig team{"team", "/m/team"};
  team.allow_groups = {"5002"};
  UpsertModel(&c, team);
  ModelConfig solo{"solo", "/m/solo"};
  solo.allow_users = {"7000"};
  UpsertModel(&c, solo);
  return c;
}

TEST(AuthPolicy, AdminsAreRootTheDaemonAndTheAdminGroup) {
  auto p = Policy::Create(Config(), 900, 900);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_TRUE(p->IsAdmin(Who(0, {})));
  EXPECT_TRUE(p->IsAdmin(Who(900, {})));
  EXPECT_TRUE(p->IsAdmin(Who(1234, {5001})));
  EXPECT_FALSE(p->IsAdmin(Who(1234, {5000, 5002})));
  EXPECT_FALSE(p->IsAdmin(Identity{})) << "no credentials, no rights";
  EXPECT_TRUE(p->MayAcquire(Who(1234, {5001}), "team")) << "an admin may use any model";
}

TEST(AuthPolicy, EachModelAllowsItsAclAndTheDefaultIsTheClientGroup) {
  auto p = Policy::Create(Config(), 900, 900);
  ASSERT_TRUE(p.ok());
  const Identity tenant = Who(1234, {5000}), team = Who(1235, {5000, 5002}), solo = Who(7000, {}), stranger = Who(8000, {});
  EXPECT_TRUE(p->MayAcquire(tenant, "open"));
  EXPECT_FALSE(p->MayAcquire(tenant, "team"));
  EXPECT_FALSE(p->MayAcquire(tenant, "solo"));
  EXPECT_TRUE(p->MayAcquire(team, "team"));
  EXPECT_TRUE(p->MayAcquire(solo, "solo"));
  EXPECT_FALSE(p->MayAcquire(solo, "open")) << "an ACL that names users replaces the default";
  EXPECT_FALSE(p->MayAcquire(tenant, "absent"));
  EXPECT_TRUE(p->MayConnect(tenant));
  EXPECT_TRUE(p->MayConnect(solo)) << "named by an ACL";
  EXPECT_FALSE(p->MayConnect(stranger));
  EXPECT_FALSE(p->MayConnect(Identity{}));
  EXPECT_EQ(p->client_gid(), 5000u);
}

TEST(AuthPolicy, RestrictiveAclsAndTheGroupsTheyGrant) {
  auto p = Policy::Create(Config(), 900, 900);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->Restrictive());
  EXPECT_TRUE(p->GrantsGroup(5000));
  EXPECT_TRUE(p->GrantsGroup(5002));
  EXPECT_FALSE(p->GrantsGroup(900));
  DaemonConfig uniform;
  UpsertModel(&uniform, ModelConfig{"a", "/m/a"});
  UpsertModel(&uniform, ModelConfig{"b", "/m/b"});
  auto u = Policy::Create(uniform, 900, 901);
  ASSERT_TRUE(u.ok());
  EXPECT_FALSE(u->Restrictive());
  EXPECT_EQ(u->client_gid(), 901u) << "the default client group is the daemon's own";
}

TEST(AuthPolicy, AnUnknownNameInAnAclIsAConfigErrorNamingTheKey) {
  DaemonConfig c = Config();
  c.models[1].allow_users = {"no-such-user-weightd"};
  auto p = Policy::Create(c, 900, 900);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().reason(), "config.unknown_user");
  EXPECT_NE(p.status().ToString().find("allow_users"), std::string::npos) << p.status().ToString();
  c = Config();
  c.admin_group = "no-such-group-weightd";
  EXPECT_EQ(Policy::Create(c, 900, 900).status().reason(), "config.unknown_group");
}

}  // namespace
}  // namespace weightd::auth
