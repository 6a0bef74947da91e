// WeightStore: where every weight lives, and the one way executors reach weights. Layers never
// hold raw pointers; they ask the store for a layer's views for the duration of a step.
//
// Today every tensor is served from the host tier: memory-mapped checkpoint bytes, or owned host
// buffers for synthetic models. The offload engine adds pinned-host, GPU-resident and disk tiers
// behind the same `layer()` call, with a placement per layer.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "models/architecture.h"
#include "models/checkpoint.h"
#include "models/config.h"
#include "runtime/host_buffer.h"
#include "runtime/status.h"

namespace ferry {

class WeightStore {
 public:
  // Binds every tensor `cfg` needs to `ckpt`, checking names, shapes and dtypes (F32, F16, BF16).
  // Missing tensors and tensors the architecture does not know are errors that name them.
  static Expected<std::unique_ptr<WeightStore>> from_checkpoint(const ModelConfig& cfg,
                                                                std::unique_ptr<CheckpointReader> ckpt);
  // Materialises a synthetic model in host memory (BF16), in parallel.
  static Expected<std::unique_ptr<WeightStore>> synthetic(const ModelConfig& cfg, const std::string& preset);

  const ModelConfig& config() const { return cfg_; }
  const GlobalWeights& globals() const { return globals_; }
  // Returns the views of layer `il`, valid until the store is destroyed.
  const LayerWeights& layer(int64_t il) const { return layers_[il]; }
  Tier layer_tier(int64_t il) const { return Tier::kHost; }
  // Returns a description of the weights' origin, for `inspect`.
  const std::string& source() const { return source_; }

 private:
  WeightStore() = default;
  ModelConfig cfg_;
  std::string source_;
  std::unique_ptr<CheckpointReader> ckpt_;  // keeps the mappings alive
  std::vector<HostBuffer> owned_;           // synthetic weights
  GlobalWeights globals_;
  std::vector<LayerWeights> layers_;
};

}  // namespace ferry
