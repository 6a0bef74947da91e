#include "offload/layer_layout.h"

#include <cstring>

namespace ferry {

namespace {

LayerLayout build(const ModelConfig& cfg, int64_t il, const std::array<DType, kLayerTensorCount>& dt) {
  LayerLayout l;
  const auto specs = layer_tensor_specs(cfg, il);
  uint64_t at = 0;
  for (int t = 0; t < kLayerTensorCount; ++t) {
    l.present[t] = !specs[t].name.empty();
    l.dtype[t] = dt[t];
    l.offset[t] = at;
    if (!l.present[t]) continue;
    l.shapes.t[t] = TensorView::contiguous(nullptr, dt[t], specs[t].shape);
    uint64_t n = 1;
    for (int64_t d : specs[t].shape) n *= static_cast<uint64_t>(d);
    at += n * dtype_size(dt[t]);
  }
  l.bytes = at;
  return l;
}

}  // namespace

LayerLayout layer_layout(const ModelConfig& cfg, int64_t il, DType dtype) {
  std::array<DType, kLayerTensorCount> dt;
  dt.fill(dtype);
  return build(cfg, il, dt);
}

LayerLayout layer_layout(const ModelConfig& cfg, int64_t il, const LayerWeights& w) {
  std::array<DType, kLayerTensorCount> dt;
  for (int t = 0; t < kLayerTensorCount; ++t) dt[t] = w.t[t].n_dims > 0 ? w.t[t].dtype : DType::kBF16;
  return build(cfg, il, dt);
}

LayerWeights LayerLayout::views(void* base, Tier tier) const {
  LayerWeights w = shapes;
  for (int t = 0; t < kLayerTensorCount; ++t) {
    if (!present[t]) continue;
    w.t[t].data = base ? static_cast<uint8_t*>(base) + offset[t] : nullptr;
    w.t[t].tier = tier;
  }
  return w;
}

void LayerLayout::gather(const LayerWeights& w, void* dst) const {
  for (int t = 0; t < kLayerTensorCount; ++t) {
    if (!present[t]) continue;
    FERRY_CHECK(w.t[t].dtype == dtype[t] && w.t[t].data != nullptr);
    std::memcpy(static_cast<uint8_t*>(dst) + offset[t], w.t[t].data, w.t[t].nbytes());
  }
}

}  // namespace ferry
