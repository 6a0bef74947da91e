// Weight formats: how a tensor's elements are stored, described once (block size, bytes per block,
// scales) so the recipe, the planner's byte counts, the packed store and the executors can ask
// instead of hard-coding BF16. NF4 is QLoRA's (bitsandbytes): 16 code values from a normal
// distribution's quantiles, blocks of 64 consecutive elements of the row-major weight, one fp32
// absmax per block, each element the nearest code (4 bits, two per byte, the first element in the
// high nibble as bitsandbytes packs them). Double quantisation of the absmax values (8-bit, blocks of
// 256, mean-centred) and int8 per-output-channel are the next formats (issue 19).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ferry {

enum class WeightFormat { kBF16, kNF4 };

struct WeightFormatInfo {
  std::string_view name;
  int64_t block;             // elements per block
  int64_t data_bytes;        // bytes of packed elements per block
  int64_t scale_bytes;       // bytes of scales per block
};

// Returns the description of `f`.
constexpr WeightFormatInfo weight_format_info(WeightFormat f) {
  switch (f) {
    case WeightFormat::kNF4: return {"nf4", 64, 32, 4};
    case WeightFormat::kBF16: break;
  }
  return {"bf16", 1, 2, 0};
}

// Returns the bytes `n` elements take in format `f` (n a multiple of the block, or the last block
// partial and padded).
constexpr int64_t weight_format_bytes(WeightFormat f, int64_t n) {
  const WeightFormatInfo i = weight_format_info(f);
  const int64_t blocks = (n + i.block - 1) / i.block;
  return blocks * (i.data_bytes + i.scale_bytes);
}

// The 16 NF4 code values (bitsandbytes' table, ascending; code 7 is exactly 0).
inline constexpr float kNf4Codes[16] = {-1.0f,
                                        -0.6961928009986877f,
                                        -0.5250730514526367f,
                                        -0.39491748809814453f,
                                        -0.28444138169288635f,
                                        -0.18477343022823334f,
                                        -0.09105003625154495f,
                                        0.0f,
                                        0.07958029955625534f,
                                        0.16093020141124725f,
                                        0.24611230194568634f,
                                        0.33791524171829224f,
                                        0.44070982933044434f,
                                        0.5626170039176941f,
                                        0.7229568362236023f,
                                        1.0f};

// Quantises x[0..n) to NF4: packed[(n + 1) / 2] bytes (high nibble first), absmax[ceil(n / 64)].
// Each element is scaled by its block's absmax (a zero block stores absmax 0 and code 7) and takes
// the nearest code (ties to the lower one, as bitsandbytes' midpoint comparisons do).
void quantize_nf4(const float* x, int64_t n, uint8_t* packed, float* absmax);
// The inverse: y[i] = code(i) * absmax[i / 64].
void dequantize_nf4(const uint8_t* packed, const float* absmax, int64_t n, float* y);

}  // namespace ferry
