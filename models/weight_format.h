// Weight formats: how a weight's elements are stored, described once (block size, codes, scales,
// where each part sits in the tensor's bytes) so the recipe, the planner's byte counts, the packed
// store and both executors ask here instead of hard-coding BF16.
//
// - NF4 is QLoRA's (bitsandbytes): 16 code values from a normal distribution's quantiles, blocks of
//   64 consecutive elements of the row-major weight, one fp32 absmax per block, each element the
//   nearest code (4 bits, two a byte, the first element in the high nibble as bitsandbytes packs
//   them). Double quantisation (QLoRA's: quantize_absmax_dq) stores the absmax values as
//   bitsandbytes' signed 8-bit dynamic codes in blocks of 256 after subtracting their mean; it is a
//   codec only so far: the NF4 blob keeps fp32 absmax (0.5625 bytes a parameter, the 0.56 the GPU's
//   floor counts), and neither the store nor an executor uses the double-quantised form yet.
// - Q8 is int8 per output channel: each row scaled by max|row| / 127, rounded to nearest.
//
// A quantised 2-D weight [rows, cols] (cols a multiple of the format's block) is one blob: the codes,
// then the scales, each part starting 16-byte aligned (quant_layout), so a GPU reads either with
// 16-byte loads. Row r's codes start at r * cols * bits / 8, its scales at r * cols / block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "runtime/tensor.h"

namespace ferry {

enum class WeightFormat { kBF16, kNF4, kInt8 };

struct WeightFormatInfo {
  std::string_view name;  // as the CLI spells it (--quant)
  DType dtype;            // the tensor dtype that carries it
  int64_t block;          // elements per scale (0: one per row)
  int bits;               // bits per element
};

// Returns the description of `f`.
constexpr WeightFormatInfo weight_format_info(WeightFormat f) {
  switch (f) {
    case WeightFormat::kNF4: return {"nf4", DType::kNF4, 64, 4};
    case WeightFormat::kInt8: return {"int8", DType::kQ8, 0, 8};
    case WeightFormat::kBF16: break;
  }
  return {"bf16", DType::kBF16, 1, 16};
}
// Parses "bf16", "nf4" or "int8".
bool weight_format_from_name(std::string_view name, WeightFormat* out);

// Where a quantised weight's parts are: codes at 0, fp32 scales at `scales`; `bytes` in all.
struct QuantLayout {
  int64_t scales = 0;
  int64_t n_scales = 0;
  int64_t bytes = 0;
};
constexpr int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }
constexpr QuantLayout quant_layout(DType t, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  if (t == DType::kNF4) {
    const int64_t codes = align16((n + 1) / 2), ns = (n + 63) / 64;
    return {codes, ns, codes + align16(4 * ns)};
  }
  if (t == DType::kQ8) return {align16(n), rows, align16(n) + align16(4 * rows)};
  return {0, 0, 0};
}
// Returns the bytes a [rows, cols] weight takes in `f`.
constexpr int64_t weight_format_bytes(WeightFormat f, int64_t rows, int64_t cols) {
  return f == WeightFormat::kBF16 ? 2 * rows * cols : quant_layout(weight_format_info(f).dtype, rows, cols).bytes;
}
// Returns the largest column block `t` needs cols to be a multiple of (64 for NF4, 16 for Q8: one
// 16-byte load of codes never straddles two rows).
constexpr int64_t quant_col_multiple(DType t) { return t == DType::kNF4 ? 64 : t == DType::kQ8 ? 16 : 1; }

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

// Int8 per row: q[r, c] = round(x[r, c] / scale[r]), scale[r] = max|x[r, :]| / 127 (0 rows: scale 0).
void quantize_int8_rows(const float* x, int64_t rows, int64_t cols, int8_t* q, float* scale);

// bitsandbytes' signed 8-bit dynamic code map (create_dynamic_map(signed=True), its float32 values):
// 256 ascending values in [-1, 1], for the double-quantised absmax.
const float* dynamic_map_signed();
// QLoRA's double quantisation of n absmax values: offset = their mean; (absmax - offset) in blocks
// of 256, each block scaled by its max |.| (absmax2) and stored as the nearest dynamic code.
void quantize_absmax_dq(const float* absmax, int64_t n, uint8_t* codes, float* absmax2, float* offset);
// The inverse: absmax[i] = code(codes[i]) * absmax2[i / 256] + offset.
void dequantize_absmax_dq(const uint8_t* codes, const float* absmax2, float offset, int64_t n, float* absmax);

// A [rows, cols] float weight into the blob of `t` (kNF4 or kQ8; quant_layout(t, rows, cols).bytes
// at dst). cols must be a multiple of quant_col_multiple(t).
void quantize_weight(DType t, const float* x, int64_t rows, int64_t cols, uint8_t* dst);
// Rows [r0, r1) only (x holds just those rows): a large weight is quantised a few rows at a time.
void quantize_rows(DType t, const float* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint8_t* blob);
// Rows [r0, r1) of a quantised [rows, cols] blob, as float, into y[(r1 - r0) * cols].
void dequantize_rows(DType t, const uint8_t* blob, int64_t rows, int64_t cols, int64_t r0, int64_t r1, float* y);

}  // namespace ferry
