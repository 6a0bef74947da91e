// The LoRA training pass on the CPU in float32: the exact reference for QLoRA fine-tuning (issue
// to come: the GPU pass streams the frozen layers a second time for its backward; this one is
// what it is compared against, as the CPU executor is for inference).
//
// Forward over a batch of whole sequences [rows, len] (positions 0..len-1, causal attention, no KV
// cache), Hugging Face's causal-LM loss, then the backward into the adapters only: the base weights
// (BF16, NF4, NF4-DQ or int8: whatever the WeightStore serves) are frozen and never get a gradient.
// Gradient checkpointing: the forward keeps each layer's input alone; the backward recomputes one
// layer's activations at a time from it (all but the last layer's, still there from the forward),
// so activations cost n_layers x [tokens, n_embd] plus one layer's. A layer's base weights are dequantised to float32 while it is computed.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "offload/weight_store.h"
#include "runtime/lora.h"
#include "runtime/status.h"

namespace ferry::cpu {

inline constexpr int32_t kIgnoreLabel = -100;

struct TrainBatch {
  int64_t rows = 0, len = 0;
  std::vector<int32_t> ids;     // [rows, len]
  std::vector<int32_t> labels;  // [rows, len]; kIgnoreLabel: not trained on
};

struct LossResult {
  double loss = 0;       // mean over the trained positions
  int64_t n_tokens = 0;  // positions t (< len - 1) whose labels[t + 1] is trained on
};

// Hugging Face's causal-LM loss: the mean over every row and t < len - 1 with labels[t + 1] !=
// kIgnoreLabel of -log softmax(logits[t])[labels[t + 1]]. With `grad` (shaped as `w`, e.g.
// LoraAdapter::zeros) it is overwritten with d loss / d every adapter weight. Refused, naming the
// offending value: token ids outside the vocabulary, labels outside it (other than kIgnoreLabel),
// shapes that disagree, a batch with no trained position.
Expected<LossResult> lora_loss(WeightStore& ws, const LoraAdapter& w, const TrainBatch& batch, LoraAdapter* grad);

// The same, keeping its float32 buffers (a layer's weights, the lm_head, the layer inputs) from
// call to call: what a training loop uses.
class LoraTrainer {
 public:
  explicit LoraTrainer(WeightStore& ws);
  ~LoraTrainer();
  Expected<LossResult> loss(const LoraAdapter& w, const TrainBatch& batch, LoraAdapter* grad);

 private:
  struct Work;
  WeightStore& store_;
  std::unique_ptr<Work> work_;
};

}  // namespace ferry::cpu
