#include "runtime/runner.h"

#include <cmath>
#include <map>
#include <optional>

#include "runtime/trace.h"

namespace ferry {

Status Runner::step(const StepBatch& b, std::vector<float>& logits, bool copy_logits) {
  const ModelConfig& cfg = ws_.config();
  std::optional<TraceRange> prep(std::in_place, "step.prepare");
  // Check that every sequence continues where its KV ends, and find its new length.
  std::map<int32_t, int64_t> next_pos;
  for (int64_t t = 0; t < b.n_tokens(); ++t) {
    const int32_t s = b.seq_ids[t];
    auto it = next_pos.find(s);
    const int64_t expect = it == next_pos.end() ? kv_.length(s) : it->second;
    if (b.positions[t] != expect)
      return invalid_argument(strprintf("step: token %lld of sequence %d has position %d, expected %lld", static_cast<long long>(t), s,
                                        b.positions[t], static_cast<long long>(expect)));
    if (b.positions[t] >= cfg.n_ctx_max)
      return invalid_argument(strprintf("sequence %d reaches position %d, past max_position_embeddings (%lld)", s, b.positions[t],
                                        static_cast<long long>(cfg.n_ctx_max)));
    next_pos[s] = expect + 1;
  }
  for (const auto& [s, n] : next_pos) FERRY_RETURN_IF_ERROR(kv_.reserve(s, n));
  if (kv_.has_disk()) {
    // The step's blocks in host memory (serve() chose sequences that fit; this reads back what
    // other callers' sequences had spilled).
    kv_.begin_step();
    for (const auto& [s, n] : next_pos) {
      FERRY_ASSIGN_OR_RETURN(const bool fits, kv_.make_resident(s, n));
      if (!fits)
        return out_of_memory(strprintf("step: the K/V blocks of the step's %zu sequence(s) do not fit in host memory together (%lld blocks of %lld tokens: --kv-mem)",
                                       next_pos.size(), (long long)kv_.shape().n_blocks, (long long)kv_.shape().block_size));
    }
  }
  FERRY_RETURN_IF_ERROR(ex_.begin_step(b, kv_));
  prep.reset();
  if (copy_logits) logits.resize(static_cast<size_t>(b.n_outputs() * cfg.n_vocab));
  {
    TraceRange r("embed");
    ex_.embed(ws_.globals());
  }
  for (int64_t il = 0; il < cfg.n_layers; ++il) {
    TraceRange r("layer", il);
    FERRY_ASSIGN_OR_RETURN(const LayerWeights* w, ws_.acquire(il));
    ex_.layer(il, *w, kv_);
  }
  {
    TraceRange r("head");
    ex_.head(ws_.globals(), copy_logits ? logits.data() : nullptr);
  }
  FERRY_RETURN_IF_ERROR(ex_.end_step());
  if (copy_logits) {
    // A NaN or an infinity anywhere in a row makes its sum non-finite (logits are far from FLT_MAX).
    const int64_t V = cfg.n_vocab;
    for (int64_t r = 0; r < b.n_outputs(); ++r) {
      const float* row = logits.data() + r * V;
      float sum = 0;
      for (int64_t i = 0; i < V; ++i) sum += row[i];
      if (!std::isfinite(sum)) return non_finite_logits_error(r);
    }
  }
  for (const auto& [s, n] : next_pos) kv_.set_length(s, n);
  return Status::Ok();
}

Status non_finite_logits_error(int64_t row) {
  return Status(ErrorCode::kInternal,
                strprintf("the logits of output row %lld hold a NaN or an infinity: the activations overflowed (the weights were checked finite "
                          "when loaded); an F16 checkpoint read with too little range, or a corrupt packed store, can do this",
                          static_cast<long long>(row)));
}

}  // namespace ferry
