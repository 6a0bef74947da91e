// Memory budgets: parsing sizes ("8G", "512M", "24GiB") and planning how many layers stay resident
// on the GPU under --gpu-mem, the rest streamed through a ring of staging slots. The plan counts
// every byte ferry allocates on the GPU (weights, KV, staging slots, activations, cuBLAS workspace);
// when even the minimum working set (no resident layer) does not fit, the error states the minimum.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <vector>

#include "models/config.h"
#include "runtime/tensor.h"
#include "runtime/status.h"

namespace ferry {

// Parses a size with an optional K/M/G/T suffix (powers of 1024; "B", "iB" allowed): "8G" -> 8 GiB.
Expected<int64_t> parse_size(const std::string& text, const char* flag);
// Formats bytes as "8.00 GiB".
std::string format_bytes(double bytes);

// Where a decoder layer runs and where its weights live.
enum class Place : uint8_t {
  kResident,  // weights on the GPU for the whole run
  kStreamed,  // weights copied to a GPU staging slot every step (from pinned host memory or disk)
  kCpu,       // computed on the CPU from pinned host memory; only activations cross PCIe
};
const char* place_name(Place p);

// Where a layer's K/V blocks live. On the host, the CPU computes that layer's attention
// (cpu/attention.h) while the GPU runs the GEMMs (the heterogeneous pipeline, gpu/gpu_executor.h).
// kSplit: plan_gpu picks by the cost model how many layers' K/V go to the host; each such layer
// frees GPU memory for resident weights, and the GPU-K/V layers are the last ones (notes/kv.md,
// "Split placements"). kAuto: the same choice, except that K/V which fit on the GPU stay there
// unless the host is predicted to shorten the step by 10% or more.
enum class KvPlace : uint8_t { kAuto, kGpu, kHost, kSplit };
Expected<KvPlace> parse_kv_place(const std::string& s);

// Hardware rates the cost model uses. The built-in profile is what `ferry calibrate` measured on the
// H100 GPU host (notes/offload.md); `ferry calibrate` measures the user's machine and caches it.
struct HardwareProfile {
  double h2d_gbs = 54.9;        // pinned host -> device copies
  double hbm_gbs = 2976;        // device memory, bytes read + written per second
  double gemm_tflops = 751;     // GPU BF16 dense
  double host_dram_gbs = 95.3;  // host memory read, all cores (the floor of a CPU-computed layer; integer sums, 2026-11-24)
  // Host DRAM read by all cores and the copy engine's H2D at once, the two rates summed: the
  // weights' DMA and the CPU's K/V reads share it (CPU 76.1 + H2D 38.3 GB/s, 2026-11-24, notes/kv.md).
  double dram_shared_gbs = 114.5;
  // Copies while every core reads host memory: beside the CPU layer's kernels where `ferry
  // calibrate` measured that (cpu_layer_shared_gbs > 0), else beside a plain read.
  double h2d_shared_gbs = 38.3;
  double cpu_layer_gbs = 70.2;  // weight bytes per second through ferry's CPU layer at batch 1
  // The CPU layer's rate while the copy engine reads beside it (0: not measured; the planner then
  // scales cpu_layer_gbs by the plain read's share of dram_shared_gbs).
  double cpu_layer_shared_gbs = 0;
  // The same for NF4 and int8 weights (bytes of the format per second; 0: not measured, the BF16
  // rate is used). Decoding costs instructions: NF4 ran at 0.5-0.7x the BF16 byte rate (notes/quant.md).
  double cpu_layer_nf4_gbs = 0;
  double cpu_layer_nf4dq_gbs = 0;  // 0: NF4's rate per parameter
  double cpu_layer_q8_gbs = 0;
  // The same beside the copy engine (0: not measured; BF16's share of its alone rate is used). A
  // decoding kernel keeps a different share of its rate than the BF16 one (notes/h200.md).
  double cpu_layer_nf4_shared_gbs = 0;
  double cpu_layer_nf4dq_shared_gbs = 0;
  double cpu_layer_q8_shared_gbs = 0;
  // The GPU's decode GEMV at one row: bytes of BF16, NF4 and int8 weights per second (0: not
  // measured; the HBM rate is used). NF4's decoding costs instructions: it ran at 24-58% of the
  // HBM rate on the H200 (notes/quant.md). The floor keeps the HBM rate; the prediction uses these.
  double gpu_gemv_gbs = 0;
  double gpu_gemv_nf4_gbs = 0;
  double gpu_gemv_nf4dq_gbs = 0;  // 0: NF4's rate per parameter
  double gpu_gemv_q8_gbs = 0;
  // A decode layer's time on the GPU beyond its weight bytes at that rate, batch 1-2, microseconds
  // (0: not measured): its RMSNorms and attention, the launches and each GEMV's ramp and tail.
  // `ferry calibrate` times resident synthetic Llama-2-7B steps at 2 and 6 layers, per format.
  double gpu_layer_fixed_us = 0;
  double gpu_layer_fixed_nf4_us = 0;
  double gpu_layer_fixed_nf4dq_us = 0;
  double gpu_layer_fixed_q8_us = 0;
  double cpu_tflops = 1.47;     // ferry's CPU BF16 GEMM at 64 rows (oneDNN, AMX)
  double disk_gbs = 1.65;       // O_DIRECT io_uring reads of a packed store, checksums verified
  std::string source = "built-in (ferry calibrate on the H100 host, 2026-11-23; host DRAM 2026-11-24)";
};
// Returns the profile cached by `ferry calibrate` (FERRY_PROFILE, else $XDG_CACHE_HOME/ferry/
// profile.json, else ~/.cache/ferry/profile.json), or the built-in one when there is none.
HardwareProfile load_profile();
// Returns the rate (bytes of the format per second) of ferry's CPU layer at batch 1 for weights in `w`.
double cpu_layer_rate(const HardwareProfile& hw, DType w);
// The share of that rate a CPU layer of `w` keeps beside the copy engine: measured for the format,
// else BF16's (cpu_layer_shared_gbs / cpu_layer_gbs), else from the shared DRAM rates.
double cpu_layer_shared_share(const HardwareProfile& hw, DType w);
// Returns the rate (bytes per second) at which a GPU layer of `batch` rows reads weights in `w`: the
// measured GEMV rate at one or two rows where calibrate measured it (never above the HBM rate),
// else the HBM rate.
double gpu_layer_rate(const HardwareProfile& hw, DType w, int64_t batch);
// A decode layer's fixed GPU time in ms for weights `w` at `batch` rows (HardwareProfile::gpu_layer_fixed_*;
// 0 above two rows, where it was not measured).
double gpu_layer_fixed_ms(const HardwareProfile& hw, DType w, int64_t batch);
// The profile's field of that time for weights `w` (calibrate fills it).
double& gpu_layer_fixed_us(HardwareProfile& hw, DType w);
std::string profile_path();
Status save_profile(const HardwareProfile& hw, const std::string& path);

struct GpuPlanInput {
  int64_t budget_bytes = 0;      // --gpu-mem (<= 0: everything resident)
  int64_t host_budget_bytes = -1;  // --host-mem: pinned host bytes for non-resident layers (-1: unlimited)
  bool have_disk = false;        // --disk: layers that fit nowhere else are read from the packed store
  int64_t kv_bytes = 0;          // the KV pool, were it on the GPU
  KvPlace kv = KvPlace::kAuto;   // --kv: where K/V live
  int64_t max_step_tokens = 512;
  int64_t max_batch = 1;         // the decode batch the plan is optimised for
  int64_t cpu_layers = -1;       // --cpu-layers: exactly this many CPU-computed layers (-1: the cost model chooses)
  int64_t kv_host_layers = -1;   // --kv-host-layers with kSplit: exactly this many host-K/V layers (-1: the cost model chooses)
  bool emulated = false;         // the emulated device: no CUDA runtime, workspace or cuBLAS on it
  int n_slots = 3;               // staging ring when any layer is streamed
  int64_t layer_bytes = 0;       // one layer on the device (0: BF16, gpu_layer_bytes)
  int64_t globals_bytes = 0;     // the globals on the device (0: BF16)
  int64_t embedding_bytes = 0;   // of those, the token embedding table (0: BF16); moved to pinned host memory when that helps (GpuPlan)
  bool embedding_may_leave_gpu = true;  // false: the embedding stays on the GPU (FERRY_EMBEDDING=gpu)
  int64_t head_bytes = 0;        // the final norm and the lm_head as stored on the device (0: BF16; --quant-head)
  DType weights = DType::kBF16;  // the layers' Linear format: NF4 / Q8 have their CPU rate, and the workspace a dequantisation tile
  HardwareProfile hw;
  // What the CUDA runtime itself takes beyond ferry's allocations once kernels and cuBLAS are loaded
  // (measured on the H100: notes/offload.md), kept free so the driver's count stays under the budget.
  int64_t runtime_reserve_bytes = int64_t{384} << 20;
};

struct GpuPlan {
  std::vector<Place> place;  // per layer
  std::vector<Tier> source;  // per layer: kDevice (resident), kPinnedHost or kDisk
  std::vector<bool> kv_host; // per layer: K/V in host memory, attention on the CPU (CPU-computed layers too)
  int64_t n_kv_host = 0;     // layers with kv_host, CPU-computed ones included
  int64_t kv_gpu_bytes = 0;  // the KV pool on the GPU
  int64_t n_resident = 0, n_streamed = 0, n_cpu = 0, n_disk = 0;  // n_disk: streamed layers read from disk
  int64_t layer_bytes = 0;  // one layer, BF16
  int64_t globals_bytes = 0;  // on the GPU
  // The token embedding table (untied from the lm_head) in pinned host memory instead of on the GPU,
  // where not every layer fits on the GPU and --host-mem holds it (0 with --disk and no --host-mem):
  // a step reads one row a token of it (the GPU over PCIe), and on the GPU Llama-3's 128256 x 8192
  // table took the room of 4-5 NF4 layers of the 70B.
  bool embedding_on_host = false;
  int64_t embedding_host_bytes = 0;
  int64_t head_bytes = 0;  // the final norm and the lm_head, read every step (head_bytes(), or --quant-head's)
  int64_t slots_bytes = 0;
  int64_t workspace_bytes = 0;
  int64_t reserve_bytes = 0;
  int64_t total_bytes = 0;  // GPU bytes the plan uses, the reserve included
  int64_t host_bytes = 0;   // pinned host bytes of layer weights
  int64_t disk_bytes = 0;   // bytes read from disk per step
  double predicted_ms = 0;  // decode step at max_batch, from the cost model
  std::string describe() const;
  // Returns e.g. "0-14 resident, 15 cpu, 16 streamed, ...", runs of equal placement collapsed.
  std::string placement() const;
};

// Returns the bytes of one layer on the GPU: BF16, or its Linear weights in `quant` (NF4, Q8) through
// the format's layout (models/weight_format.h).
int64_t gpu_layer_bytes(const ModelConfig& cfg, DType quant = DType::kBF16);
// Returns the fp32 absmax the GPU stages while it quantises one of a layer's weights to `quant`
// (NF4-DQ: the largest weight's absmax, rounded up to 64; 0 for the other formats).
int64_t quant_stage_floats(const ModelConfig& c, DType quant);
// Returns the elements of the BF16 tile the GPU dequantises quantised weights into for cuBLAS (the
// GPU executor allocates it; the plan counts it). Generating NF4-DQ weights, its end holds the
// stage above (2 elements a float) and the rows being quantised the rest.
int64_t quant_tile_elems(const ModelConfig& c, DType quant);
// Returns the parameters of one layer's Linear weights (its FLOPs per token are twice this).
int64_t layer_params(const ModelConfig& cfg);
// Returns an upper bound of the GPU executor's activation workspace for steps of up to
// `max_step_tokens` tokens and `max_batch` output rows (including the cuBLAS workspace).
int64_t gpu_workspace_bytes(const ModelConfig& cfg, int64_t max_step_tokens, int64_t max_batch);
// Plans each layer's placement under the budgets, or says why it cannot (naming the flag): the most
// resident layers that fit, then, among the rest, the number of CPU-computed layers that minimises
// the predicted step time, host memory before disk. CPU layers are spread among the streamed ones,
// and with host K/V the resident layers among the others too, so the copy stream keeps running
// while the GPU or the CPU computes.
Expected<GpuPlan> plan_gpu(const ModelConfig& cfg, const GpuPlanInput& in);

struct PlanFloor {
  double stream_ms = 0;   // streamed weight bytes over the H2D rate
  double disk_ms = 0;     // disk-tier bytes over the disk rate
  double cpu_ms = 0;      // CPU-computed layers' bytes over host DRAM bandwidth (+ their FLOPs)
  double hbm_ms = 0;      // every GPU-computed weight byte read once from device memory
  double compute_ms = 0;  // 2 x GPU-computed parameters x batch over the GEMM rate
  double kv_ms = 0;       // host-resident K/V (batch x context tokens) over host DRAM bandwidth
  double host_ms = 0;     // every host byte a step reads (copies, CPU layers, K/V) over the shared DRAM rate
  double step_ms = 0;     // the largest of these (they overlap)
  const char* bound = "";
};
// Returns the bytes of the weights the head reads every step: the final norm and the lm_head (the
// embedding table when tied).
inline int64_t head_bytes(const ModelConfig& c) { return 2 * (c.n_vocab * c.n_embd + c.n_embd); }
// Returns the decode-step floor of `plan` at batch `batch`: every engine at its peak rate, all
// running at once.
PlanFloor plan_floor(const ModelConfig& cfg, const GpuPlan& plan, int64_t batch, const HardwareProfile& hw, double avg_context = 0);

}  // namespace ferry
