// Memory budgets: parsing sizes ("8G", "512M", "24GiB") and planning how many layers stay resident
// on the GPU under --gpu-mem, the rest streamed through a ring of staging slots. The plan counts
// every byte ferry allocates on the GPU (weights, KV, staging slots, activations, cuBLAS workspace);
// when even the minimum working set (no resident layer) does not fit, the error states the minimum.
#pragma once

#include <cstdint>
#include <string>

#include "models/config.h"
#include "runtime/status.h"

namespace ferry {

// Parses a size with an optional K/M/G/T suffix (powers of 1024; "B", "iB" allowed): "8G" -> 8 GiB.
Expected<int64_t> parse_size(const std::string& text, const char* flag);
// Formats bytes as "8.00 GiB".
std::string format_bytes(double bytes);

struct GpuPlanInput {
  int64_t budget_bytes = 0;      // --gpu-mem
  int64_t kv_bytes = 0;          // the KV pool
  int64_t max_step_tokens = 512;
  int64_t max_batch = 1;
  int n_slots = 3;               // staging ring when any layer is streamed
  // What the CUDA runtime itself takes beyond ferry's allocations once kernels and cuBLAS are loaded
  // (measured on the H100: notes/offload.md), kept free so the driver's count stays under the budget.
  int64_t runtime_reserve_bytes = int64_t{384} << 20;
};

struct GpuPlan {
  int64_t n_resident = 0;   // layers 0 .. n_resident-1 stay on the GPU
  int64_t n_streamed = 0;   // the rest come from pinned host memory each step
  int64_t layer_bytes = 0;  // one layer, BF16
  int64_t globals_bytes = 0;
  int64_t slots_bytes = 0;
  int64_t workspace_bytes = 0;
  int64_t reserve_bytes = 0;
  int64_t total_bytes = 0;  // what the plan uses, the reserve included
  std::string describe() const;
};

// Returns the bytes of one layer on the GPU (BF16, all tensors).
int64_t gpu_layer_bytes(const ModelConfig& cfg);
// Returns an upper bound of the GPU executor's activation workspace for steps of up to
// `max_step_tokens` tokens and `max_batch` output rows (including the cuBLAS workspace).
int64_t gpu_workspace_bytes(const ModelConfig& cfg, int64_t max_step_tokens, int64_t max_batch);
// Plans resident vs streamed layers under the budget, or says why it cannot (naming --gpu-mem).
Expected<GpuPlan> plan_gpu(const ModelConfig& cfg, const GpuPlanInput& in);

// Hardware rates for the floor of a plan. The built-in profile is what was measured on the H100 GPU
// host on 2026-11-23 (notes/gpu.md, notes/offload.md); `ferry calibrate` will measure the user's.
struct HardwareProfile {
  double h2d_gbs = 54.9;       // pinned host -> device
  double hbm_gbs = 3025;       // device memory, bytes read + written per second
  double gemm_tflops = 790;    // BF16 dense
  std::string source = "built-in (H100 host, 2026-11-23)";
};

struct PlanFloor {
  double stream_ms = 0;   // streamed weight bytes over the H2D rate
  double hbm_ms = 0;      // every weight byte read once from device memory
  double compute_ms = 0;  // 2 x parameters x batch over the GEMM rate
  double step_ms = 0;     // the largest of the three (they overlap)
  const char* bound = "";
};
// Returns the decode-step floor of `plan` at batch `batch`.
PlanFloor plan_floor(const ModelConfig& cfg, const GpuPlan& plan, int64_t batch, const HardwareProfile& hw);

}  // namespace ferry
