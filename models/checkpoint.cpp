#include "models/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace ferry {

namespace fs = std::filesystem;
using json = nlohmann::json;

Expected<std::unique_ptr<CheckpointReader>> CheckpointReader::open(const std::string& dir) {
  auto r = std::make_unique<CheckpointReader>();
  r->dir_ = dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return not_found(strprintf("model directory '%s' does not exist", dir.c_str()));
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";

  if (fs::exists(index, ec)) {
    std::ifstream f(index, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    json j = json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      return corrupt(strprintf("%s: not a valid index (needs an object 'weight_map')", index.c_str()));
    std::map<std::string, std::string> weight_map;
    std::set<std::string> shard_names;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) return corrupt(strprintf("%s: weight_map['%s'] is not a file name", index.c_str(), it.key().c_str()));
      const std::string shard = it.value();
      if (shard.find('/') != std::string::npos || shard == ".." || shard.empty())
        return corrupt(strprintf("%s: weight_map['%s'] names '%s', which is not a file in the model directory",
                                 index.c_str(), it.key().c_str(), shard.c_str()));
      weight_map[it.key()] = shard;
      shard_names.insert(shard);
    }
    std::map<std::string, const SafetensorsFile*> by_shard;
    for (const auto& s : shard_names) {
      FERRY_ASSIGN_OR_RETURN(auto file, SafetensorsFile::open((fs::path(dir) / s).string()));
      by_shard[s] = file.get();
      r->files_.push_back(std::move(file));
    }
    for (const auto& [name, shard] : weight_map) {
      const SafetensorsFile* file = by_shard[shard];
      const SafetensorsEntry* e = file->find(name);
      if (e == nullptr)
        return corrupt(strprintf("%s: tensor '%s' is mapped to %s, which does not contain it", index.c_str(), name.c_str(), shard.c_str()));
      r->index_[name] = Found{file, e};
    }
    // Tensors in a shard that the index does not name are still reachable, unless they clash.
    for (const auto& file : r->files_) {
      for (const auto& [name, e] : file->entries()) {
        auto it = r->index_.find(name);
        if (it == r->index_.end()) r->index_[name] = Found{file.get(), &e};
        else if (it->second.file != file.get())
          return corrupt(strprintf("tensor '%s' appears in both %s and %s", name.c_str(), it->second.file->path().c_str(), file->path().c_str()));
      }
    }
    return r;
  }
  if (!fs::exists(single, ec))
    return not_found(strprintf("%s: no model.safetensors or model.safetensors.index.json in the model directory", dir.c_str()));
  FERRY_ASSIGN_OR_RETURN(auto file, SafetensorsFile::open(single.string()));
  for (const auto& [name, e] : file->entries()) r->index_[name] = Found{file.get(), &e};
  r->files_.push_back(std::move(file));
  return r;
}

CheckpointReader::Found CheckpointReader::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? Found{} : it->second;
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

std::string CheckpointReader::source_description() const {
  if (files_.size() == 1) return files_[0]->path();
  return strprintf("%zu shards in %s", files_.size(), dir_.c_str());
}

}  // namespace ferry
