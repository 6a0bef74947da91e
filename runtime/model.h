// Model: what `-m` names, loaded: the config, the WeightStore and the tokenizer. `-m` is a Hugging
// Face model directory or `synthetic:PRESET`.
#pragma once

#include <memory>
#include <string>

#include "models/config.h"
#include "models/tokenizer.h"
#include "offload/weight_store.h"
#include "runtime/status.h"

namespace ferry {

struct Model {
  ModelConfig config;
  std::unique_ptr<WeightStore> weights;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the directory has no tokenizer.json
  std::string spec;                      // what -m said
};

struct LoadOptions {
  int64_t synthetic_layers = 0;  // > 0: a synthetic preset with this many layers
  bool need_tokenizer = true;
  bool host_weights = true;      // false: synthetic weights are generated where an executor keeps them
  std::string disk;              // a packed store (ferry pack): every layer is read from it
  DType quant = DType::kBF16;    // kNF4 / kQ8: the layers' Linear weights quantised at load (--quant)
  DType quant_head = DType::kBF16;  // kQ8 / kNF4: the lm_head too (--quant-head; needs --quant)
  bool shapes_only = false;      // only shapes and formats are needed (ferry plan): no synthetic or quantised bytes are made
};

// Loads `spec`; every failure names the file, tensor or flag.
Expected<Model> load_model(const std::string& spec, const LoadOptions& opts = {});

}  // namespace ferry
