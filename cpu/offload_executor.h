// OffloadCpuExecutor: the CPU backend under --gpu-mem. It runs the offload engine exactly as the GPU
// executor does — the same planner, the same StagingRing with its copy and disk streams and events,
// the same LayerLayout blocks, resident layers copied into capped "device" memory — against the
// EmulatedDevice, and computes every layer with the float32 CpuExecutor. Placement then cannot change
// the math, so resident, streamed-from-host, streamed-from-disk and CPU-computed layers must give
// bit-identical logits: CI checks the engine's plumbing (slot reuse, ordering, reads, checksums)
// without a GPU.
#pragma once

#include <memory>
#include <vector>

#include "cpu/cpu_executor.h"
#include "offload/emulated_device.h"
#include "offload/layer_layout.h"
#include "offload/staging_ring.h"
#include "offload/weight_store.h"
#include "runtime/budget.h"

namespace ferry::cpu {

class OffloadCpuExecutor final : public Executor {
 public:
  // Places every layer of `ws` as `plan` says; the device's memory is capped at `budget_bytes`.
  static Expected<std::unique_ptr<OffloadCpuExecutor>> create(WeightStore& ws, const GpuPlan& plan, int64_t budget_bytes,
                                                              const RingOptions& ring = {});
  ~OffloadCpuExecutor() override;

  std::string_view name() const override { return "cpu (emulated device)"; }
  Status begin_step(const StepBatch& batch, const KvCache& kv) override;
  void embed(const GlobalWeights& w) override;
  void layer(int64_t il, const LayerWeights& w, KvCache& kv) override;
  void head(const GlobalWeights& w, float* logits) override;
  Status end_step() override;

  const EmulatedDevice& device() const { return *dev_; }
  int64_t streamed_bytes() const { return ring_ ? ring_->bytes_copied() : 0; }

 private:
  OffloadCpuExecutor(const ModelConfig& cfg) : cpu_(cfg) {}
  CpuExecutor cpu_;
  std::unique_ptr<EmulatedDevice> dev_;
  GpuPlan plan_;
  std::vector<LayerLayout> layouts_;
  std::vector<LayerWeights> views_;  // resident: device views; CPU-computed: pinned host views
  std::vector<void*> pinned_;
  GlobalWeights globals_;
  std::unique_ptr<StagingRing> ring_;
};

// Returns the bytes a layer of `ws` takes as one block (its LayerLayout in the stored dtypes, rounded
// up to 4 KiB), which the emulated device holds instead of the GPU's BF16.
int64_t stored_layer_bytes(const WeightStore& ws);
int64_t stored_globals_bytes(const WeightStore& ws);

}  // namespace ferry::cpu
