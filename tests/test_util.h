// Shared helpers for the test suite: where the reference data lives (../shared, or $FERRY_SHARED),
// reading golden tensors, temporary directories and running the ferry binary.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "models/safetensors.h"
#include "runtime/runner.h"

namespace ferry::test {

// Returns the shared reference folder: $FERRY_SHARED, else ../shared beside the source tree.
inline std::string shared_dir() {
  if (const char* e = std::getenv("FERRY_SHARED"); e && *e) return e;
  return std::string(FERRY_SOURCE_DIR) + "/../shared";
}

// The repository's tests/data (FERRY_TEST_DATA overrides: a copy of the tests run elsewhere).
inline std::string data_dir() {
  if (const char* e = std::getenv("FERRY_TEST_DATA"); e && *e) return e;
  return std::string(FERRY_SOURCE_DIR) + "/tests/data";
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
// Runs a shell command line as it is; its output as the shell's standard output gives it.
CmdResult run_shell(const std::string& cmd);

}  // namespace ferry::test

namespace ferry::test {

// A held-out model: shapes no golden checkpoint has (odd vocabulary, GQA group 5 or 3, intermediate
// not a power of two), seeded normal weights at the golden models' scale (std 0.08; norms 1 + 0.1 N),
// written as a BF16 Hugging Face checkpoint (config.json + model.safetensors) into `dir`.
struct HeldOutShape {
  int64_t hidden, heads, kv_heads, ff, vocab, layers;
  bool tied;
};
inline void write_held_out_model(const std::string& dir, const HeldOutShape& s, uint64_t seed) {
  uint64_t state = seed;
  auto next = [&state] {  // splitmix64
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  auto normal = [&next] {
    const double u1 = (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53, u2 = static_cast<double>(next() >> 11) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  };
  const int64_t hd = s.hidden / s.heads, kv = s.kv_heads * hd;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {{"model.embed_tokens.weight", {s.vocab, s.hidden}},
                                                                      {"model.norm.weight", {s.hidden}}};
  if (!s.tied) shapes.push_back({"lm_head.weight", {s.vocab, s.hidden}});
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    shapes.push_back({p + "input_layernorm.weight", {s.hidden}});
    shapes.push_back({p + "post_attention_layernorm.weight", {s.hidden}});
    shapes.push_back({p + "self_attn.q_proj.weight", {s.hidden, s.hidden}});
    shapes.push_back({p + "self_attn.k_proj.weight", {kv, s.hidden}});
    shapes.push_back({p + "self_attn.v_proj.weight", {kv, s.hidden}});
    shapes.push_back({p + "self_attn.o_proj.weight", {s.hidden, s.hidden}});
    shapes.push_back({p + "mlp.gate_proj.weight", {s.ff, s.hidden}});
    shapes.push_back({p + "mlp.up_proj.weight", {s.ff, s.hidden}});
    shapes.push_back({p + "mlp.down_proj.weight", {s.hidden, s.ff}});
  }
  std::vector<std::vector<uint16_t>> data;
  std::vector<TensorToWrite> tensors;
  for (const auto& [name, shape] : shapes) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const bool norm = name.find("norm") != std::string::npos;
    std::vector<uint16_t> v(static_cast<size_t>(n));
    for (auto& x : v) x = f32_to_bf16(static_cast<float>(norm ? 1.0 + 0.1 * normal() : 0.08 * normal()));
    data.push_back(std::move(v));
  }
  for (size_t i = 0; i < shapes.size(); ++i) tensors.push_back({shapes[i].first, DType::kBF16, shapes[i].second, data[i].data()});
  std::filesystem::create_directories(dir);
  const std::string config = "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": " + std::to_string(s.hidden) +
                             ", \"intermediate_size\": " + std::to_string(s.ff) + ", \"num_hidden_layers\": " + std::to_string(s.layers) +
                             ", \"num_attention_heads\": " + std::to_string(s.heads) + ", \"num_key_value_heads\": " + std::to_string(s.kv_heads) +
                             ", \"vocab_size\": " + std::to_string(s.vocab) +
                             ", \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, \"max_position_embeddings\": 2048, \"tie_word_embeddings\": " +
                             (s.tied ? "true" : "false") + ", \"hidden_act\": \"silu\", \"torch_dtype\": \"bfloat16\", \"bos_token_id\": 1, \"eos_token_id\": 2}";
  if (!write_file_atomic(dir + "/config.json", config.data(), config.size()).ok() || !write_safetensors(dir + "/model.safetensors", tensors).ok())
    throw std::runtime_error("write_held_out_model: cannot write " + dir);
}

// The held-out shapes the GPU accuracy test and the CPU's BF16-K/V check use.
inline const std::vector<HeldOutShape>& held_out_shapes() {
  static const std::vector<HeldOutShape> v = {{320, 5, 1, 872, 1001, 3, false}, {192, 6, 2, 520, 777, 3, true}};
  return v;
}

// A prompt of n pseudo-random token ids in [3, vocab).
inline std::vector<int32_t> held_out_prompt(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    ids[i] = static_cast<int32_t>(3 + (seed >> 33) % static_cast<uint64_t>(vocab - 3));
  }
  return ids;
}

// Calls fn(model_dir, shape, prompt) for each held-out shape, its checkpoint written to a temporary
// folder and a 333-token prompt drawn for it (the same model and prompt for every test).
template <typename F>
void for_each_held_out(F fn) {
  uint64_t no = 0;
  for (const HeldOutShape& hs : held_out_shapes()) {
    TempDir tmp;
    write_held_out_model(tmp / "m", hs, 1234 + no);
    fn(tmp / "m", hs, held_out_prompt(333, hs.vocab, 99 + no));
    ++no;
  }
}

// max|a - b| / max|ref| over the rows [r0, r1) of [rows, width] logits.
inline double rel_rows(const std::vector<float>& a, const std::vector<float>& ref, int64_t width, int64_t r0, int64_t r1) {
  double d = 0, m = 0;
  for (int64_t i = r0 * width; i < r1 * width; ++i) {
    d = std::max(d, static_cast<double>(std::fabs(a[i] - ref[i])));
    m = std::max(m, static_cast<double>(std::fabs(ref[i])));
  }
  return d / m;
}

// The error of a 333-token prompt's logits overall and by position range, for a test's message.
inline std::string held_out_report(const std::vector<float>& a, const std::vector<float>& ref, int64_t width) {
  const int64_t n = static_cast<int64_t>(ref.size()) / width;
  return "max|d|/max|ref| = " + std::to_string(rel_rows(a, ref, width, 0, n)) + " (positions 0-31 " + std::to_string(rel_rows(a, ref, width, 0, 32)) +
         ", 32-127 " + std::to_string(rel_rows(a, ref, width, 32, 128)) + ", 128-" + std::to_string(n - 1) + " " +
         std::to_string(rel_rows(a, ref, width, 128, n)) + ")";
}


}  // namespace ferry::test
