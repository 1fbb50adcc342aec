// The 22 safetensors dtypes (weightd/dtype.h), end to end: files that weightd did not write
// (tests/data/dtypes/write_dtypes.py; and, on the GPU machine, the safetensors library
// itself) are parsed by the daemon and served bit-exactly to a client, on the host tier and
// on a GPU; unknown dtype names and partial bytes get their typed errors, for their model alone.
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "support/daemon_process.h"
#include "support/dtype_files.h"
#include "weightd/client.h"
#include "weightd/dtype.h"

namespace weightd {
namespace {

using testing::ExpectedTensor;

TEST(DType, SizesPackSubByteTypesAndRefusePartialBytes) {
  using E = DTypeBytesResult::Error;
  EXPECT_EQ(DTypeBytes(DType::kF4, {2, 3}).bytes, 3u);
  EXPECT_EQ(DTypeBytes(DType::kF6E2M3, {4}).bytes, 3u);
  EXPECT_EQ(DTypeBytes(DType::kF6E3M2, {8, 2}).bytes, 12u);
  EXPECT_EQ(DTypeBytes(DType::kC64, {3}).bytes, 24u);
  EXPECT_EQ(DTypeBytes(DType::kF8E8M0, {}).bytes, 1u);
  EXPECT_EQ(DTypeBytes(DType::kF4, {0}).bytes, 0u);
  EXPECT_EQ(DTypeBytes(DType::kF4, {}).error, E::kPartialByte);
  EXPECT_EQ(DTypeBytes(DType::kF4, {3}).error, E::kPartialByte);
  EXPECT_EQ(DTypeBytes(DType::kF6E2M3, {2}).error, E::kPartialByte);
  EXPECT_EQ(DTypeBytes(DType::kF32, {-1}).error, E::kNegativeDimension);
  EXPECT_EQ(DTypeBytes(DType::kF4, {std::int64_t{1} << 62, 4}).error, E::kOverflow);
  EXPECT_EQ(DTypeBytes(DType::kF64, {std::int64_t{1} << 61}).error, E::kOverflow);
  EXPECT_EQ(DTypeBytes(DType::kF32, {std::int64_t{1} << 61}).bytes, std::uint64_t{1} << 63);
  // Names and codes are one-to-one, and the codes are those of docs/protocol.md §4.4.
  std::set<std::string_view> names;
  for (DType t : kAllDTypes) {
    EXPECT_TRUE(names.insert(DTypeName(t)).second) << DTypeName(t);
    EXPECT_EQ(DTypeFromName(DTypeName(t)), t);
    EXPECT_TRUE(IsValidDType(static_cast<std::uint8_t>(t)));
  }
  EXPECT_EQ(names.size(), 22u);
  EXPECT_FALSE(IsValidDType(0));
  EXPECT_FALSE(IsValidDType(23));
  EXPECT_EQ(static_cast<int>(DType::kF8E8M0), 16);
  EXPECT_EQ(static_cast<int>(DType::kF6E3M2), 22);
}

class DTypeServing : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto w = testing::WriteIndependentDtypeModel(models_.file("all"));
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    written_ = std::move(w).value();
    ASSERT_TRUE(testing::WriteIndependentDtypeModel(models_.file("newer"), "unsupported").ok());
    ASSERT_TRUE(testing::WriteIndependentDtypeModel(models_.file("partial"), "partial_byte").ok());
    testing::DaemonOptions o;
    o.models = {{"all", models_.file("all")}, {"newer", models_.file("newer")}, {"partial", models_.file("partial")}};
    if (auto lib = testing::SafetensorsLibraryDir()) o.models["library"] = *lib;
    auto d = testing::DaemonProcess::Start(o);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
    auto c = daemon_->Connect("dtype_test");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    client_.emplace(std::move(c).value());
  }

  // Acquires `model` on the test's device; skips the test when that is a GPU nobody has.
  std::optional<Lease> AcquireOrSkip(const std::string& model) {
    AcquireOptions o;
    o.device = GetParam();
    auto lease = client_->Acquire(model, o);
    if (!lease.ok() && lease.status().reason() == "gpu.no_device") return std::nullopt;
    EXPECT_TRUE(lease.ok()) << lease.status().ToString();
    if (!lease.ok()) return std::nullopt;
    return std::move(lease).value();
  }

  // Every expected tensor is in the lease with its dtype, shape and exactly its bytes.
  void ExpectServed(const Lease& lease, const std::vector<ExpectedTensor>& expected) {
    EXPECT_EQ(lease.tensors().size(), expected.size());
    for (const ExpectedTensor& e : expected) {
      SCOPED_TRACE(e.name + " " + e.dtype);
      const Tensor* t = lease.find(e.name);
      ASSERT_NE(t, nullptr);
      EXPECT_EQ(DTypeName(t->dtype), e.dtype);
      EXPECT_EQ(t->shape, e.shape);
      ASSERT_EQ(t->nbytes, e.bytes.size());
      std::string served(t->nbytes, '\0');
      if (t->nbytes > 0) {
        ASSERT_TRUE(lease.copy_to_host(*t, 0, t->nbytes, served.data()).ok());
      }
      EXPECT_EQ(served, e.bytes) << "served bytes differ from the written ones";
    }
  }

  testing::TempDir models_;
  std::vector<ExpectedTensor> written_;
  std::unique_ptr<testing::DaemonProcess> daemon_;
  std::optional<Client> client_;
};

TEST_P(DTypeServing, ServesEveryDtypeOfAnIndependentWriterBitExactly) {
  std::set<std::string> dtypes;
  for (const auto& e : written_) dtypes.insert(e.dtype);
  ASSERT_EQ(dtypes.size(), 22u) << "the writer covers every dtype";
  auto lease = AcquireOrSkip("all");
  if (!lease) {
    if (!HasFailure()) GTEST_SKIP() << "no GPU on the daemon or in this process";
    return;
  }
  ExpectServed(*lease, written_);
  if (GetParam() == "cpu") {
    EXPECT_TRUE(testing::CompareWithFiles(*lease).ok());
  }
}

TEST_P(DTypeServing, ServesFilesOfTheSafetensorsLibraryBitExactly) {
  const auto dir = testing::SafetensorsLibraryDir();
  if (!dir) GTEST_SKIP() << "WEIGHTD_SAFETENSORS_LIBRARY_DIR is not set (scripts/gpu-check.sh sets it)";
  auto expected = testing::ReadExpectedTensors(*dir);
  ASSERT_TRUE(expected.ok()) << expected.status().ToString();
  ASSERT_FALSE(expected->empty());
  auto lease = AcquireOrSkip("library");
  if (!lease) {
    if (!HasFailure()) GTEST_SKIP() << "no GPU on the daemon or in this process";
    return;
  }
  ExpectServed(*lease, *expected);
}

TEST_P(DTypeServing, UnknownDtypeNameIsUnsupportedNotDataLossForItsModelAlone) {
  auto all = AcquireOrSkip("all");
  if (!all) {
    if (!HasFailure()) GTEST_SKIP() << "no GPU on the daemon or in this process";
    return;
  }
  auto newer = client_->Acquire("newer", {.device = GetParam()});
  ASSERT_FALSE(newer.ok());
  EXPECT_EQ(newer.status().code(), Code::kInvalidArgument) << newer.status().ToString();
  EXPECT_EQ(newer.status().reason(), "safetensors.unsupported_dtype");
  EXPECT_NE(newer.status().message().find("'F8_E3M4'"), std::string::npos) << newer.status().message();
  auto st = client_->Status("newer");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, "failed");
  EXPECT_EQ(st->last_error.reason(), "safetensors.unsupported_dtype");

  auto partial = client_->Acquire("partial", {.device = GetParam()});
  ASSERT_FALSE(partial.ok());
  EXPECT_EQ(partial.status().code(), Code::kDataLoss) << partial.status().ToString();
  EXPECT_EQ(partial.status().reason(), "safetensors.partial_byte");

  // The daemon and the other models are untouched: the lease taken before still reads
  // right, and a new one is granted.
  ExpectServed(*all, written_);
  auto again = AcquireOrSkip("all");
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(daemon_->running());
}

INSTANTIATE_TEST_SUITE_P(Tiers, DTypeServing, ::testing::Values("cpu", "cuda:0"),
                         [](const auto& info) { return info.param == "cpu" ? std::string("Host") : std::string("Gpu"); });

}  // namespace
}  // namespace weightd
