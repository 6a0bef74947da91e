// Runner: one forward step, written out: embed, then for every layer ask the WeightStore for its
// weights and the executor to run it, then the head. It also keeps the KV bookkeeping: blocks are
// reserved before the step and sequence lengths advanced after it.
#pragma once

#include <vector>

#include "offload/kv_cache.h"
#include "offload/weight_store.h"
#include "runtime/executor.h"

namespace ferry {

class Runner {
 public:
  Runner(WeightStore& weights, Executor& executor, KvCache& kv) : ws_(weights), ex_(executor), kv_(kv) {}

  // Runs `batch` and writes logits [n_outputs, n_vocab] into `logits` (resized), unless `copy_logits`
  // is false (the executor keeps them for Executor::sample). Each sequence's tokens must continue it:
  // positions length(seq), length(seq)+1, ... in order.
  Status step(const StepBatch& batch, std::vector<float>& logits, bool copy_logits = true);

  const ModelConfig& config() const { return ws_.config(); }
  KvCache& kv() { return kv_; }
  Executor& executor() { return ex_; }

 private:
  WeightStore& ws_;
  Executor& ex_;
  KvCache& kv_;
};

}  // namespace ferry
