// Fine-tuning data: JSONL examples into token rows with labels, and the rows into training batches
// (cpu/lora_train.h). One example is one row (never packed with another), cut to --seq-len.
//
// Each line is a JSON object, one of:
//   {"text": "..."}                          every token trained on;
//   {"prompt": "...", "completion": "..."}   prompt + completion tokenised as one text (the
//                                            tokenizer's BOS template added), the prompt's tokens
//                                            not trained on (label -100), as TRL's completion-only loss;
//   {"ids": [...], "labels": [...]}          token ids as they are; labels optional (default: ids),
//                                            -100 where not trained on.
// Text examples end with the model's first EOS id (config.json eos_token_id) when it has one, so the
// adapter learns where an answer stops.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/lora_train.h"
#include "models/tokenizer.h"
#include "runtime/status.h"

namespace ferry {

struct FinetuneExample {
  std::vector<int32_t> ids, labels;  // same length, at least 2
  int64_t line = 0;                  // in the data file
  bool cut = false;                  // longer than seq_len: its tail was dropped
};

// Reads `path`; refuses (naming the file and line) lines that are not one of the forms above, token
// ids outside [0, n_vocab), text without a tokenizer, and examples with nothing to train on after
// the cut to `seq_len`.
Expected<std::vector<FinetuneExample>> read_finetune_data(const std::string& path, const Tokenizer* tok, int64_t seq_len, int64_t n_vocab,
                                                          int64_t eos_id);

// Rows [first, first + rows) of `ex` (taken cyclically) as one batch, the shorter rows padded at
// the end with `pad` and label -100 (attention is causal: padding after a row's tokens changes none
// of their outputs).
cpu::TrainBatch make_train_batch(const std::vector<FinetuneExample>& ex, int64_t first, int64_t rows, int32_t pad);

// The learning rate at step `step` (1-based) of `steps`: linear warm-up over `warmup` steps from
// lr / warmup, then constant ("constant") or cosine to 0 at the last step ("cosine").
double finetune_lr(double lr, int64_t step, int64_t steps, int64_t warmup, const std::string& schedule);

}  // namespace ferry
