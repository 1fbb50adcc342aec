// A downstream C++ client of libweightd: leases a model and checks every byte it maps against
// the model's files. Built by scripts/check-install.sh with CMake (weightd::client) and with
// pkg-config (weightd.pc).
//
//   downstream_client ENDPOINT MODEL
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <weightd/client.h>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s ENDPOINT MODEL\n", argv[0]);
    return 2;
  }
  weightd::ClientOptions options;
  options.endpoint = argv[1];
  options.client_name = "downstream_client";
  auto client = weightd::Client::Connect(options);
  if (!client.ok()) {
    std::fprintf(stderr, "connect: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto lease = client->Acquire(argv[2]);
  if (!lease.ok()) {
    std::fprintf(stderr, "acquire: %s\n", lease.status().ToString().c_str());
    return 1;
  }
  std::size_t bytes = 0;
  for (const weightd::Tensor& t : lease->tensors()) {
    const weightd::ShardInfo& shard = lease->shards().at(t.shard);
    std::ifstream f(lease->model_dir() + "/" + shard.file, std::ios::binary);
    f.seekg(static_cast<std::streamoff>(shard.file_data_offset + t.offset));
    std::vector<char> want(t.nbytes);
    f.read(want.data(), static_cast<std::streamsize>(want.size()));
    if (!f || std::memcmp(want.data(), t.data, t.nbytes) != 0) {
      std::fprintf(stderr, "tensor %s (%s) differs from %s\n", t.name.c_str(),
                   std::string(weightd::DTypeName(t.dtype)).c_str(), shard.file.c_str());
      return 1;
    }
    bytes += t.nbytes;
  }
  std::printf("downstream_client: %zu tensors, %zu bytes of '%s' match the files (lease %llu)\n",
              lease->tensors().size(), bytes, argv[2], static_cast<unsigned long long>(lease->id()));
  return lease->tensors().empty() ? 1 : 0;
}
