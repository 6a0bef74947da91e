// Weight formats: how a weight's elements are stored, described once (block size, codes, scales,
// where each part sits in the tensor's bytes) so the recipe, the planner's byte counts, the packed
// store and both executors ask here instead of hard-coding BF16.
//
// - NF4 is QLoRA's (bitsandbytes): 16 code values from a normal distribution's quantiles, blocks of
//   64 consecutive elements of the row-major weight, one fp32 absmax per block, each element the
//   nearest code (4 bits, two a byte, the first element in the high nibble as bitsandbytes packs
//   them).
// - NF4-DQ is NF4 with QLoRA's double quantisation of the absmax (bitsandbytes' compress_statistics,
//   peft's bnb_4bit_use_double_quant): the same codes; the fp32 absmax values, less their mean, in
//   blocks of 256, each block scaled by its max |.| (an fp32 absmax2) and stored as the nearest of
//   bitsandbytes' signed 8-bit dynamic codes. absmax = map[code] * absmax2 + mean: 0.5159 bytes a
//   parameter instead of NF4's 0.5625 (8.3% fewer). A fused weight (qkv, gate + up) keeps each
//   part's statistics as bitsandbytes quantises each Linear on its own: a mean per part, blocks of
//   256 restarting at each part. So the blob holds a mean per block of 256 (its part's), and a part
//   whose absmax count is not a multiple of 256 (none of the presets' weights; a 192-wide model's)
//   makes the whole fused weight one part.
// - Q8 is int8 per output channel: each row scaled by max|row| / 127, rounded to nearest.
//
// A quantised 2-D weight [rows, cols] (cols a multiple of the format's block) is one blob: the codes,
// then the scales (NF4-DQ: the 8-bit absmax codes, then the fp32 absmax2, then the fp32 means), each
// part starting 16-byte aligned (quant_layout), so a GPU reads any with 16-byte loads. Row r's codes
// start at r * cols * bits / 8, its scales at r * cols / block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace ferry {

enum class WeightFormat { kBF16, kNF4, kNF4DQ, kInt8 };
inline constexpr WeightFormat kWeightFormats[] = {WeightFormat::kBF16, WeightFormat::kNF4, WeightFormat::kNF4DQ, WeightFormat::kInt8};

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
    case WeightFormat::kNF4DQ: return {"nf4-dq", DType::kNF4DQ, 64, 4};
    case WeightFormat::kInt8: return {"int8", DType::kQ8, 0, 8};
    case WeightFormat::kBF16: break;
  }
  return {"bf16", DType::kBF16, 1, 16};
}
// Parses "bf16", "nf4", "nf4-dq" or "int8".
bool weight_format_from_name(std::string_view name, WeightFormat* out);

// The format of a quantised dtype (kNF4, kNF4DQ, kQ8).
WeightFormat weight_format_of(DType t);

// Where a quantised weight's parts are: codes at 0; `n_scales` first-level scales at `scales` (fp32,
// or NF4-DQ's 8-bit codes); NF4-DQ's `n_scales2` fp32 absmax2 at `scales2` and as many fp32 means
// (block b's: its part's) at `means`; `bytes` in all.
struct QuantLayout {
  int64_t scales = 0;
  int64_t n_scales = 0;
  int64_t scales2 = 0;
  int64_t n_scales2 = 0;
  int64_t means = 0;
  int64_t bytes = 0;
};
constexpr int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }
constexpr QuantLayout quant_layout(DType t, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  if (t == DType::kNF4) {
    const int64_t codes = align16((n + 1) / 2), ns = (n + 63) / 64;
    return {.scales = codes, .n_scales = ns, .bytes = codes + align16(4 * ns)};
  }
  if (t == DType::kNF4DQ) {
    const int64_t codes = align16((n + 1) / 2), ns = (n + 63) / 64, ns2 = (ns + 255) / 256;
    const int64_t s2 = codes + align16(ns), means = s2 + align16(4 * ns2);
    return {.scales = codes, .n_scales = ns, .scales2 = s2, .n_scales2 = ns2, .means = means, .bytes = means + align16(4 * ns2)};
  }
  if (t == DType::kQ8) return {.scales = align16(n), .n_scales = rows, .bytes = align16(n) + align16(4 * rows)};
  return {};
}
// Returns the bytes a [rows, cols] weight takes in `f`.
constexpr int64_t weight_format_bytes(WeightFormat f, int64_t rows, int64_t cols) {
  return f == WeightFormat::kBF16 ? 2 * rows * cols : quant_layout(weight_format_info(f).dtype, rows, cols).bytes;
}
// Returns the largest column block `t` needs cols to be a multiple of (64 for NF4, 16 for Q8: one
// 16-byte load of codes never straddles two rows).
constexpr int64_t quant_col_multiple(DType t) { return t == DType::kNF4 || t == DType::kNF4DQ ? 64 : t == DType::kQ8 ? 16 : 1; }

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

// bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), the
// float32 values it returns (bitsandbytes 0.50.2): its formula evaluated in double differs from them
// in the last bit of 72 values, because bitsandbytes computes the linspace and the means in float32.
// 256 ascending values in [-1, 1], for the double-quantised absmax; tests/data/bnb_nf4_dq.safetensors
// holds bitsandbytes' own table, which the tests compare.
inline constexpr float kDynamicMapSigned[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f, -0x1.d86666p-1f,
    -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f,
    -0x1.7accccp-1f, -0x1.73999ap-1f, -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, -0x1.b8ccccp-2f, -0x1.aa6666p-2f,
    -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f,
    -0x1.de6666p-3f, -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f, -0x1.8851eep-4f,
    -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f,
    -0x1.e51ebap-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f,
    -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f,
    -0x1.27476ep-21f, 0.0f, 0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f,
    0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f,
    0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f,
    0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f,
    0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f, 0x1.5a3d7p-4f,
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f,
    0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f,
    0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f,
    0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f,
    0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f,
    0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1.0p+0f,
};
inline const float* dynamic_map_signed() { return kDynamicMapSigned; }
// QLoRA's double quantisation of n absmax values: offset = their mean; (absmax - offset) in blocks
// of 256, each block scaled by its max |.| (absmax2) and stored as the nearest dynamic code.
void quantize_absmax_dq(const float* absmax, int64_t n, uint8_t* codes, float* absmax2, float* offset);
// The inverse: absmax[i] = code(codes[i]) * absmax2[i / 256] + offset.
void dequantize_absmax_dq(const uint8_t* codes, const float* absmax2, float offset, int64_t n, float* absmax);

// A [rows, cols] float weight into the blob of `t` (kNF4, kNF4DQ or kQ8; quant_layout(t, rows,
// cols).bytes at dst). cols must be a multiple of quant_col_multiple(t).
void quantize_weight(DType t, const float* x, int64_t rows, int64_t cols, uint8_t* dst);
// Rows [r0, r1) only (x holds just those rows): a large weight is quantised a few rows at a time.
// NF4-DQ's absmax need their part's mean: quantize_rows writes the codes and leaves the fp32 absmax
// in `stage` (quant_stage_floats(t, rows, cols) floats; null for the other formats), and
// finish_quant double-quantises them into the blob once every row is written, part by part
// (`part_rows`: the rows of each fused part in order, summing to rows; empty: one part).
void quantize_rows(DType t, const float* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint8_t* blob, float* stage = nullptr);
void finish_quant(DType t, int64_t rows, int64_t cols, const float* stage, uint8_t* blob, const std::vector<int64_t>& part_rows = {});
// The parts finish_quant double-quantises on their own, as [first absmax, end) ranges: the fused
// parts when each one's absmax count is a multiple of 256, else the whole weight.
std::vector<std::pair<int64_t, int64_t>> dq_parts(int64_t rows, int64_t cols, const std::vector<int64_t>& part_rows);
constexpr int64_t quant_stage_floats(DType t, int64_t rows, int64_t cols) { return t == DType::kNF4DQ ? (rows * cols + 63) / 64 : 0; }
// A [rows, cols] weight stored as `w_dtype` (F32, F16, BF16) into the blob of `t`, 64 rows a task on
// oneTBB's pool, NF4-DQ finished as one part (calibrate, the benches, --quant-head's lm_head).
void quantize_stored_weight(DType t, const void* w, DType w_dtype, int64_t rows, int64_t cols, uint8_t* blob);
// The same for BF16 bit patterns.
inline void quantize_bf16_weight(DType t, const uint16_t* w, int64_t rows, int64_t cols, uint8_t* blob) {
  quantize_stored_weight(t, w, DType::kBF16, rows, cols, blob);
}
// Rows [r0, r1) of a quantised [rows, cols] blob, as float, into y[(r1 - r0) * cols].
void dequantize_rows(DType t, const uint8_t* blob, int64_t rows, int64_t cols, int64_t r0, int64_t r1, float* y);

}  // namespace ferry
