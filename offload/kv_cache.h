// KvCache: paged keys and values. Fixed-size blocks of `block_size` tokens come from one pool; each
// sequence has a block table shared by all layers (vLLM's layout). Per layer, K and V are
//   [n_blocks, block_size, n_kv_heads, head_dim]
// so a block of one KV head is read as block_size strided rows of head_dim values.
//
// Today the pool is host memory in float32 (exact CPU math). GPU blocks, BF16 blocks and the
// host/disk tiers of the offload engine keep this interface: sequences, block tables, lengths.
#pragma once

#include <cstdint>
#include <vector>

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
  int64_t bytes() const { return 2 * n_layers * n_blocks * block_size * n_kv_heads * head_dim * 4; }
};

class KvCache {
 public:
  // Creates the block manager; with `host_storage` it also allocates the K/V pool in host memory
  // (an allocation failure names the size). Without it another executor (the GPU's) holds the
  // blocks' bytes and this object only manages sequences, block tables and lengths.
  static Expected<KvCache> create(const KvCacheShape& shape, bool host_storage = true);
  // Host storage for the layers where `host_layers[il]` only (the layers a GPU executor computes on
  // the CPU).
  static Expected<KvCache> create(const KvCacheShape& shape, const std::vector<bool>& host_layers);
  bool has_host_storage(int64_t il) const { return il < static_cast<int64_t>(k_.size()) && k_[il].data() != nullptr; }

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
  int64_t n_free_blocks() const { return static_cast<int64_t>(free_.size()); }

  // Returns K (or V) of token `pos` of `seq` in layer `il`: [n_kv_heads, head_dim].
  float* k_at(int64_t il, int32_t seq, int64_t pos) { return at(k_[il], seq, pos); }
  float* v_at(int64_t il, int32_t seq, int64_t pos) { return at(v_[il], seq, pos); }
  const float* k_block(int64_t il, int32_t block) const { return k_[il].as<float>() + block * block_stride(); }
  const float* v_block(int64_t il, int32_t block) const { return v_[il].as<float>() + block * block_stride(); }
  int64_t block_stride() const { return shape_.block_size * shape_.n_kv_heads * shape_.head_dim; }

 private:
  struct Seq {
    bool live = false;
    int64_t length = 0;
    std::vector<int32_t> blocks;
  };
  float* at(HostBuffer& buf, int32_t seq, int64_t pos) {
    const Seq& s = seqs_[seq];
    const int32_t block = s.blocks[pos / shape_.block_size];
    return buf.as<float>() + block * block_stride() + (pos % shape_.block_size) * shape_.n_kv_heads * shape_.head_dim;
  }
  KvCacheShape shape_;
  std::vector<HostBuffer> k_, v_;  // per layer
  std::vector<int32_t> free_;
  std::vector<Seq> seqs_;
};

}  // namespace ferry
