// Shared helpers for the test suite: where the reference data lives (../shared, or $FERRY_SHARED),
// reading golden tensors, temporary directories and running the ferry binary.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "models/safetensors.h"

namespace ferry::test {

// Returns the shared reference folder: $FERRY_SHARED, else ../shared beside the source tree.
inline std::string shared_dir() {
  if (const char* e = std::getenv("FERRY_SHARED"); e && *e) return e;
  return std::string(FERRY_SOURCE_DIR) + "/../shared";
}

// Returns a float32 copy of tensor `name` (F32 or I32 converted) from a safetensors file.
inline std::vector<float> read_f32(const SafetensorsFile& f, const std::string& name, std::vector<int64_t>* shape = nullptr) {
  const SafetensorsEntry* e = f.find(name);
  if (e == nullptr) return {};
  if (shape) *shape = e->shape;
  TensorView v = f.view(*e);
  std::vector<float> out(v.numel());
  if (e->dtype == DType::kI32) {
    for (int64_t i = 0; i < v.numel(); ++i) out[i] = static_cast<float>(v.as<int32_t>()[i]);
  } else {
    convert_to_f32(v.data, v.dtype, out.data(), out.size());
  }
  return out;
}

inline std::vector<int32_t> read_i32(const SafetensorsFile& f, const std::string& name) {
  const SafetensorsEntry* e = f.find(name);
  if (e == nullptr || e->dtype != DType::kI32) return {};
  TensorView v = f.view(*e);
  return std::vector<int32_t>(v.as<int32_t>(), v.as<int32_t>() + v.numel());
}

// A fresh temporary directory, removed on destruction.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/ferry-test-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

struct CmdResult {
  int exit_code = -1;  // the process's exit status; 128 + signal when killed by a signal
  std::string output;  // stdout (and stderr, merged)
};

// Runs the ferry binary with `args` (a shell-quoted string) and captures stdout, and stderr too
// unless `stdout_only`.
CmdResult run_ferry(const std::string& args, bool stdout_only = false);

}  // namespace ferry::test
