// CheckpointReader: the tensors of a Hugging Face model directory, from `model.safetensors` or from
// the shards named by `model.safetensors.index.json`, all memory-mapped and validated.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "models/safetensors.h"
#include "runtime/status.h"

namespace ferry {

class CheckpointReader {
 public:
  // Opens the checkpoint in `dir`. Every shard is validated; a tensor named by the index but absent
  // from its shard, or present in two shards, is an error naming both.
  static Expected<std::unique_ptr<CheckpointReader>> open(const std::string& dir);

  struct Found {
    const SafetensorsFile* file = nullptr;
    const SafetensorsEntry* entry = nullptr;
  };
  // Returns the file and entry holding `name`, or {nullptr, nullptr}.
  Found find(const std::string& name) const;
  // Returns every tensor name in the checkpoint.
  std::vector<std::string> names() const;
  const std::string& dir() const { return dir_; }
  // Returns a description of where tensors come from ("model.safetensors" or "3 shards").
  std::string source_description() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Found> index_;
};

}  // namespace ferry
