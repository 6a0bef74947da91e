#include "runtime/budget.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <optional>
#include <fstream>

#include <nlohmann/json.hpp>

#include "models/weight_format.h"
#include "offload/layer_layout.h"

#include "models/safetensors.h"

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

int64_t quant_stage_floats(const ModelConfig& c, DType quant) {
  if (quant != DType::kNF4DQ) return 0;
  const LayerLayout lay = layer_layout(c, 0, quant);
  int64_t m = 0;
  for (int t = 0; t < kLayerTensorCount; ++t)
    if (lay.present[t] && lay.shapes.t[t].n_dims == 2)
      m = std::max(m, ferry::quant_stage_floats(lay.dtype[t], lay.shapes.t[t].shape[0], lay.shapes.t[t].shape[1]));
  return (m + 63) / 64 * 64;
}

int64_t quant_tile_elems(const ModelConfig& c, DType quant) {
  const int64_t rows = 64 * std::max(c.n_embd, c.n_ff);  // enough for 64 rows of any weight
  return std::max({int64_t{16} << 20, rows, 2 * quant_stage_floats(c, quant) + rows});
}

int64_t gpu_layer_bytes(const ModelConfig& c, DType quant) {
  if (is_quantized(quant)) return static_cast<int64_t>(layer_layout(c, 0, quant).bytes);
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  return 2 * (E + (Q + 2 * KV) * E + (c.attention_bias ? Q + 2 * KV : 0) + E * Q + E + 2 * F * E + E * F);
}

int64_t layer_params(const ModelConfig& c) {
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  return (Q + 2 * KV) * E + E * Q + 3 * F * E;
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
  n += (64 << 10) + 7 * T * 4 + B * 8192;  // inputs and block tables (generous)
  n += T * (Q + 2 * KV) * 2 + (T + 64 * 16) * KV * 4;  // host-KV layers: q/k/v going down, fresh prompts' K/V scratch
  return n;
}

const char* place_name(Place p) { return p == Place::kResident ? "resident" : p == Place::kStreamed ? "streamed" : "cpu"; }

std::string GpuPlan::describe() const {
  return strprintf("%lld layers resident, %lld streamed (%lld of them from disk), %lld on the CPU (layer %s, globals %s, staging %s, workspace %s, runtime reserve %s: %s planned)",
                   static_cast<long long>(n_resident), static_cast<long long>(n_streamed), static_cast<long long>(n_disk),
                   static_cast<long long>(n_cpu), format_bytes(layer_bytes).c_str(), format_bytes(globals_bytes).c_str(),
                   format_bytes(slots_bytes).c_str(), format_bytes(workspace_bytes).c_str(), format_bytes(reserve_bytes).c_str(),
                   format_bytes(total_bytes).c_str()) +
         (embedding_on_host ? strprintf("; token embedding in pinned host memory (%s)", format_bytes(embedding_host_bytes).c_str()) : std::string());
}

std::string GpuPlan::placement() const {
  std::string out;
  // Marked only when the GPU-computed layers differ (CPU-computed ones always keep K/V on the host).
  bool kv_on_host = false, kv_on_gpu = false;
  for (size_t i = 0; i < place.size() && i < kv_host.size(); ++i)
    if (place[i] != Place::kCpu) (kv_host[i] ? kv_on_host : kv_on_gpu) = true;
  const bool mixed_kv = kv_on_host && kv_on_gpu;
  auto label = [&](size_t i) {
    std::string l = place_name(place[i]);
    if (place[i] == Place::kStreamed) l += source[i] == Tier::kDisk ? " from disk" : " from host";
    if (mixed_kv && place[i] != Place::kCpu) l += kv_host[i] ? " (host K/V)" : " (GPU K/V)";
    return l;
  };
  for (size_t i = 0; i < place.size();) {
    size_t j = i;
    while (j + 1 < place.size() && label(j + 1) == label(i)) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(i);
    if (j != i) {
      out += '-';
      out += std::to_string(j);
    }
    out += ' ';
    out += label(i);
    i = j + 1;
  }
  return out;
}

namespace {

struct LayerCosts {
  double gpu_ms, cpu_ms, copy_ms, disk_ms;
  double copy_shared_ms;  // a copy while CPU layers read host memory (h2d_shared_gbs)
  double cpu_shared_ms;   // a CPU layer while copies run: its rate scaled as the CPU's read was beside them
};

LayerCosts layer_costs(const ModelConfig& c, int64_t layer_bytes, int64_t batch, const HardwareProfile& hw, DType weights) {
  const double lb = static_cast<double>(layer_bytes), params = static_cast<double>(layer_params(c)), b = static_cast<double>(batch);
  LayerCosts k;
  k.gpu_ms = std::max(lb / (gpu_layer_rate(hw, weights, batch) * 1e9) * 1e3 + gpu_layer_fixed_ms(hw, weights, batch),
                      2 * params * b / (hw.gemm_tflops * 1e12) * 1e3);
  // A CPU layer reads its weights no faster than host memory delivers (the floor's rate caps the
  // measured one); beside copies, at the share of it the CPU's read kept then. It also moves its
  // activations down and back, and costs two host-side hand-offs.
  const double cpu_gbs = std::min(cpu_layer_rate(hw, weights), hw.host_dram_gbs);
  const double cpu_share = cpu_layer_shared_share(hw, weights);
  const double flops_ms = 2 * params * b / (hw.cpu_tflops * 1e12) * 1e3;
  const double handoff_ms = 2.0 * b * static_cast<double>(c.n_embd) * 4 / (hw.h2d_gbs * 1e9) * 1e3 + 0.05;
  k.cpu_ms = std::max(lb / (cpu_gbs * 1e9) * 1e3, flops_ms) + handoff_ms;
  k.cpu_shared_ms = std::max(lb / (cpu_gbs * cpu_share * 1e9) * 1e3, flops_ms) + handoff_ms;
  k.copy_ms = lb / (hw.h2d_gbs * 1e9) * 1e3;
  k.copy_shared_ms = lb / (std::min(hw.h2d_shared_gbs, hw.h2d_gbs) * 1e9) * 1e3;
  k.disk_ms = lb / (hw.disk_gbs * 1e9) * 1e3;
  return k;
}

}  // namespace

Expected<KvPlace> parse_kv_place(const std::string& s) {
  if (s == "auto") return KvPlace::kAuto;
  if (s == "gpu") return KvPlace::kGpu;
  if (s == "host" || s == "cpu") return KvPlace::kHost;
  if (s == "split") return KvPlace::kSplit;
  return invalid_argument("--kv " + s + ": expected auto, gpu, host or split");
}

namespace {

// `gpu_kv`: with host K/V, this many layers keep their K/V on the GPU; when that many are resident
// they are spread evenly among the others (one in the middle of each stretch of L / gpu_kv layers),
// and marked in p.kv_host (plan_gpu).
Expected<GpuPlan> plan_weights(const ModelConfig& c, const GpuPlanInput& in, bool spread_resident, int64_t gpu_kv = 0) {
  GpuPlan p;
  const int64_t L = c.n_layers;
  p.layer_bytes = in.layer_bytes > 0 ? in.layer_bytes : gpu_layer_bytes(c);
  p.head_bytes = in.head_bytes > 0 ? in.head_bytes : head_bytes(c);
  p.globals_bytes = in.globals_bytes > 0 ? in.globals_bytes : (c.tie_word_embeddings ? 0 : 2 * c.n_vocab * c.n_embd) + p.head_bytes;
  p.workspace_bytes = in.emulated ? 0 : gpu_workspace_bytes(c, in.max_step_tokens, in.max_batch) + (is_quantized(in.weights) ? 2 * quant_tile_elems(c, in.weights) : 0);
  p.reserve_bytes = in.budget_bytes > 0 && !in.emulated ? in.runtime_reserve_bytes : 0;
  if (in.cpu_layers > L)
    return invalid_argument(strprintf("--cpu-layers %lld: the model has %lld layers", (long long)in.cpu_layers, (long long)L));
  const int64_t forced_cpu = std::max<int64_t>(in.cpu_layers, 0);
  // Resident layers (all that fit, with the staging slots when anything is streamed; -1: not even
  // the minimum working set) and how many of the others host memory holds (the rest are read from
  // disk), for `globals` bytes on the GPU and `host_budget` pinned bytes for layers (-1: unlimited).
  struct Split {
    int64_t fixed = 0, n_res = 0, host_held = 0;
  };
  const int64_t slots = in.n_slots * p.layer_bytes;
  auto split = [&](int64_t globals, int64_t host_budget) {
    Split s;
    s.fixed = globals + in.kv_bytes + p.workspace_bytes + p.reserve_bytes;
    s.n_res = L;
    if (in.budget_bytes > 0 && in.budget_bytes < s.fixed + L * p.layer_bytes)
      s.n_res = in.budget_bytes < s.fixed + slots ? -1 : std::min<int64_t>(L - 1, (in.budget_bytes - s.fixed - slots) / p.layer_bytes);
    if (s.n_res < 0) return s;
    s.n_res = std::min(s.n_res, L - forced_cpu);
    const int64_t R = L - s.n_res;
    s.host_held = host_budget >= 0 ? std::min<int64_t>(R, host_budget / p.layer_bytes) : in.have_disk ? 0 : R;
    return s;
  };
  Split sp = split(p.globals_bytes, in.host_budget_bytes);
  // The untied token embedding goes to pinned host memory (GpuPlan) when not every layer fits on the
  // GPU beside it, the host budget holds it, and no more layers are left to the disk for it.
  const int64_t emb = c.tie_word_embeddings ? 0 : in.embedding_bytes > 0 ? in.embedding_bytes : 2 * c.n_vocab * c.n_embd;
  if (emb > 0 && in.embedding_may_leave_gpu && sp.n_res < L && (in.host_budget_bytes >= 0 ? in.host_budget_bytes >= emb : !in.have_disk)) {
    const Split on = split(p.globals_bytes - emb, in.host_budget_bytes >= 0 ? in.host_budget_bytes - emb : -1);
    if (on.n_res >= 0 && (sp.n_res < 0 || L - on.n_res - on.host_held <= L - sp.n_res - sp.host_held)) {
      sp = on;
      p.embedding_on_host = true;
      p.embedding_host_bytes = emb;
      p.globals_bytes -= emb;
    }
  }
  const int64_t fixed = sp.fixed;
  if (sp.n_res < 0)
    return out_of_memory(strprintf("--gpu-mem %s is below the minimum working set of %s (globals %s, KV %s, %d staging slots %s, workspace %s, CUDA runtime %s)",
                                   format_bytes(in.budget_bytes).c_str(), format_bytes(fixed + slots).c_str(), format_bytes(p.globals_bytes).c_str(),
                                   format_bytes(in.kv_bytes).c_str(), in.n_slots, format_bytes(slots).c_str(),
                                   format_bytes(p.workspace_bytes).c_str(), format_bytes(p.reserve_bytes).c_str()));
  const int64_t n_res = sp.n_res;
  const int64_t R = L - n_res;
  const int64_t host_held = sp.host_held;
  if (host_held < R && !in.have_disk)
    return out_of_memory(strprintf("--host-mem %s holds %lld of the %lld layers that do not fit on the GPU (%s needed%s): raise it, or give --disk STORE (from 'ferry pack') for the rest",
                                   format_bytes(static_cast<double>(std::max<int64_t>(in.host_budget_bytes, 0))).c_str(), (long long)host_held,
                                   (long long)R, format_bytes(static_cast<double>(R * p.layer_bytes)).c_str(),
                                   p.embedding_on_host ? strprintf(", beside the token embedding's %s", format_bytes(static_cast<double>(emb)).c_str()).c_str() : ""));
  if (forced_cpu > host_held)
    return out_of_memory(strprintf("--cpu-layers %lld: CPU-computed layers live in host memory, and --host-mem holds only %lld layers",
                                   (long long)forced_cpu, (long long)host_held));
  const int64_t n_disk = R - host_held;
  // CPU-computed layers: the count that minimises the predicted step.
  const LayerCosts k = layer_costs(c, p.layer_bytes, in.max_batch, in.hw, in.weights);
  // The head (final norm and lm_head) runs on the GPU every step, after the layers.
  const double head_ms = std::max(static_cast<double>(p.head_bytes) / (in.hw.hbm_gbs * 1e9),
                                  2.0 * static_cast<double>(c.n_vocab * c.n_embd * in.max_batch) / (in.hw.gemm_tflops * 1e12)) * 1e3;
  // The engines' own times; host DRAM serves the copies and the CPU layers together, whatever the
  // split between them (the same R layers), so that bound does not depend on n_cpu.
  auto engines = [&](int64_t n_cpu) {
    const int64_t s = R - n_cpu;
    // With CPU layers and copies both running, each gets the rate `ferry calibrate` measured with
    // the other beside it (H2D and CPU read at once).
    const double copy = static_cast<double>(s) * (n_cpu > 0 ? k.copy_shared_ms : k.copy_ms), disk = static_cast<double>(n_disk) * k.disk_ms;
    const double serial = static_cast<double>(L - n_cpu) * k.gpu_ms + static_cast<double>(n_cpu) * (s > 0 ? k.cpu_shared_ms : k.cpu_ms) + head_ms;
    return std::max({copy, disk, serial});
  };
  const double shared = static_cast<double>(R * p.layer_bytes) / (in.hw.dram_shared_gbs * 1e9) * 1e3;
  auto predict = [&](int64_t n_cpu) { return std::max(engines(n_cpu), shared); };
  // The count with the fastest engines: when shared DRAM bounds several counts alike, the one whose
  // copies (at the shared H2D rate) and CPU layers are balanced best (llama-2-7b at 8G on the H200:
  // 8 streamed / 9 CPU ran at 13.5 tok/s, 7 / 10 at 15.9, under the same DRAM bound).
  int64_t n_cpu = forced_cpu;
  if (in.cpu_layers < 0)
    for (int64_t x = 1; x <= host_held; ++x)
      if (engines(x) < engines(n_cpu) - 1e-9) n_cpu = x;
  p.predicted_ms = predict(n_cpu);
  // Layout. With K/V on the host or more than one row a step (`spread_resident`), resident layers
  // are spread evenly among the others: the CPU's attention, or the GPU's work at many rows, makes
  // every layer take milliseconds, and with the resident layers first the copy stream stalled for
  // that whole run every step, its ring full (notes/kv.md: 50 ms of a 225 ms decode step,
  // llama-3-8b at 8G, batch 64). Otherwise resident layers come first (batch 1 was measured at 96% of
  // its floor that way, 92% spread). Among the others, CPU layers are spread
  // evenly between the streamed ones; streamed layers from host memory first, then from disk.
  p.place.assign(L, Place::kResident);
  p.source.assign(L, Tier::kDevice);
  // With K/V split between host and GPU, the GPU-K/V layers (resident) are spread evenly among the
  // host-K/V ones: the executor chains each to the host-K/V layer before it per micro-batch, so the
  // GPU runs them for one micro-batch while the CPU attends the other. Placed last, together, they
  // left the copy engine idle for their whole run every step (1.04-1.09x slower, notes/kv.md).
  const int64_t g = gpu_kv > 0 && gpu_kv <= n_res ? gpu_kv : 0;
  std::vector<bool> gpu_kv_at(L, false);
  for (int64_t j = 0; j < g; ++j) gpu_kv_at[static_cast<size_t>((2 * j + 1) * L / (2 * g))] = true;  // floor((j + 1/2) L / g)
  const int64_t spread_over = L - g;
  int64_t host_streamed_left = host_held - n_cpu;
  for (int64_t il = 0, j = 0, i = 0; il < L; ++il) {
    // R of the L layers are not resident: evenly spaced among the L - g host-K/V positions (the
    // last of those is one of them), or the last R.
    if (gpu_kv_at[il]) continue;
    const int64_t at = i++;
    const bool other = spread_resident ? R > 0 && (at + 1) * R / spread_over > at * R / spread_over : il >= n_res;
    if (!other) continue;
    const bool cpu = n_cpu > 0 && (j + 1) * n_cpu / R > j * n_cpu / R;
    ++j;
    if (cpu) {
      p.place[il] = Place::kCpu;
      p.source[il] = Tier::kPinnedHost;
    } else {
      p.place[il] = Place::kStreamed;
      p.source[il] = host_streamed_left > 0 ? Tier::kPinnedHost : Tier::kDisk;
      if (host_streamed_left > 0) --host_streamed_left;
    }
  }
  if (g > 0) {
    p.kv_host.assign(L, true);
    for (int64_t il = 0; il < L; ++il) p.kv_host[il] = !gpu_kv_at[il];
  }
  p.n_resident = n_res;
  p.n_cpu = n_cpu;
  p.n_streamed = R - n_cpu;
  p.n_disk = n_disk;
  p.slots_bytes = p.n_streamed > 0 ? in.n_slots * p.layer_bytes : 0;
  p.host_bytes = host_held * p.layer_bytes;
  p.disk_bytes = n_disk * p.layer_bytes;
  p.total_bytes = fixed + p.slots_bytes + n_res * p.layer_bytes;
  return p;
}

}  // namespace

Expected<GpuPlan> plan_gpu(const ModelConfig& c, const GpuPlanInput& in) {
  const int64_t L = c.n_layers;
  // Marks `k` layers' K/V as host-resident: as plan_weights spread them when L - k layers are
  // resident; otherwise streamed layers first (their steps wait on copies, which hides the CPU's
  // attention), then resident layers from the first; CPU-computed layers always.
  auto finish = [&](GpuPlan p, int64_t k) {
    if (k == 0 || k == L || static_cast<int64_t>(p.kv_host.size()) != L) {
      p.kv_host.assign(L, false);
      for (int64_t il = 0; il < L && k > 0; ++il)
        if (p.place[il] == Place::kStreamed) p.kv_host[il] = true, --k;
      for (int64_t il = 0; il < L && k > 0; ++il)
        if (p.place[il] == Place::kResident) p.kv_host[il] = true, --k;
    }
    for (int64_t il = 0; il < L; ++il) p.kv_host[il] = p.kv_host[il] || p.place[il] == Place::kCpu;
    p.n_kv_host = std::count(p.kv_host.begin(), p.kv_host.end(), true);
    const int64_t on_gpu = std::count_if(p.place.begin(), p.place.end(), [](Place x) { return x != Place::kCpu; });
    const int64_t host_gpu_layers = p.n_kv_host - p.n_cpu;
    p.kv_gpu_bytes = on_gpu > 0 ? in.kv_bytes * (on_gpu - host_gpu_layers) / L : 0;
    return p;
  };
  // Resident layers are spread among the others with host K/V (plan_weights), and at more than one
  // row a step: there a GPU layer's compute is long enough that a run of resident layers outlasts
  // what the staging slots prefetched, and the copy engine waited it out (Llama-3-70B NF4 at 24G,
  // batch 16: 36 resident layers of 2.3 ms each, the copy engine idle for ~60 ms of a 455 ms step).
  // At one row the slots cover the run, and resident-first was measured faster (below).
  auto with_kv = [&](int64_t k) {
    GpuPlanInput t = in;
    t.kv_bytes = in.kv_bytes * (L - k) / L;
    return plan_weights(c, t, /*spread_resident=*/k > 0 || in.max_batch > 1, /*gpu_kv=*/k > 0 ? L - k : 0);
  };
  // The predicted decode step of a plan with k host-K/V layers: the largest of
  //  - the weights' step (copies, disk, GPU and CPU layers: plan_weights),
  //  - the K/V over host DRAM (the CPU's attention reads them once per step: the whole pool, the
  //    longest context),
  //  - every host byte the step reads, the weights' DMA and CPU layers as well as the K/V, over the
  //    DRAM rate the copy engine and the cores get together (dram_shared_gbs, `ferry calibrate`):
  //    both come out of the same memory, and trading a layer's K/V for its weights moves about as
  //    many bytes,
  // plus a round trip of about 0.25 ms per host layer (GPU -> host function -> GPU, from the traces
  // in notes/kv.md).
  constexpr double kRoundTripMs = 0.25;
  auto step_ms = [&](const GpuPlan& p, int64_t k) {
    const double kv_b = static_cast<double>(in.kv_bytes) * static_cast<double>(k) / static_cast<double>(L);
    const double host_read = static_cast<double>((p.n_streamed + p.n_cpu) * p.layer_bytes) + kv_b;
    const double kv_ms = kv_b / (in.hw.host_dram_gbs * 1e9) * 1e3;
    const double shared_ms = host_read / (in.hw.dram_shared_gbs * 1e9) * 1e3;
    return std::max({p.predicted_ms, kv_ms, shared_ms}) + kRoundTripMs * static_cast<double>(k);
  };
  // The number of host-K/V layers k: 0 for --kv gpu, L for host, the given count for
  // --kv-host-layers; otherwise (split, auto) by the cost model. Each such layer frees its
  // share of the GPU pool for weights, so fewer layers stream. Among plans predicted within
  // kNearBest of the best, the one streaming the fewest layers wins, then the fewest host layers: a
  // prompt step copies the same streamed weights as a decode step and adds the GPU's compute for
  // thousands of tokens, so streamed bytes cost most there (llama-3-8b at 16G, batch 256: the
  // 22-streamed plan's prompt steps took 220-330 ms, the 4-streamed one's about 100).
  constexpr double kNearBest = 0.03;
  struct Candidate {
    int64_t k;
    double ms;
    GpuPlan plan;
  };
  std::vector<Candidate> cands;
  Status first_error = Status::Ok();
  if (in.kv == KvPlace::kSplit && in.kv_host_layers > L)
    return invalid_argument(strprintf("--kv-host-layers %lld: the model has %lld layers", (long long)in.kv_host_layers, (long long)L));
  const bool forced = in.kv == KvPlace::kSplit && in.kv_host_layers >= 0;
  int64_t k_lo = 0, k_hi = L;
  if (in.kv == KvPlace::kGpu) k_lo = k_hi = 0;
  if (in.kv == KvPlace::kHost) k_lo = k_hi = L;
  if (forced) k_lo = k_hi = in.kv_host_layers;
  for (int64_t k = k_lo; k <= k_hi; ++k) {
    auto p = with_kv(k);
    if (!p.ok()) {
      if (first_error.ok()) first_error = p.status();
      continue;
    }
    const double ms = step_ms(*p, k);
    cands.push_back({k, ms, std::move(*p)});
  }
  if (cands.empty()) {
    // One count asked for (--kv gpu, host or --kv-host-layers): its error names the budget.
    if (k_lo == k_hi) return forced ? first_error.with_context(strprintf("--kv-host-layers %lld", (long long)in.kv_host_layers)) : first_error;
    // Not even with every layer's K/V on the host: the host plan's error names the minimum.
    auto p = with_kv(L);
    return p.ok() ? Status(ErrorCode::kInternal, "plan: no K/V placement") : p.status();
  }
  double best_ms = std::numeric_limits<double>::infinity();
  for (const auto& c : cands) best_ms = std::min(best_ms, c.ms);
  const Candidate* pick = nullptr;
  for (const auto& c : cands)
    if (c.ms <= best_ms * (1 + kNearBest) + 1e-9 && (!pick || c.plan.n_streamed < pick->plan.n_streamed)) pick = &c;
  // auto keeps every K/V on the GPU when they fit and the host would gain less than kAutoGain: the
  // GPU-K/V path is the one measured at batch 1 (96% of its floor), and small predicted gains are
  // within the model's error.
  constexpr double kAutoGain = 0.10;
  if (in.kv == KvPlace::kAuto && cands.front().k == 0 && pick->k != 0 && pick->ms > cands.front().ms * (1 - kAutoGain)) pick = &cands.front();
  GpuPlan p = finish(pick->plan, pick->k);
  p.predicted_ms = pick->ms;
  return p;
}

PlanFloor plan_floor(const ModelConfig& cfg, const GpuPlan& plan, int64_t batch, const HardwareProfile& hw, double avg_context) {
  PlanFloor f;
  // Host-resident K/V (BF16) read once per step by the CPU's attention, beside the other work.
  const double kv_layer_token = 2.0 * static_cast<double>(cfg.kv_dim()) * 2;
  const double kv_bytes = static_cast<double>(plan.n_kv_host - plan.n_cpu) * kv_layer_token * batch * avg_context;
  f.kv_ms = kv_bytes / (hw.host_dram_gbs * 1e9) * 1e3;
  const double lb = static_cast<double>(plan.layer_bytes), b = static_cast<double>(batch);
  const double n_gpu = static_cast<double>(cfg.n_layers - plan.n_cpu), n_cpu = static_cast<double>(plan.n_cpu);
  f.stream_ms = static_cast<double>(plan.n_streamed) * lb / (hw.h2d_gbs * 1e9) * 1e3;
  f.disk_ms = static_cast<double>(plan.n_disk) * lb / (hw.disk_gbs * 1e9) * 1e3;
  const double params = static_cast<double>(layer_params(cfg));
  f.cpu_ms = n_cpu * std::max(lb / (hw.host_dram_gbs * 1e9), 2 * params * b / (hw.cpu_tflops * 1e12)) * 1e3;
  f.hbm_ms = (n_gpu * lb + static_cast<double>(plan.head_bytes > 0 ? plan.head_bytes : head_bytes(cfg))) / (hw.hbm_gbs * 1e9) * 1e3;  // the embedding: T rows only
  f.compute_ms = 2.0 * (n_gpu * params + static_cast<double>(cfg.n_vocab * cfg.n_embd)) * b / (hw.gemm_tflops * 1e12) * 1e3;
  // Host DRAM serves the copy engine (streamed layers), the CPU layers and the CPU's K/V reads at
  // once: together no faster than the rate measured with both running (dram_shared_gbs).
  f.host_ms = ((static_cast<double>(plan.n_streamed) + n_cpu) * lb + kv_bytes) / (hw.dram_shared_gbs * 1e9) * 1e3;
  const double serial = f.cpu_ms + std::max(f.hbm_ms, f.compute_ms);
  f.step_ms = std::max({f.stream_ms, f.disk_ms, serial, f.kv_ms, f.host_ms});
  f.bound = f.step_ms == f.stream_ms   ? "PCIe (streamed weights)"
            : f.step_ms == f.kv_ms     ? "host DRAM (K/V read by CPU attention)"
            : f.step_ms == f.host_ms   ? "host DRAM shared by copies, CPU layers and K/V"
            : f.step_ms == f.disk_ms   ? "disk reads"
            : f.cpu_ms > 0             ? "CPU layers (host DRAM) + GPU layers"
            : f.hbm_ms >= f.compute_ms ? "GPU memory bandwidth"
                                       : "GPU compute";
  return f;
}

std::string profile_path() {
  if (const char* p = std::getenv("FERRY_PROFILE"); p && *p) return p;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/ferry/profile.json";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/ferry/profile.json";
  return ".ferry-profile.json";
}

HardwareProfile load_profile() {
  HardwareProfile hw;
  const std::string path = profile_path();
  std::ifstream f(path);
  if (!f) return hw;
  nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return hw;
  auto get = [&](const char* k, double& v) {
    if (j.contains(k) && j[k].is_number() && j[k].get<double>() > 0) v = j[k].get<double>();
  };
  get("h2d_gbs", hw.h2d_gbs);
  get("hbm_gbs", hw.hbm_gbs);
  get("gemm_tflops", hw.gemm_tflops);
  get("host_dram_gbs", hw.host_dram_gbs);
  get("dram_shared_gbs", hw.dram_shared_gbs);
  get("h2d_shared_gbs", hw.h2d_shared_gbs);
  get("cpu_layer_gbs", hw.cpu_layer_gbs);
  get("cpu_layer_shared_gbs", hw.cpu_layer_shared_gbs);
  get("cpu_layer_nf4_gbs", hw.cpu_layer_nf4_gbs);
  get("cpu_layer_nf4dq_gbs", hw.cpu_layer_nf4dq_gbs);
  get("cpu_layer_q8_gbs", hw.cpu_layer_q8_gbs);
  get("cpu_layer_nf4_shared_gbs", hw.cpu_layer_nf4_shared_gbs);
  get("cpu_layer_nf4dq_shared_gbs", hw.cpu_layer_nf4dq_shared_gbs);
  get("cpu_layer_q8_shared_gbs", hw.cpu_layer_q8_shared_gbs);
  get("gpu_gemv_gbs", hw.gpu_gemv_gbs);
  get("gpu_gemv_nf4_gbs", hw.gpu_gemv_nf4_gbs);
  get("gpu_gemv_nf4dq_gbs", hw.gpu_gemv_nf4dq_gbs);
  get("gpu_gemv_q8_gbs", hw.gpu_gemv_q8_gbs);
  get("gpu_layer_fixed_us", hw.gpu_layer_fixed_us);
  get("gpu_layer_fixed_nf4_us", hw.gpu_layer_fixed_nf4_us);
  get("gpu_layer_fixed_nf4dq_us", hw.gpu_layer_fixed_nf4dq_us);
  get("gpu_layer_fixed_q8_us", hw.gpu_layer_fixed_q8_us);
  get("cpu_tflops", hw.cpu_tflops);
  get("disk_gbs", hw.disk_gbs);
  hw.source = path + " (" + j.value("measured", std::string("ferry calibrate")) + ")";
  return hw;
}

namespace {
// NF4-DQ not measured is priced at NF4's measured rate per parameter: its byte rate is NF4's scaled
// by the bytes' ratio (its decoding costs more, so this is optimistic; calibrate measures it).
double per_param_scale(DType w) {
  if (w != DType::kNF4DQ) return 1.0;
  return static_cast<double>(weight_format_bytes(WeightFormat::kNF4DQ, 8192, 8192)) / static_cast<double>(weight_format_bytes(WeightFormat::kNF4, 8192, 8192));
}
}  // namespace

double cpu_layer_rate(const HardwareProfile& hw, DType w) {
  const double r = w == DType::kNF4DQ && hw.cpu_layer_nf4dq_gbs > 0 ? hw.cpu_layer_nf4dq_gbs
                   : is_nf4(w)                                       ? hw.cpu_layer_nf4_gbs * per_param_scale(w)
                   : w == DType::kQ8                                 ? hw.cpu_layer_q8_gbs
                                                                     : 0;
  return r > 0 ? r : hw.cpu_layer_gbs;
}

double cpu_layer_shared_share(const HardwareProfile& hw, DType w) {
  const double alone = w == DType::kNF4 ? hw.cpu_layer_nf4_gbs : w == DType::kNF4DQ ? hw.cpu_layer_nf4dq_gbs : w == DType::kQ8 ? hw.cpu_layer_q8_gbs : 0;
  const double beside = w == DType::kNF4     ? hw.cpu_layer_nf4_shared_gbs
                        : w == DType::kNF4DQ ? hw.cpu_layer_nf4dq_shared_gbs
                        : w == DType::kQ8    ? hw.cpu_layer_q8_shared_gbs
                                             : 0;
  if (alone > 0 && beside > 0) return std::clamp(beside / alone, 0.1, 1.0);
  if (hw.cpu_layer_shared_gbs > 0) return std::clamp(hw.cpu_layer_shared_gbs / hw.cpu_layer_gbs, 0.1, 1.0);
  return std::clamp((hw.dram_shared_gbs - hw.h2d_shared_gbs) / hw.host_dram_gbs, 0.1, 1.0);
}

double gpu_layer_rate(const HardwareProfile& hw, DType w, int64_t batch) {
  const double r = w == DType::kNF4DQ && hw.gpu_gemv_nf4dq_gbs > 0 ? hw.gpu_gemv_nf4dq_gbs
                   : is_nf4(w)                                      ? hw.gpu_gemv_nf4_gbs * per_param_scale(w)
                   : w == DType::kQ8                                ? hw.gpu_gemv_q8_gbs
                                                                    : hw.gpu_gemv_gbs;
  return batch <= 2 && r > 0 ? std::min(r, hw.hbm_gbs) : hw.hbm_gbs;
}

namespace {
template <class Profile>  // HardwareProfile, const or not
auto& fixed_field(Profile& hw, DType w) {
  return w == DType::kNF4DQ ? hw.gpu_layer_fixed_nf4dq_us : is_nf4(w) ? hw.gpu_layer_fixed_nf4_us : w == DType::kQ8 ? hw.gpu_layer_fixed_q8_us : hw.gpu_layer_fixed_us;
}
}  // namespace

double& gpu_layer_fixed_us(HardwareProfile& hw, DType w) { return fixed_field(hw, w); }

double gpu_layer_fixed_ms(const HardwareProfile& hw, DType w, int64_t batch) { return batch > 2 ? 0 : std::max(fixed_field(hw, w), 0.0) / 1e3; }

Status save_profile(const HardwareProfile& hw, const std::string& path) {
  nlohmann::json j = {{"h2d_gbs", hw.h2d_gbs},         {"hbm_gbs", hw.hbm_gbs},         {"gemm_tflops", hw.gemm_tflops},
                      {"host_dram_gbs", hw.host_dram_gbs}, {"dram_shared_gbs", hw.dram_shared_gbs}, {"h2d_shared_gbs", hw.h2d_shared_gbs}, {"cpu_layer_gbs", hw.cpu_layer_gbs}, {"cpu_layer_shared_gbs", hw.cpu_layer_shared_gbs}, {"cpu_layer_nf4_gbs", hw.cpu_layer_nf4_gbs}, {"cpu_layer_nf4dq_gbs", hw.cpu_layer_nf4dq_gbs}, {"cpu_layer_q8_gbs", hw.cpu_layer_q8_gbs}, {"cpu_layer_nf4_shared_gbs", hw.cpu_layer_nf4_shared_gbs}, {"cpu_layer_nf4dq_shared_gbs", hw.cpu_layer_nf4dq_shared_gbs}, {"cpu_layer_q8_shared_gbs", hw.cpu_layer_q8_shared_gbs}, {"gpu_gemv_gbs", hw.gpu_gemv_gbs}, {"gpu_gemv_nf4_gbs", hw.gpu_gemv_nf4_gbs}, {"gpu_gemv_nf4dq_gbs", hw.gpu_gemv_nf4dq_gbs}, {"gpu_gemv_q8_gbs", hw.gpu_gemv_q8_gbs}, {"gpu_layer_fixed_us", hw.gpu_layer_fixed_us}, {"gpu_layer_fixed_nf4_us", hw.gpu_layer_fixed_nf4_us}, {"gpu_layer_fixed_nf4dq_us", hw.gpu_layer_fixed_nf4dq_us}, {"gpu_layer_fixed_q8_us", hw.gpu_layer_fixed_q8_us}, {"cpu_tflops", hw.cpu_tflops},
                      {"disk_gbs", hw.disk_gbs},       {"measured", hw.source}};
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  const std::string text = j.dump(1) + "\n";
  return write_file_atomic(path, text.data(), text.size());
}

}  // namespace ferry
