// GpuExecutor: the whole model step on one CUDA GPU. BF16 weights, KV and GEMM inputs; float32
// accumulation, GEMM outputs and residual stream; cuBLAS GEMMs (a streaming GEMV for decode), one kernel per op (kernels.h), paged KV blocks in GPU
// memory, and the decode step captured once per batch size as a CUDA graph and replayed.
// No CUDA types here: CPU-only code (the CLI) includes this header; without CUDA, create() says so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "offload/kv_cache.h"
#include "offload/weight_store.h"
#include "runtime/budget.h"
#include "runtime/executor.h"

namespace ferry::gpu {

struct GpuOptions {
  bool cuda_graphs = true;          // capture and replay decode steps (when every layer is resident)
  int device = 0;
  GpuPlan plan;                     // placement per layer (runtime/budget.h); empty: n_resident_layers
  int64_t n_resident_layers = -1;   // without a plan: layers 0..n-1 stay on the GPU, the rest are streamed; -1: all
  int n_slots = 3;                  // staging ring for streamed layers (prefetch depth n_slots - 1)
  int64_t cap_bytes = 0;            // ferry's GPU allocations never pass this (--gpu-mem less the runtime reserve); 0: no cap
  bool kv_on_host = false;          // without a plan: every layer's K/V in host memory, attention on the CPU
  int64_t max_outputs = 0;          // output rows per step the plan's workspace holds (its max_batch): the
                                    // logits are sized for them once rather than grown step by step
  int micro_batches = 2;            // host-KV layers: the step's tokens split so CPU attention of one part
                                    // overlaps the GPU GEMMs of the other (1: no split)
};

class GpuExecutor final : public Executor {
 public:
  // Places every layer of `ws` as opts.plan says: resident layers in GPU memory, streamed ones in
  // pinned host memory or the packed store (ws.packed(), BF16), CPU-computed ones in pinned host
  // memory with their KV in the KvCache's host storage (which the caller creates for those layers).
  // Layers whose K/V the plan keeps in host memory (plan.kv_host) run their GEMMs on the GPU and
  // their attention on the CPU over the KvCache's host storage: per micro-batch, RoPE writes q/k/v
  // into pinned host memory, a host function on a second stream appends K/V and computes attention
  // (cpu/attention.h), and the compute stream waits for it by event and reads the output back.
  // Weights are uploaded, converted from F32/F16, read from the store, or generated in place
  // (synthetic), and `ws` then serves the placed views. Allocates the GPU KV pool for the other layers.
  static Expected<std::unique_ptr<GpuExecutor>> create(WeightStore& ws, const KvCacheShape& kv, const GpuOptions& opts = {});
  ~GpuExecutor() override;

  std::string_view name() const override { return "gpu"; }
  Status begin_step(const StepBatch& batch, const KvCache& kv) override;
  void embed(const GlobalWeights& w) override;
  void layer(int64_t il, const LayerWeights& w, KvCache& kv) override;
  void head(const GlobalWeights& w, float* logits) override;
  Status end_step() override;
  // Greedy, and top-k (k <= 256) with temperature and top-p, run on the GPU.
  bool can_sample(const SamplingParams& p) const override;
  Status sample(const SamplingParams& p, const std::vector<uint64_t>& seeds, uint64_t step, int32_t* out) override;

  // Returns the GPU memory this executor holds, and the most it held, in bytes.
  int64_t device_bytes() const;
  int64_t peak_device_bytes() const;
  // Returns the layers streamed each step (from pinned host memory or disk), the layers computed on
  // the CPU, and the bytes copied so far.
  int64_t n_streamed_layers() const;
  int64_t n_cpu_layers() const;
  int64_t n_kv_host_layers() const;
  int64_t streamed_bytes() const;
  // Returns how many decode graphs were captured and how many steps replayed one.
  int64_t graphs_captured() const;
  int64_t graph_replays() const;

  struct Impl;

 private:
  explicit GpuExecutor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::gpu
