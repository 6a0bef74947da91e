// Tensor views: a pointer with a dtype, a shape, strides and the tier the bytes live in. Views do not
// own memory; the WeightStore, KvCache and executors own it. No CUDA types here: CPU-only code
// includes this header.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/check.h"

namespace ferry {

// kNF4, kNF4DQ and kQ8 are ferry's quantised weight formats (models/weight_format.h): a tensor of them
// is one blob of codes and scales, its size given by tensor_bytes(), not by an element size.
enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kI64, kU8, kI8, kF64, kI16, kBool, kF8E4M3, kF8E5M2, kNF4, kQ8, kNF4DQ };

// Returns the size of one element in bytes (not for quantised formats: see tensor_bytes).
size_t dtype_size(DType t);
// Returns the safetensors name ("BF16", "F32", ...), or ferry's ("NF4", "NF4DQ", "Q8") for quantised formats.
std::string_view dtype_name(DType t);
// "[4096, 11008]", for messages.
std::string shape_str(const std::vector<int64_t>& shape);
// Returns true and sets *out if `name` is a safetensors dtype name (quantised formats only with
// `quantized`: a safetensors file never holds them).
bool dtype_from_name(std::string_view name, DType* out, bool quantized = false);
// Whether `t` is one of ferry's quantised weight formats.
inline bool is_quantized(DType t) { return t == DType::kNF4 || t == DType::kNF4DQ || t == DType::kQ8; }
// Whether `t` holds NF4 codes (with fp32 or double-quantised absmax): the same code bytes either way.
inline bool is_nf4(DType t) { return t == DType::kNF4 || t == DType::kNF4DQ; }
// Returns the bytes of a contiguous tensor of `shape` in `t` (codes and scales for quantised formats).
int64_t tensor_bytes(DType t, const int64_t* shape, int n_dims);

// Where a tensor's bytes are. Executors only touch tiers they can address directly.
enum class Tier : uint8_t {
  kHost,        // ordinary (pageable or mmapped) host memory
  kPinnedHost,  // page-locked host memory, DMA-able by the GPU
  kDevice,      // GPU memory
  kDisk,        // a packed store on disk: must be staged before use
};
std::string_view tier_name(Tier t);

inline constexpr int kMaxDims = 4;

// A strided view of n-dimensional data. shape[0] is the outermost (slowest) dimension, as in
// PyTorch and safetensors; strides are in elements.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Tier tier = Tier::kHost;
  int n_dims = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};

  // Returns a contiguous view of `data` with the given shape.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Tier tier = Tier::kHost);
  static TensorView contiguous(void* data, DType dtype, const std::vector<int64_t>& shape, Tier tier = Tier::kHost);

  bool empty() const { return data == nullptr; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(tensor_bytes(dtype, shape.data(), n_dims)); }
  bool is_contiguous() const;
  int64_t dim(int i) const {
    FERRY_DCHECK(i >= 0 && i < n_dims);
    return shape[i];
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
  // Returns e.g. "BF16[4096, 11008]".
  std::string describe() const;
};

// bf16 and f16 <-> f32 conversions (round to nearest even).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Branch-free (a select, not a jump), so that loops over it vectorise (cpu::f32_to_bf16_row).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;  // NaN stays NaN
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of `src` (F32, F16 or BF16) to float32.
void convert_to_f32(const void* src, DType dtype, float* dst, size_t n);

}  // namespace ferry
