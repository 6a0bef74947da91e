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
#include "offload/disk_reader.h"
#include "offload/packed_store.h"
#include "runtime/host_buffer.h"
#include "runtime/status.h"

namespace ferry {

struct BnbLinear;  // one Linear weight of a bitsandbytes 4-bit checkpoint (weight_store.cpp)

class WeightStore {
 public:
  // Binds every tensor `cfg` needs to `ckpt`, checking names, shapes and dtypes (F32, F16, BF16).
  // Missing tensors and tensors the architecture does not know are errors that name them.
  static Expected<std::unique_ptr<WeightStore>> from_checkpoint(const ModelConfig& cfg,
                                                                std::unique_ptr<CheckpointReader> ckpt);
  // Materialises a synthetic model in host memory (BF16), in parallel.
  // With `host` false nothing is allocated: the views carry shapes only (data null) and an executor
  // generates the values where it keeps them (see synthetic_info).
  static Expected<std::unique_ptr<WeightStore>> synthetic(const ModelConfig& cfg, const std::string& preset, bool host = true);

  // Serves every layer from the packed store in `dir` (written by `ferry pack`): each layer is read
  // (io_uring, checksummed) into one of two host slots when acquired, and the next layer's read
  // starts at once. The globals are read once and kept in host memory.
  static Expected<std::unique_ptr<WeightStore>> from_packed(const ModelConfig& cfg, const std::string& dir,
                                                            const DiskReaderOptions& opts = {});
  ~WeightStore();

  // Quantises every layer's Linear weights to `q` (kNF4 or kQ8, models/weight_format.h) in host
  // memory, q/k/v and gate/up fused (architecture.h); norms and biases become BF16. The source
  // tensors are released where the store owns them. A shape-only synthetic store only takes the
  // format on (the executor generates and quantises where it keeps the weights). Errors name the
  // tensor whose shape the format cannot hold. `shapes_only`: only the layers' views change (data
  // null), for planning without converting any weights.
  Status quantize(DType q, bool shapes_only = false);
  // Quantises the lm_head to `q` (kQ8 or kNF4: formats without a second pass over the weight) in host
  // memory (--quant-head); a shape-only view where the executor generates it. Refused, naming the flag,
  // for a model whose lm_head is its token embedding and for a packed store (it holds a BF16 one).
  Status quantize_head(DType q, bool shapes_only = false);

  const ModelConfig& config() const { return cfg_; }
  // Returns layer `il`'s weights ready to compute with: for disk-tier layers it waits for the read
  // (started when the previous layer was acquired) and starts reading the next layer: `next`, or
  // il + 1 (wrapping to 0) when negative (a backward pass walks the layers down). The views stay
  // valid until the layer after next is acquired.
  Expected<const LayerWeights*> acquire(int64_t il, int64_t next = -1);
  const GlobalWeights& globals() const { return globals_; }
  // Returns the views of layer `il`, valid until the store is destroyed.
  const LayerWeights& layer(int64_t il) const { return layers_[il]; }
  Tier layer_tier(int64_t il) const { return layer_tier_[il]; }
  // Serves layer `il` from `views` (in `tier`) from now on. The caller owns that memory and keeps it
  // alive as long as the store is used.
  // The store stops reading the layer itself (an executor that streams a disk-tier layer through its
  // own ring places shape-only views with Tier::kDisk).
  void place_layer(int64_t il, const LayerWeights& views, Tier tier) {
    layers_[il] = views;
    layer_tier_[il] = tier;
    if (!store_reads_.empty()) store_reads_[il] = false;
  }
  void place_globals(const GlobalWeights& views) { globals_ = views; }
  // Synthetic stores can regenerate any tensor in place (on the GPU, say) instead of copying it.
  struct SyntheticInfo {
    std::string name;
    int64_t fan_in = 0;
    bool is_norm = false;
  };
  bool is_synthetic() const { return synthetic_; }
  // Returns how to regenerate layer tensor `t` of layer `il` (or global `g` with il = -1).
  SyntheticInfo synthetic_info(int64_t il, int t) const;
  // Returns a description of the weights' origin, for `inspect`.
  const std::string& source() const { return source_; }
  // The packed store behind a --disk model (null otherwise).
  const PackedManifest* packed() const { return manifest_.get(); }

 private:
  WeightStore() = default;
  // A bitsandbytes 4-bit checkpoint's Linear weights (cfg.checkpoint_quant), bound per layer and
  // LayerTensor, into quantised layer blocks (weight_store.cpp).
  Status import_bnb(const std::vector<std::array<BnbLinear, kLayerTensorCount>>& w);
  template <class Fill>
  Status build_quant_layers(DType q, const std::string& what, Fill&& fill);
  ModelConfig cfg_;
  std::string source_;
  std::unique_ptr<CheckpointReader> ckpt_;  // keeps the mappings alive
  std::vector<HostBuffer> owned_;           // synthetic weights
  GlobalWeights globals_;
  std::vector<LayerWeights> layers_;
  std::vector<Tier> layer_tier_;
  std::vector<bool> store_reads_;  // disk-tier layers the store reads itself in acquire()
  bool synthetic_ = false;
  // Disk tier.
  std::unique_ptr<PackedManifest> manifest_;
  std::unique_ptr<DiskReader> reader_;
  HostBuffer slots_[2];
  int64_t slot_layer_[2] = {-1, -1};  // layer read (or being read) into each slot
  bool slot_pending_[2] = {false, false};
  LayerWeights slot_views_[2];
  Status prefetch(int64_t il);
};

}  // namespace ferry
