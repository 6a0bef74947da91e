// Safetensors files: a validated, memory-mapped reader and an atomic writer.
//
// The reader checks every header field against the file before any tensor is touched: the header
// length lies inside the file, every tensor's [begin, end) lies inside the data section, its size
// equals shape x dtype size (computed without overflow), and no two tensors overlap.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/status.h"
#include "runtime/tensor.h"

namespace ferry {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offset from the start of the data section
  uint64_t end = 0;
};

class SafetensorsFile {
 public:
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Maps and validates `path`.
  static Expected<std::unique_ptr<SafetensorsFile>> open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsEntry* find(const std::string& name) const;
  // Returns a host view of the tensor's bytes (read-only mapping; do not write through it).
  TensorView view(const SafetensorsEntry& e) const;
  uint64_t file_bytes() const { return file_bytes_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  uint64_t file_bytes_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// A tensor to write: host data, contiguous.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes a safetensors file atomically: to `path`.tmp.<pid>, fsync, then rename over `path`.
// An interrupted write leaves no file at `path` (or the previous one).
Status write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                         const std::map<std::string, std::string>& metadata = {});

// Checks, before any work, that an output file can be written at `path`: an existing `path` must be
// a regular file, and a file can be created beside it (created and removed). The error names the path.
Status check_output_path(const std::string& path);
// Writes bytes to `path` atomically (temporary name, fsync, rename, directory fsync). An existing
// `path` that is not a regular file (a device, a directory) is refused, never renamed over.
Status write_file_atomic(const std::string& path, const void* data, size_t n_bytes);
// Returns the bytes of the file at `path`; a missing or unreadable file is an error naming it.
Expected<std::string> read_file_text(const std::string& path);

}  // namespace ferry
