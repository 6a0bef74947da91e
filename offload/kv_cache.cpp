#include "offload/kv_cache.h"

namespace ferry {

Expected<KvCache> KvCache::create(const KvCacheShape& shape, bool host_storage) {
  return create(shape, std::vector<bool>(static_cast<size_t>(shape.n_layers), host_storage));
}

Expected<KvCache> KvCache::create(const KvCacheShape& shape, const std::vector<bool>& host_layers) {
  if (shape.n_blocks <= 0 || shape.block_size <= 0)
    return invalid_argument(strprintf("KV cache: %lld blocks of %lld tokens is empty", (long long)shape.n_blocks, (long long)shape.block_size));
  KvCache kv;
  kv.shape_ = shape;
  const size_t layer_bytes = static_cast<size_t>(shape.n_blocks * shape.block_size * shape.n_kv_heads * shape.head_dim) * 4;
  kv.k_.resize(shape.n_layers);
  kv.v_.resize(shape.n_layers);
  for (int64_t il = 0; il < shape.n_layers; ++il) {
    if (!host_layers.at(il)) continue;
    HostBuffer k(layer_bytes), v(layer_bytes);
    if (k.data() == nullptr || v.data() == nullptr)
      return out_of_memory(strprintf("KV cache: cannot allocate %.2f GiB of host memory (%lld blocks of %lld tokens, %lld layers)",
                                     static_cast<double>(shape.bytes()) / (1u << 30), (long long)shape.n_blocks,
                                     (long long)shape.block_size, (long long)shape.n_layers));
    kv.k_[il] = std::move(k);
    kv.v_[il] = std::move(v);
  }
  kv.free_.reserve(shape.n_blocks);
  for (int64_t b = shape.n_blocks - 1; b >= 0; --b) kv.free_.push_back(static_cast<int32_t>(b));
  return kv;
}

int32_t KvCache::add_sequence() {
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (!seqs_[i].live) {
      seqs_[i] = Seq{true, 0, {}};
      return static_cast<int32_t>(i);
    }
  }
  seqs_.push_back(Seq{true, 0, {}});
  return static_cast<int32_t>(seqs_.size() - 1);
}

void KvCache::free_sequence(int32_t seq) {
  Seq& s = seqs_[seq];
  for (int32_t b : s.blocks) free_.push_back(b);
  s = Seq{};
}

Status KvCache::reserve(int32_t seq, int64_t n_tokens) {
  Seq& s = seqs_[seq];
  const int64_t need = (n_tokens + shape_.block_size - 1) / shape_.block_size;
  while (static_cast<int64_t>(s.blocks.size()) < need) {
    if (free_.empty())
      return out_of_memory(strprintf("KV cache is full: %lld tokens need %lld blocks of %lld, %lld in the pool", (long long)n_tokens,
                                     (long long)need, (long long)shape_.block_size, (long long)shape_.n_blocks));
    s.blocks.push_back(free_.back());
    free_.pop_back();
  }
  return Status::Ok();
}

}  // namespace ferry
