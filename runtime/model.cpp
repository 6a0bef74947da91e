#include "runtime/model.h"

#include <filesystem>

#include "models/checkpoint.h"
#include "models/synthetic.h"

namespace ferry {

namespace {
Expected<Model> load_unquantised(const std::string& spec, const LoadOptions& opts);
}  // namespace

Expected<Model> load_model(const std::string& spec, const LoadOptions& opts) {
  LoadOptions o = opts;
  if (o.shapes_only) o.host_weights = false;
  FERRY_ASSIGN_OR_RETURN(Model m, load_unquantised(spec, o));
  if (is_quantized(opts.quant)) FERRY_RETURN_IF_ERROR(m.weights->quantize(opts.quant, opts.shapes_only));
  if (is_quantized(opts.quant_head)) {
    if (!is_quantized(opts.quant) && !is_quantized(m.config.checkpoint_quant))
      return invalid_argument("--quant-head needs --quant (the layers' Linear weights quantised too)");
    FERRY_RETURN_IF_ERROR(m.weights->quantize_head(opts.quant_head, opts.shapes_only));
  }
  return m;
}

namespace {
Expected<Model> load_unquantised(const std::string& spec, const LoadOptions& opts) {
  namespace fs = std::filesystem;
  Model m;
  m.spec = spec;
  if (spec.rfind(kSyntheticPrefix, 0) == 0) {
    const std::string preset = spec.substr(std::string(kSyntheticPrefix).size());
    FERRY_ASSIGN_OR_RETURN(m.config, synthetic_config(preset, opts.synthetic_layers));
    if (!opts.disk.empty()) {  // a store packed from the preset (ferry pack -m synthetic:NAME)
      FERRY_ASSIGN_OR_RETURN(m.weights, WeightStore::from_packed(m.config, opts.disk));
    } else {
      FERRY_ASSIGN_OR_RETURN(m.weights, WeightStore::synthetic(m.config, preset, opts.host_weights));
    }
    FERRY_ASSIGN_OR_RETURN(m.tokenizer, Tokenizer::from_json(synthetic_tokenizer_json(m.config.n_vocab), spec));
    return m;
  }
  if (opts.synthetic_layers > 0)
    return invalid_argument("--layers applies only to synthetic models (-m synthetic:NAME)");
  if (spec.empty()) return invalid_argument("-m: no model given");
  FERRY_ASSIGN_OR_RETURN(m.config, load_config(spec));
  if (!opts.disk.empty()) {
    FERRY_ASSIGN_OR_RETURN(m.weights, WeightStore::from_packed(m.config, opts.disk));
  } else {
    FERRY_ASSIGN_OR_RETURN(auto ckpt, CheckpointReader::open(spec));
    FERRY_ASSIGN_OR_RETURN(m.weights, WeightStore::from_checkpoint(m.config, std::move(ckpt)));
  }
  const fs::path tok = fs::path(spec) / "tokenizer.json";
  std::error_code ec;
  if (fs::exists(tok, ec)) {
    FERRY_ASSIGN_OR_RETURN(m.tokenizer, Tokenizer::from_file(tok.string()));
  } else if (opts.need_tokenizer) {
    return not_found(strprintf("%s: no tokenizer.json in the model directory", tok.string().c_str()));
  }
  if (m.tokenizer && m.tokenizer->n_vocab() > m.config.n_vocab)
    return corrupt(strprintf("%s: the tokenizer has %lld ids but config.json's vocab_size is %lld", tok.string().c_str(),
                             static_cast<long long>(m.tokenizer->n_vocab()), static_cast<long long>(m.config.n_vocab)));
  return m;
}

}  // namespace

}  // namespace ferry
