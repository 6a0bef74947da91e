#include "runtime/tensor.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>

#include "models/weight_format.h"
#include "runtime/status.h"

namespace ferry {

namespace detail {
void check_failed(const char* file, int line, const char* cond, const char* msg) {
  std::fprintf(stderr, "ferry: internal check failed at %s:%d: %s %s\n", file, line, cond, msg);
  std::fflush(stderr);
  std::abort();
}
}  // namespace detail

std::string strprintf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  va_list ap2;
  va_copy(ap2, ap);
  int n = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string s(n > 0 ? n : 0, '\0');
  if (n > 0) std::vsnprintf(s.data(), n + 1, fmt, ap2);
  va_end(ap2);
  return s;
}

namespace {
struct DTypeInfo {
  DType t;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kF32, "F32", 4},     {DType::kF16, "F16", 2},         {DType::kBF16, "BF16", 2},
    {DType::kI32, "I32", 4},     {DType::kI64, "I64", 8},         {DType::kU8, "U8", 1},
    {DType::kI8, "I8", 1},       {DType::kF64, "F64", 8},         {DType::kI16, "I16", 2},
    {DType::kBool, "BOOL", 1},   {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};
}  // namespace

size_t dtype_size(DType t) {
  for (const auto& d : kDTypes)
    if (d.t == t) return d.size;
  FERRY_CHECK_MSG(false, "unknown or quantised dtype");
  return 0;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string_view dtype_name(DType t) {
  if (t == DType::kNF4) return "NF4";
  if (t == DType::kNF4DQ) return "NF4DQ";
  if (t == DType::kQ8) return "Q8";
  for (const auto& d : kDTypes)
    if (d.t == t) return d.name;
  return "?";
}

bool dtype_from_name(std::string_view name, DType* out, bool quantized) {
  for (const auto& d : kDTypes) {
    if (d.name == name) {
      *out = d.t;
      return true;
    }
  }
  if (quantized && (name == "NF4" || name == "NF4DQ" || name == "Q8")) {
    *out = name == "NF4" ? DType::kNF4 : name == "NF4DQ" ? DType::kNF4DQ : DType::kQ8;
    return true;
  }
  return false;
}

int64_t tensor_bytes(DType t, const int64_t* shape, int n_dims) {
  int64_t n = 1;
  for (int i = 0; i < n_dims; ++i) n *= shape[i];
  if (!is_quantized(t)) return n * static_cast<int64_t>(dtype_size(t));
  const int64_t cols = n_dims > 0 ? shape[n_dims - 1] : 1;
  return quant_layout(t, cols > 0 ? n / cols : 0, cols).bytes;
}

std::string_view tier_name(Tier t) {
  switch (t) {
    case Tier::kHost: return "host";
    case Tier::kPinnedHost: return "pinned";
    case Tier::kDevice: return "gpu";
    case Tier::kDisk: return "disk";
  }
  return "?";
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, Tier tier) {
  return contiguous(data, dtype, std::vector<int64_t>(shape), tier);
}

TensorView TensorView::contiguous(void* data, DType dtype, const std::vector<int64_t>& shape, Tier tier) {
  FERRY_CHECK(shape.size() <= kMaxDims);
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.tier = tier;
  v.n_dims = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int d = v.n_dims - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < n_dims; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t stride = 1;
  for (int d = n_dims - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != stride) return false;
    stride *= shape[d];
  }
  return true;
}

std::string TensorView::describe() const {
  std::string s(dtype_name(dtype));
  s += "[";
  for (int i = 0; i < n_dims; ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xffu) - 127 + 15;
  uint32_t mant = u & 0x7fffffu;
  if (((u >> 23) & 0xffu) == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(half);
}

void convert_to_f32(const void* src, DType dtype, float* dst, size_t n) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    default:
      FERRY_CHECK_MSG(false, "convert_to_f32: dtype is not F32/F16/BF16");
  }
}

}  // namespace ferry
