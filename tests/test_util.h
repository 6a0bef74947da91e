// Shared helpers for the test suite: where the reference data lives (../shared, or $FERRY_SHARED),
// reading golden tensors, temporary directories and running the ferry binary.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "models/safetensors.h"
#include "runtime/runner.h"

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

// Prefills `ids` as a new sequence in chunks of `chunk` tokens; between chunks a second sequence
// takes the cache's whole host pool (its prefill, then make_resident), so with a disk tier sized to
// one sequence every block of the first goes to disk and comes back each time. Returns the logits of
// every position. `spilled_each_time`: whether the first sequence was out of host memory after
// every chunk.
inline Expected<std::vector<float>> logits_with_spills(Runner& r, const std::vector<int32_t>& ids, int64_t chunk,
                                                      bool* spilled_each_time = nullptr) {
  KvCache& kv = r.kv();
  const int64_t n = static_cast<int64_t>(ids.size()), V = r.config().n_vocab;
  const int32_t a = kv.add_sequence(), other = kv.add_sequence();
  std::vector<float> all(static_cast<size_t>(n * V)), logits;
  StepBatch b;
  Status st = Status::Ok();
  bool spilled = true;
  for (int64_t j0 = 0; j0 < n && st.ok(); j0 += chunk) {
    b.clear();
    for (int64_t j = j0; j < std::min(n, j0 + chunk); ++j) b.add(ids[j], static_cast<int32_t>(j), a, true);
    st = r.step(b, logits);
    if (!st.ok()) break;
    std::copy(logits.begin(), logits.end(), all.begin() + j0 * V);
    if (kv.length(other) == 0) {
      b.clear();
      for (int64_t j = 0; j < n; ++j) b.add(ids[(j * 7) % n], static_cast<int32_t>(j), other, false);
      st = r.step(b, logits);
    } else {
      kv.begin_step();
      auto ok = kv.make_resident(other, n);  // the other sequence back in: the first one out
      if (!ok.ok()) st = ok.status();
      else if (!*ok) st = Status(ErrorCode::kInternal, "the second sequence did not fit");
    }
    spilled = spilled && !kv.resident(a, std::min(n, j0 + chunk));
  }
  kv.free_sequence(a);
  kv.free_sequence(other);
  if (!st.ok()) return st;
  if (spilled_each_time) *spilled_each_time = spilled;
  return all;
}

struct CmdResult {
  int exit_code = -1;  // the process's exit status; 128 + signal when killed by a signal
  std::string output;  // stdout (and stderr, merged)
};

// Runs the ferry binary with `args` (a shell-quoted string) and captures stdout, and stderr too
// unless `stdout_only`.
CmdResult run_ferry(const std::string& args, bool stdout_only = false);

}  // namespace ferry::test
