// Without CUDA there is no GPU executor: create() says why; nothing else is reachable.
#include "gpu/gpu_executor.h"

namespace ferry::gpu {

struct GpuExecutor::Impl {};

GpuExecutor::GpuExecutor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuExecutor::~GpuExecutor() = default;
Expected<std::unique_ptr<GpuExecutor>> GpuExecutor::create(WeightStore&, const KvCacheShape&, const GpuOptions&) {
  return unsupported("--device gpu: ferry was built without CUDA (-DFERRY_CUDA=OFF or no nvcc)");
}
Status GpuExecutor::begin_step(const StepBatch&, const KvCache&) { return unsupported("built without CUDA"); }
void GpuExecutor::embed(const GlobalWeights&) {}
void GpuExecutor::layer(int64_t, const LayerWeights&, KvCache&) {}
void GpuExecutor::head(const GlobalWeights&, float*) {}
Status GpuExecutor::end_step() { return unsupported("built without CUDA"); }
bool GpuExecutor::can_sample(const SamplingParams&) const { return false; }
Status GpuExecutor::sample(const SamplingParams&, const std::vector<uint64_t>&, uint64_t, int32_t*) { return unsupported("built without CUDA"); }
int64_t GpuExecutor::device_bytes() const { return 0; }
int64_t GpuExecutor::peak_device_bytes() const { return 0; }
int64_t GpuExecutor::n_streamed_layers() const { return 0; }
int64_t GpuExecutor::n_cpu_layers() const { return 0; }
int64_t GpuExecutor::n_kv_host_layers() const { return 0; }
int64_t GpuExecutor::streamed_bytes() const { return 0; }
int64_t GpuExecutor::graphs_captured() const { return 0; }
int64_t GpuExecutor::graph_replays() const { return 0; }

}  // namespace ferry::gpu
