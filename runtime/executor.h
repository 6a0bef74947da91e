// Executor: who computes. A step is a flattened batch of tokens from one or more sequences (the
// tokens of each sequence contiguous and in position order); the runner (runner.h) walks the layers
// and hands each executor call the weights the WeightStore serves for that layer. The CPU executor
// (cpu/) implements this today; the GPU executor (gpu/) implements the same calls.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "models/architecture.h"
#include "runtime/sampler.h"
#include "runtime/status.h"

namespace ferry {

class KvCache;

struct StepBatch {
  std::vector<int32_t> tokens;       // [n_tokens]
  std::vector<int32_t> positions;    // [n_tokens] position of each token in its sequence
  std::vector<int32_t> seq_ids;      // [n_tokens] KvCache sequence of each token
  std::vector<int32_t> output_rows;  // indices into tokens whose logits are wanted, ascending

  int64_t n_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t n_outputs() const { return static_cast<int64_t>(output_rows.size()); }
  void clear() {
    tokens.clear();
    positions.clear();
    seq_ids.clear();
    output_rows.clear();
  }
  void add(int32_t token, int32_t pos, int32_t seq, bool output) {
    if (output) output_rows.push_back(static_cast<int32_t>(tokens.size()));
    tokens.push_back(token);
    positions.push_back(pos);
    seq_ids.push_back(seq);
  }
};

// The error for an output row whose logits hold a NaN or an infinity (runner.cpp): the step is
// refused, never sampled from garbage.
Status non_finite_logits_error(int64_t row);

class Executor {
 public:
  virtual ~Executor() = default;
  virtual std::string_view name() const = 0;
  // Prepares a step: validates token ids, sizes the workspace, takes the step's block tables from `kv`.
  virtual Status begin_step(const StepBatch& batch, const KvCache& kv) = 0;
  // Hidden state = embedding rows of the batch's tokens.
  virtual void embed(const GlobalWeights& w) = 0;
  // Runs decoder layer `il`: attention (appending this step's K/V to `kv`) and MLP, in place.
  virtual void layer(int64_t il, const LayerWeights& w, KvCache& kv) = 0;
  // Final norm and lm_head over the output rows: logits [n_outputs, n_vocab], float32, host memory.
  // With `logits` null the logits stay where the executor computed them (for sample()).
  virtual void head(const GlobalWeights& w, float* logits) = 0;
  // Ends the step: reports a failure that happened off the calling thread during it (a disk read
  // of a streamed layer, say). The step's logits are valid only if this returns OK.
  virtual Status end_step() { return Status::Ok(); }

  // Returns true when sample() can draw with `p` where the logits are (no logits copy).
  virtual bool can_sample(const SamplingParams& p) const { return false; }
  // Draws one token per output row of the last step: row r uses seeds[r] and `step` (counter-based,
  // so a (seed, step) pair always gives the same draw on this executor).
  virtual Status sample(const SamplingParams& p, const std::vector<uint64_t>& seeds, uint64_t step, int32_t* out) {
    return unsupported("this executor samples on the host");
  }
};

}  // namespace ferry
