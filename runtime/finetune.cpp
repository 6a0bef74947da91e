#include "runtime/finetune.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

namespace ferry {

namespace {

// Reads a JSON array of integers at key `k` of `j`; false when it is not one.
bool int_array(const nlohmann::json& j, const char* k, std::vector<int32_t>* out) {
  if (!j[k].is_array()) return false;
  for (const auto& v : j[k]) {
    if (!v.is_number_integer()) return false;
    const int64_t x = v.get<int64_t>();
    if (x < INT32_MIN || x > INT32_MAX) return false;
    out->push_back(static_cast<int32_t>(x));
  }
  return true;
}

}  // namespace

Expected<std::vector<FinetuneExample>> read_finetune_data(const std::string& path, const Tokenizer* tok, int64_t seq_len, int64_t n_vocab,
                                                          int64_t eos_id) {
  std::ifstream in(path);
  if (!in) return not_found(strprintf("--data %s: cannot open", path.c_str()));
  std::vector<FinetuneExample> out;
  std::string line;
  int64_t no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto where = [&] { return strprintf("--data %s:%lld", path.c_str(), static_cast<long long>(no)); };
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return invalid_argument(where() + ": not a JSON object");
    FinetuneExample ex;
    ex.line = no;
    const bool has_text = j.contains("text"), has_pc = j.contains("prompt") || j.contains("completion"), has_ids = j.contains("ids");
    if (has_text + has_pc + has_ids != 1)
      return invalid_argument(where() + ": needs exactly one of \"text\", \"prompt\" + \"completion\" or \"ids\"");
    if (has_ids) {
      if (!int_array(j, "ids", &ex.ids)) return invalid_argument(where() + ": \"ids\" must be an array of integers");
      if (j.contains("labels")) {
        if (!int_array(j, "labels", &ex.labels) || ex.labels.size() != ex.ids.size())
          return invalid_argument(where() + ": \"labels\" must be an array of integers as long as \"ids\"");
      } else {
        ex.labels = ex.ids;
      }
    } else {
      if (tok == nullptr) return invalid_argument(where() + ": text needs the model's tokenizer.json (or give \"ids\")");
      if (has_text) {
        if (!j["text"].is_string()) return invalid_argument(where() + ": \"text\" must be a string");
        ex.ids = tok->encode(j["text"].get<std::string>(), true);
        if (eos_id >= 0) ex.ids.push_back(static_cast<int32_t>(eos_id));
        ex.labels = ex.ids;
      } else {
        if (!j.contains("prompt") || !j.contains("completion") || !j["prompt"].is_string() || !j["completion"].is_string())
          return invalid_argument(where() + ": \"prompt\" and \"completion\" must both be strings");
        const std::string p = j["prompt"].get<std::string>();
        const std::vector<int32_t> prompt = tok->encode(p, true);
        ex.ids = tok->encode(p + j["completion"].get<std::string>(), true);
        if (eos_id >= 0) ex.ids.push_back(static_cast<int32_t>(eos_id));
        ex.labels = ex.ids;
        // The prompt's tokens, where the joint encoding starts with them (a merge across the seam
        // can change the last one: then up to where they agree).
        size_t n = 0;
        while (n < prompt.size() && n < ex.ids.size() && prompt[n] == ex.ids[n]) ++n;
        for (size_t i = 0; i < n; ++i) ex.labels[i] = cpu::kIgnoreLabel;
      }
    }
    for (size_t i = 0; i < ex.ids.size(); ++i) {
      if (ex.ids[i] < 0 || ex.ids[i] >= n_vocab)
        return invalid_argument(where() + strprintf(": token id %d is outside the vocabulary [0, %lld)", ex.ids[i], static_cast<long long>(n_vocab)));
      if (ex.labels[i] != cpu::kIgnoreLabel && (ex.labels[i] < 0 || ex.labels[i] >= n_vocab))
        return invalid_argument(where() + strprintf(": label %d is outside the vocabulary (and not -100)", ex.labels[i]));
    }
    if (static_cast<int64_t>(ex.ids.size()) > seq_len) {
      ex.cut = true;
      ex.ids.resize(static_cast<size_t>(seq_len));
      ex.labels.resize(static_cast<size_t>(seq_len));
    }
    bool trained = false;
    for (size_t i = 1; i < ex.labels.size(); ++i) trained |= ex.labels[i] != cpu::kIgnoreLabel;
    if (!trained)
      return invalid_argument(where() + strprintf(": nothing to train on in its first %lld tokens (too short, or every label -100)",
                                                  static_cast<long long>(seq_len)));
    out.push_back(std::move(ex));
  }
  if (out.empty()) return invalid_argument(strprintf("--data %s: no examples in the file", path.c_str()));
  return out;
}

cpu::TrainBatch make_train_batch(const std::vector<FinetuneExample>& ex, int64_t first, int64_t rows, int32_t pad) {
  cpu::TrainBatch b;
  b.rows = rows;
  const int64_t n = static_cast<int64_t>(ex.size());
  for (int64_t r = 0; r < rows; ++r) b.len = std::max<int64_t>(b.len, static_cast<int64_t>(ex[(first + r) % n].ids.size()));
  b.ids.assign(static_cast<size_t>(rows * b.len), pad);
  b.labels.assign(b.ids.size(), cpu::kIgnoreLabel);
  for (int64_t r = 0; r < rows; ++r) {
    const FinetuneExample& e = ex[(first + r) % n];
    std::copy(e.ids.begin(), e.ids.end(), b.ids.begin() + r * b.len);
    std::copy(e.labels.begin(), e.labels.end(), b.labels.begin() + r * b.len);
  }
  return b;
}

double finetune_lr(double lr, int64_t step, int64_t steps, int64_t warmup, const std::string& schedule) {
  if (warmup > 0 && step <= warmup) return lr * static_cast<double>(step) / static_cast<double>(warmup);
  if (schedule == "cosine" && steps > warmup) {
    const double p = static_cast<double>(step - warmup) / static_cast<double>(steps - warmup);
    return lr * 0.5 * (1.0 + std::cos(M_PI * p));
  }
  return lr;
}

}  // namespace ferry
