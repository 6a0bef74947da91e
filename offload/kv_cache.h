// KvCache: paged keys and values. Fixed-size blocks of `block_size` tokens come from one pool; each
// sequence has a block table shared by all layers (vLLM's layout).
//
// Host storage (the CPU executor's, and the layers whose attention a GPU executor runs on the CPU)
// is float32 (the exact reference) or BF16, laid out for the CPU attention kernels (cpu/attention.h):
// per layer, block and KV head one contiguous tile of block_size x head_dim values,
//   K: [head_dim/2][block_size][2]   (dims 2r and 2r+1 of each key side by side: one vector load
//                                      gives one dim pair of every key of the block)
//   V: [block_size/2][head_dim][2]   (keys 2r and 2r+1 of each dim side by side)
// so a (block, head) tile is read once, front to back, for all query heads of its group. GPU
// blocks (gpu/) keep their own [block, token, head, dim] pool and share only the block tables.
//
// The disk tier (enable_disk, throughput mode's --kv-disk): a sequence then owns logical blocks, up
// to the host pool plus the disk's records; a block holds host memory only while it is resident. A
// step makes its sequences' blocks resident (make_resident): spilled ones are read back, and room
// comes from the coldest blocks (least recently used by a step) of sequences not in the step, which
// are written to disk, checksummed, in one record per block (that block of every layer). Blocks no
// token was written to yet cost no I/O. Attention only ever reads resident blocks.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "offload/kv_disk.h"
#include "runtime/host_buffer.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace ferry {

struct KvCacheShape {
  int64_t n_layers = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 16;
  int64_t n_blocks = 0;
  DType dtype = DType::kF32;  // host storage: kF32 or kBF16
  int64_t bytes_per_token_layer() const { return 2 * n_kv_heads * head_dim * static_cast<int64_t>(dtype_size(dtype)); }
  int64_t bytes() const { return n_layers * n_blocks * block_size * bytes_per_token_layer(); }
};

// One layer's host K/V as the attention kernels read it.
struct KvLayerView {
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::kF32;
  int64_t block_size = 0, n_kv_heads = 0, head_dim = 0;
  int64_t tile() const { return block_size * head_dim; }                // elements of one (block, head) tile
  int64_t block_elems() const { return n_kv_heads * tile(); }            // elements of one block
};

class KvCache {
 public:
  // Creates the block manager; with `host_storage` it also allocates the K/V pool in host memory
  // (an allocation failure names the size). Without it another executor (the GPU's) holds the
  // blocks' bytes and this object only manages sequences, block tables and lengths.
  static Expected<KvCache> create(const KvCacheShape& shape, bool host_storage = true);
  // Host storage for the layers where `host_layers[il]` only (the layers whose attention a GPU
  // executor runs on the CPU). Host pools are bound to the NUMA node nearest the PCI device
  // `near_pci` (the GPU) when hwloc knows it, and zeroed (so every page is placed now).
  static Expected<KvCache> create(const KvCacheShape& shape, const std::vector<bool>& host_layers, const std::string& near_pci = "");
  int numa_node() const { return numa_node_; }
  // Bytes of the host pools backed by transparent huge pages after create() (0: 4 KiB pages).
  int64_t huge_page_bytes() const { return huge_bytes_; }
  bool has_host_storage(int64_t il) const { return il < static_cast<int64_t>(k_.size()) && k_[il].data() != nullptr; }
  int64_t host_bytes() const;

  const KvCacheShape& shape() const { return shape_; }
  // Returns a new sequence id (its length is 0).
  int32_t add_sequence();
  // Releases the sequence's blocks back to the pool.
  void free_sequence(int32_t seq);
  // Ensures `seq` has blocks for `n_tokens` tokens in total; out of blocks is an error.
  Status reserve(int32_t seq, int64_t n_tokens);
  // Returns the number of tokens whose K/V are stored.
  int64_t length(int32_t seq) const { return seqs_[seq].length; }
  void set_length(int32_t seq, int64_t n) { seqs_[seq].length = n; }
  const std::vector<int32_t>& block_table(int32_t seq) const { return seqs_[seq].blocks; }
  // Blocks a reserve() can still take: the host pool's free ones, or with a disk tier, what the host
  // pool and the disk hold together less the blocks sequences own.
  int64_t n_free_blocks() const { return disk_ ? capacity() - committed_ : static_cast<int64_t>(free_.size() + evictable_.size()); }

  // Prefix caching (without a disk tier): a full block registered under a hash of its tokens and
  // every token before it stays cached when its sequences free it, until the pool needs the room
  // (the least recently freed first), and a new sequence can start from it. A shared block is never
  // written again: its sequences write only past their shared prefix.
  // Registers block `index` of `seq` (full) under `hash`; a no-op when the hash is cached already,
  // the block has one, or there is a disk tier.
  void register_block(int32_t seq, int64_t index, uint64_t hash);
  // Starts `seq` (no blocks yet) with the cached blocks of the leading `hashes` up to the first one
  // not cached; sets its length to their tokens. Returns how many blocks it shares.
  int64_t share_prefix(int32_t seq, std::span<const uint64_t> hashes);
  // Whether a block is registered under `hash`.
  bool is_cached(uint64_t hash) const { return cached_.count(hash) != 0; }
  // Blocks held only by the prefix cache (counted in n_free_blocks: a reserve() takes them).
  int64_t n_cached_blocks() const { return static_cast<int64_t>(evictable_.size()); }

  // Adds the disk tier: `n_records` blocks in a spill file under `dir` (every layer must have host
  // storage: a spilled block takes all its layers with it).
  Status enable_disk(const std::string& dir, int64_t n_records);
  bool has_disk() const { return disk_ != nullptr; }
  const KvDiskFile* disk() const { return disk_.get(); }
  int64_t capacity() const { return shape_.n_blocks + (disk_ ? disk_->n_records() : 0); }
  // Starts a step: blocks made resident after this stay pinned (are not spilled) until the next one.
  void begin_step() { ++epoch_; }
  // Makes the blocks holding tokens [0, n_tokens) of `seq` resident and pins them for this step,
  // reading spilled ones back and spilling the coldest unpinned blocks of other sequences for room.
  // Returns false, changing nothing, when the pinned blocks leave too little room: the sequence
  // waits for a later step. Without a disk tier every block is resident: true.
  Expected<bool> make_resident(int32_t seq, int64_t n_tokens);
  // Whether the blocks holding tokens [0, n_tokens) of `seq` are in host memory.
  bool resident(int32_t seq, int64_t n_tokens) const;
  int64_t blocks_spilled() const { return n_spilled_; }    // written to disk, in total
  int64_t blocks_restored() const { return n_restored_; }  // read back, in total

  // Stores K and V of token `pos` of `seq` in layer `il` (reserved blocks): k, v [n_kv_heads, head_dim]
  // float32 or BF16 bits, converted to the pool's dtype (round to nearest even).
  void append(int64_t il, int32_t seq, int64_t pos, const float* k, const float* v);
  void append_bf16(int64_t il, int32_t seq, int64_t pos, const uint16_t* k, const uint16_t* v);
  // The same for n tokens at once (token t: seq_ids[t], positions[t], K at k + t * stride, V at
  // v + t * stride, BF16 bits), spread over the compute threads: a prompt's K/V is thousands of
  // tokens per layer, each scattered over every head's tiles.
  void append_rows_bf16(int64_t il, int64_t n, const int32_t* seq_ids, const int32_t* positions, const uint16_t* k, const uint16_t* v,
                        int64_t stride);
  // Reads them back as float32 [n_kv_heads, head_dim] (tests, spills).
  void read(int64_t il, int32_t seq, int64_t pos, float* k, float* v) const;
  KvLayerView layer_view(int64_t il) const;

  // Element offsets inside a (block, head) tile.
  static int64_t k_index(int64_t j, int64_t i, int64_t bs) { return ((i >> 1) * bs + j) * 2 + (i & 1); }
  static int64_t v_index(int64_t j, int64_t i, int64_t hd) { return ((j >> 1) * hd + i) * 2 + (j & 1); }

 private:
  struct Seq {
    bool live = false;
    int64_t length = 0;
    std::vector<int32_t> blocks;  // host block, or -1 while not resident (disk tier only)
    std::vector<int32_t> disk;    // disk record holding the block, or -1 (disk tier only)
  };
  struct Owner {
    int32_t seq = -1, index = -1;  // the sequence and block-table index a host block serves
  };
  // One block of every layer into / out of a record buffer.
  void gather(int32_t phys, void* record) const;
  void scatter(const void* record, int32_t phys);
  // Element offset of (block of `pos`, head 0) in a layer's pool, and the token's index in its block.
  int64_t tile_base(int32_t seq, int64_t pos, int64_t* j) const;
  template <typename Src>
  void store(int64_t il, int32_t seq, int64_t pos, const Src* k, const Src* v);
  KvCacheShape shape_;
  int numa_node_ = -1;
  int64_t huge_bytes_ = 0;
  std::vector<HostBuffer> k_, v_;  // per layer
  std::vector<int32_t> free_;
  std::vector<Seq> seqs_;
  // Prefix cache (no disk tier): per host block its sequences and its hash (0: none); hash -> block;
  // blocks no sequence holds but the cache keeps, by the tick they were freed at.
  std::vector<int32_t> refs_;
  std::vector<uint64_t> block_hash_, freed_at_;
  std::unordered_map<uint64_t, int32_t> cached_;
  std::set<std::pair<uint64_t, int32_t>> evictable_;
  uint64_t tick_ = 0;
  // Returns a free block, evicting the least recently freed cached one when none is free; -1 if none.
  int32_t take_block();
  // Disk tier.
  std::unique_ptr<KvDiskFile> disk_;
  std::vector<int32_t> disk_free_;
  std::vector<Owner> owner_;     // per host block
  std::vector<uint64_t> stamp_;  // per host block: the step that last made it resident
  uint64_t epoch_ = 1;
  int64_t committed_ = 0;        // logical blocks the sequences own
  std::vector<HostBuffer> staging_;
  int64_t n_spilled_ = 0, n_restored_ = 0;
};

}  // namespace ferry
