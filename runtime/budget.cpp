#include "runtime/budget.h"

#include <algorithm>
#include <cctype>
#include <cmath>

namespace ferry {

Expected<int64_t> parse_size(const std::string& text, const char* flag) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  const std::string num = text.substr(0, i);
  std::string unit = text.substr(i);
  if (num.empty()) return invalid_argument(strprintf("%s: '%s' is not a size (examples: 8G, 512M, 24GiB)", flag, text.c_str()));
  char* end = nullptr;
  const double v = std::strtod(num.c_str(), &end);
  if (*end != '\0' || !(v >= 0)) return invalid_argument(strprintf("%s: '%s' is not a size", flag, text.c_str()));
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (unit.size() >= 2 && unit.substr(unit.size() - 2) == "IB") unit = unit.substr(0, unit.size() - 2);
  else if (!unit.empty() && unit.back() == 'B') unit.pop_back();
  double mul = 1;
  if (unit.empty()) mul = 1;
  else if (unit == "K") mul = 1024.0;
  else if (unit == "M") mul = 1024.0 * 1024;
  else if (unit == "G") mul = 1024.0 * 1024 * 1024;
  else if (unit == "T") mul = 1024.0 * 1024 * 1024 * 1024;
  else return invalid_argument(strprintf("%s: unknown unit in '%s' (use K, M, G or T)", flag, text.c_str()));
  const double bytes = v * mul;
  if (bytes > 9.0e18) return invalid_argument(strprintf("%s: '%s' is too large", flag, text.c_str()));
  return static_cast<int64_t>(bytes);
}

std::string format_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return strprintf(u == 0 ? "%.0f %s" : "%.2f %s", b, units[u]);
}

int64_t gpu_layer_bytes(const ModelConfig& c) {
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  return 2 * (E + (Q + 2 * KV) * E + (c.attention_bias ? Q + 2 * KV : 0) + E * Q + E + 2 * F * E + E * F);
}

int64_t gpu_workspace_bytes(const ModelConfig& c, int64_t T, int64_t B) {
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  int64_t n = 0;
  n += T * E * 4;                 // residual
  n += 2 * T * E * 2;             // normed hi + lo
  n += 2 * T * (Q + 2 * KV) * 4;  // qkv products of hi and lo
  n += 2 * T * Q * 2;             // q, attention output
  n += T * E * 4;                 // projection output
  n += T * 2 * F * 4 + T * F * 2; // gate/up, SwiGLU
  n += B * c.n_vocab * 4;         // logits
  n += B * c.n_heads * 32 * (c.head_dim + 2) * 4;  // split partials (decode: at most 32 splits)
  n += (32 << 20);                // cuBLAS workspace
  n += (64 << 10) + 5 * T * 4 + B * 4096;  // inputs and block tables (generous)
  return n;
}

std::string GpuPlan::describe() const {
  return strprintf("%lld layers resident, %lld streamed (layer %s, globals %s, staging %s, workspace %s, runtime reserve %s: %s planned)",
                   static_cast<long long>(n_resident), static_cast<long long>(n_streamed), format_bytes(layer_bytes).c_str(),
                   format_bytes(globals_bytes).c_str(), format_bytes(slots_bytes).c_str(), format_bytes(workspace_bytes).c_str(),
                   format_bytes(reserve_bytes).c_str(), format_bytes(total_bytes).c_str());
}

Expected<GpuPlan> plan_gpu(const ModelConfig& c, const GpuPlanInput& in) {
  GpuPlan p;
  p.layer_bytes = gpu_layer_bytes(c);
  p.globals_bytes = 2 * (c.n_vocab * c.n_embd * (c.tie_word_embeddings ? 1 : 2) + c.n_embd);
  p.workspace_bytes = gpu_workspace_bytes(c, in.max_step_tokens, in.max_batch);
  p.reserve_bytes = in.budget_bytes > 0 ? in.runtime_reserve_bytes : 0;
  const int64_t fixed = p.globals_bytes + in.kv_bytes + p.workspace_bytes + p.reserve_bytes;
  if (in.budget_bytes <= 0 || in.budget_bytes >= fixed + c.n_layers * p.layer_bytes) {
    p.n_resident = c.n_layers;
    p.total_bytes = fixed + c.n_layers * p.layer_bytes;  // within the budget by the condition above
    return p;
  }
  p.slots_bytes = in.n_slots * p.layer_bytes;
  const int64_t minimum = fixed + p.slots_bytes;
  if (in.budget_bytes < minimum)
    return out_of_memory(strprintf("--gpu-mem %s is below the minimum working set of %s (globals %s, KV %s, %d staging slots %s, workspace %s, CUDA runtime %s)",
                                   format_bytes(in.budget_bytes).c_str(), format_bytes(minimum).c_str(), format_bytes(p.globals_bytes).c_str(),
                                   format_bytes(in.kv_bytes).c_str(), in.n_slots, format_bytes(p.slots_bytes).c_str(),
                                   format_bytes(p.workspace_bytes).c_str(), format_bytes(p.reserve_bytes).c_str()));
  p.n_resident = std::min<int64_t>(c.n_layers - 1, (in.budget_bytes - minimum) / p.layer_bytes);
  p.n_streamed = c.n_layers - p.n_resident;
  p.total_bytes = minimum + p.n_resident * p.layer_bytes;
  return p;
}

PlanFloor plan_floor(const ModelConfig& cfg, const GpuPlan& plan, int64_t batch, const HardwareProfile& hw) {
  PlanFloor f;
  const double streamed = static_cast<double>(plan.n_streamed * plan.layer_bytes);
  const double all = static_cast<double>(cfg.n_layers * plan.layer_bytes + plan.globals_bytes);
  f.stream_ms = streamed / (hw.h2d_gbs * 1e9) * 1e3;
  f.hbm_ms = all / (hw.hbm_gbs * 1e9) * 1e3;
  f.compute_ms = 2.0 * static_cast<double>(cfg.n_params()) * static_cast<double>(batch) / (hw.gemm_tflops * 1e12) * 1e3;
  f.step_ms = std::max({f.stream_ms, f.hbm_ms, f.compute_ms});
  f.bound = f.step_ms == f.stream_ms ? "PCIe (streamed weights)" : f.step_ms == f.hbm_ms ? "GPU memory bandwidth" : "GPU compute";
  return f;
}

}  // namespace ferry
