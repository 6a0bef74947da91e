// Synthetic models: presets with the exact shapes of real architectures (`-m synthetic:NAME`) whose
// weights are a pure function of (tensor name, element index), so any tier can regenerate any slice
// without I/O and every run sees the same model. Used for the quick start, benchmarks on hosts that
// cannot load real weights, and tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/config.h"
#include "runtime/status.h"

namespace ferry {

inline constexpr const char* kSyntheticPrefix = "synthetic:";

// Returns the preset names ("llama-2-7b", ...).
std::vector<std::string> synthetic_preset_names();
// Returns the config of preset `name`; `n_layers_override` > 0 keeps the shapes but fewer layers.
Expected<ModelConfig> synthetic_config(const std::string& name, int64_t n_layers_override = 0);
// Returns the per-tensor key and the scale the generator uses (shared with the GPU generator).
uint64_t synthetic_key(const std::string& name);
float synthetic_scale(int64_t fan_in, bool is_norm);
// Fills `out[0..n)` with the BF16 values of tensor `name` at flat indices [first, first + n).
// `fan_in` sets the scale (uniform in +-1/sqrt(fan_in)); `is_norm` gives values near 1.
void synthetic_fill_bf16(const std::string& name, int64_t fan_in, bool is_norm, uint64_t first, uint64_t n, uint16_t* out);
// Returns the tokenizer.json text of the synthetic vocabulary of size `n_vocab`: <unk>, <s>, </s>,
// 256 byte tokens, "▁" and printable ASCII, then pseudo-words; SentencePiece-style, byte fallback.
std::string synthetic_tokenizer_json(int64_t n_vocab);

}  // namespace ferry
