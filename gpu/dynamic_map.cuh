// NF4-DQ's double-quantised absmax on the GPU (models/weight_format.h): bitsandbytes' signed 8-bit
// dynamic map in constant memory, and the dequantisation both the GEMV and the dequantising kernels
// use. Each .cu including this has its own copy of the table (an anonymous namespace).
#pragma once

#include "models/weight_format.h"

namespace ferry::gpu {
namespace {

struct DynamicMap {
  float v[256];
};
constexpr DynamicMap make_dynamic_map() {
  DynamicMap m{};
  for (int i = 0; i < 256; ++i) m.v[i] = kDynamicMapSigned[i];
  return m;
}
__constant__ DynamicMap c_dmap = make_dynamic_map();

// absmax = map[code] * absmax2 + mean, the product and the sum each rounded (bitsandbytes', the host codec's).
__device__ __forceinline__ float dq_absmax(float map_value, float absmax2, float mean) { return __fadd_rn(__fmul_rn(map_value, absmax2), mean); }

}  // namespace
}  // namespace ferry::gpu
