// LayerLayout: one decoder layer's tensors laid out back to back in LayerTensor order (attn_norm,
// wq, wk, wv, [bq, bk, bv], wo, ffn_norm, w_gate, w_up, w_down), with no padding. It is the one
// layout of a layer wherever it is a single block of bytes: a packed-store block on disk, a pinned
// host copy, a staging slot, a resident GPU layer. With BF16 tensors q/k/v and gate/up are adjacent,
// so the GPU runs each group as one GEMM straight from the block.
#pragma once

#include <array>
#include <cstdint>

#include "models/architecture.h"

namespace ferry {

struct LayerLayout {
  std::array<uint64_t, kLayerTensorCount> offset{};
  std::array<DType, kLayerTensorCount> dtype{};
  std::array<bool, kLayerTensorCount> present{};
  uint64_t bytes = 0;
  LayerWeights shapes;  // the views with data null; views() only fills in the pointers
  // Returns the views of the layer whose block starts at `base` (null: shapes only). Cheap: called
  // for every streamed layer of every step.
  LayerWeights views(void* base, Tier tier) const;
  // Copies the tensors of `w` (in this layout's dtypes) into the block at `dst`.
  void gather(const LayerWeights& w, void* dst) const;
};

// The layout of layer `il` with every tensor in `dtype`; a quantised `dtype` (models/weight_format.h)
// applies to the Linear weights, stored fused (qkv, gate_up: architecture.h), the rest in BF16.
LayerLayout layer_layout(const ModelConfig& cfg, int64_t il, DType dtype);
// The layout of layer `il` with each tensor in the dtype `w` holds it in.
LayerLayout layer_layout(const ModelConfig& cfg, int64_t il, const LayerWeights& w);

}  // namespace ferry
