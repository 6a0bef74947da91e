// The packed store: ferry's on-disk weight tier (`ferry pack -m DIR --out STORE`).
//
//   STORE/manifest.json   format, version, the source config, and one entry per block
//   STORE/weights.bin     blocks: block 0 = globals (embedding, final norm, untied lm_head), block
//                         1 + l = layer l; each block starts 4 KiB aligned and is padded to 4 KiB.
//                         Globals: tensors at 256-byte aligned offsets. Layers: the LayerLayout
//                         (offload/layer_layout.h), tensors back to back, so a BF16 block copied to
//                         the GPU as one piece is ready to compute with. Stored dtype, or BF16.
//
// Every block has an xxh3-64 checksum of its unpadded bytes, checked on every read. Packing writes
// STORE.tmp.PID/ and renames it to STORE at the end, so an interrupted pack never leaves a STORE that
// looks complete.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/architecture.h"
#include "models/config.h"
#include "runtime/status.h"

namespace ferry {

class WeightStore;

inline constexpr uint64_t kPackAlign = 4096;  // block alignment (O_DIRECT)
inline constexpr uint64_t kPackTensorAlign = 256;

struct PackedTensor {
  std::string name;  // Hugging Face name
  int slot = 0;      // LayerTensor (layers) or GlobalTensor (block 0)
  DType dtype = DType::kBF16;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // within the block
  uint64_t bytes = 0;
};

struct PackedBlock {
  std::string name;     // "globals" or "layer.N"
  uint64_t offset = 0;  // in weights.bin, 4 KiB aligned
  uint64_t bytes = 0;   // unpadded (checksummed)
  uint64_t padded_bytes = 0;
  uint64_t xxh3 = 0;
  std::vector<PackedTensor> tensors;
};

struct PackedManifest {
  std::string dir;
  std::vector<PackedBlock> blocks;  // [0] globals, [1 + l] layer l
  uint64_t file_bytes = 0;          // size weights.bin must have
  std::string weights_path() const { return dir + "/weights.bin"; }
};

// Packing options, and test hooks: make the write with `errno_value` (ENOSPC, EIO, ...).
struct PackOptions {
  bool bf16 = false;  // convert F32/F16 tensors to BF16 (what the GPU streams)
  int64_t fail_write_after_bytes = -1;
  int fail_errno = 0;
};

// Writes every weight of `ws` to a new store at `out` (which must not exist yet).
Status pack_store(const WeightStore& ws, const std::string& out, const PackOptions& opts = {});

// Reads and checks `dir`/manifest.json against `cfg` (block count, tensor names, shapes, dtypes) and
// the size of weights.bin.
Expected<PackedManifest> open_store(const std::string& dir, const ModelConfig& cfg);
// Reads `dir`/manifest.json without a config (blocks and sizes checked; for `ferry calibrate`).
Expected<PackedManifest> open_store_unchecked(const std::string& dir);
// Writes `bytes` of incompressible data as a store of 64 MiB blocks (no tensors) in a new directory
// under `parent`, for measuring disk reads; the caller removes m.dir.
Expected<PackedManifest> write_scratch_store(const std::string& parent, int64_t bytes);

}  // namespace ferry
