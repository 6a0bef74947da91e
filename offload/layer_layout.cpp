#include "offload/layer_layout.h"

#include <cstring>

namespace ferry {

namespace {

// `quant` (a quantised format, or kBF16 etc. for none): the Linear weights in it, q/k/v and gate/up
// fused (architecture.h); the norms and biases in `dt`.
LayerLayout build(const ModelConfig& cfg, int64_t il, const std::array<DType, kLayerTensorCount>& dt, DType quant) {
  LayerLayout l;
  const bool q = is_quantized(quant);
  const auto specs = layer_tensor_specs(cfg, il, q);
  uint64_t at = 0;
  for (int t = 0; t < kLayerTensorCount; ++t) {
    l.present[t] = !specs[t].name.empty();
    const bool linear = t == kWq || t == kWk || t == kWv || t == kWo || t == kWGate || t == kWUp || t == kWDown;
    l.dtype[t] = q && linear ? quant : dt[t];
    l.offset[t] = at;
    if (!l.present[t]) continue;
    l.shapes.t[t] = TensorView::contiguous(nullptr, l.dtype[t], specs[t].shape);
    at += static_cast<uint64_t>(l.shapes.t[t].nbytes());
  }
  l.bytes = at;
  return l;
}

}  // namespace

LayerLayout layer_layout(const ModelConfig& cfg, int64_t il, DType dtype) {
  std::array<DType, kLayerTensorCount> dt;
  dt.fill(is_quantized(dtype) ? DType::kBF16 : dtype);
  return build(cfg, il, dt, dtype);
}

LayerLayout layer_layout(const ModelConfig& cfg, int64_t il, const LayerWeights& w) {
  std::array<DType, kLayerTensorCount> dt;
  for (int t = 0; t < kLayerTensorCount; ++t) dt[t] = w.t[t].n_dims > 0 ? w.t[t].dtype : DType::kBF16;
  return build(cfg, il, dt, is_quantized(linear_dtype(w)) ? linear_dtype(w) : DType::kBF16);
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
