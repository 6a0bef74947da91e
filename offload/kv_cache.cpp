#include "offload/kv_cache.h"

#include "runtime/topology.h"

namespace ferry {

Expected<KvCache> KvCache::create(const KvCacheShape& shape, bool host_storage) {
  return create(shape, std::vector<bool>(static_cast<size_t>(shape.n_layers), host_storage));
}

Expected<KvCache> KvCache::create(const KvCacheShape& shape, const std::vector<bool>& host_layers, const std::string& near_pci) {
  if (shape.n_blocks <= 0 || shape.block_size <= 0)
    return invalid_argument(strprintf("KV cache: %lld blocks of %lld tokens is empty", (long long)shape.n_blocks, (long long)shape.block_size));
  if (shape.block_size % 2 != 0 || shape.head_dim % 2 != 0)
    return invalid_argument(strprintf("KV cache: block size %lld and head_dim %lld must be even", (long long)shape.block_size,
                                      (long long)shape.head_dim));
  if (shape.dtype != DType::kF32 && shape.dtype != DType::kBF16)
    return invalid_argument(strprintf("KV cache: host storage is F32 or BF16, not %s", std::string(dtype_name(shape.dtype)).c_str()));
  KvCache kv;
  kv.shape_ = shape;
  const size_t layer_bytes = static_cast<size_t>(shape.n_blocks * shape.block_size * shape.bytes_per_token_layer() / 2);
  kv.k_.resize(shape.n_layers);
  kv.v_.resize(shape.n_layers);
  for (int64_t il = 0; il < shape.n_layers; ++il) {
    if (!host_layers.at(il)) continue;
    HostBuffer k(layer_bytes, 4096), v(layer_bytes, 4096);
    if (k.data() == nullptr || v.data() == nullptr)
      return out_of_memory(strprintf("KV cache: cannot allocate %.2f GiB of host memory (%lld blocks of %lld tokens, %lld layers)",
                                     static_cast<double>(shape.bytes()) / (1u << 30), (long long)shape.n_blocks,
                                     (long long)shape.block_size, (long long)shape.n_layers));
    for (HostBuffer* b : {&k, &v}) {
      kv.numa_node_ = bind_near_pci(b->data(), b->size(), near_pci);
      b->zero();  // places the pages; an unwritten slot never holds a NaN that 0 * NaN would spread
    }
    kv.k_[il] = std::move(k);
    kv.v_[il] = std::move(v);
  }
  kv.free_.reserve(shape.n_blocks);
  for (int64_t b = shape.n_blocks - 1; b >= 0; --b) kv.free_.push_back(static_cast<int32_t>(b));
  return kv;
}

int64_t KvCache::host_bytes() const {
  int64_t n = 0;
  for (size_t il = 0; il < k_.size(); ++il) n += static_cast<int64_t>(k_[il].size() + v_[il].size());
  return n;
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

int64_t KvCache::tile_base(int32_t seq, int64_t pos, int64_t* j) const {
  const int64_t bs = shape_.block_size;
  *j = pos % bs;
  return static_cast<int64_t>(seqs_[seq].blocks[pos / bs]) * shape_.n_kv_heads * bs * shape_.head_dim;
}

namespace {
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return bf16_to_f32(x); }
inline void put(float* dst, float x) { *dst = x; }
inline void put(uint16_t* dst, float x) { *dst = f32_to_bf16(x); }
inline void put(uint16_t* dst, uint16_t x) { *dst = x; }
inline void put(float* dst, uint16_t x) { *dst = bf16_to_f32(x); }
}  // namespace

template <typename Src>
void KvCache::store(int64_t il, int32_t seq, int64_t pos, const Src* k, const Src* v) {
  const int64_t bs = shape_.block_size, hd = shape_.head_dim, tile = bs * hd;
  int64_t j = 0;
  const int64_t base = tile_base(seq, pos, &j);
  auto scatter = [&](auto* kp, auto* vp) {
    for (int64_t h = 0; h < shape_.n_kv_heads; ++h) {
      auto* kt = kp + base + h * tile;
      auto* vt = vp + base + h * tile;
      for (int64_t i = 0; i < hd; ++i) {
        put(kt + k_index(j, i, bs), k[h * hd + i]);
        put(vt + v_index(j, i, hd), v[h * hd + i]);
      }
    }
  };
  if (shape_.dtype == DType::kF32) scatter(k_[il].as<float>(), v_[il].as<float>());
  else scatter(k_[il].as<uint16_t>(), v_[il].as<uint16_t>());
}

void KvCache::append(int64_t il, int32_t seq, int64_t pos, const float* k, const float* v) { store(il, seq, pos, k, v); }
void KvCache::append_bf16(int64_t il, int32_t seq, int64_t pos, const uint16_t* k, const uint16_t* v) { store(il, seq, pos, k, v); }

void KvCache::read(int64_t il, int32_t seq, int64_t pos, float* k, float* v) const {
  const int64_t bs = shape_.block_size, hd = shape_.head_dim, tile = bs * hd;
  int64_t j = 0;
  const int64_t base = tile_base(seq, pos, &j);
  auto gather = [&](const auto* kp, const auto* vp) {
    for (int64_t h = 0; h < shape_.n_kv_heads; ++h)
      for (int64_t i = 0; i < hd; ++i) {
        k[h * hd + i] = to_f32(kp[base + h * tile + k_index(j, i, bs)]);
        v[h * hd + i] = to_f32(vp[base + h * tile + v_index(j, i, hd)]);
      }
  };
  if (shape_.dtype == DType::kF32) gather(k_[il].as<const float>(), v_[il].as<const float>());
  else gather(k_[il].as<const uint16_t>(), v_[il].as<const uint16_t>());
}

KvLayerView KvCache::layer_view(int64_t il) const {
  KvLayerView v;
  v.k = k_[il].data();
  v.v = v_[il].data();
  v.dtype = shape_.dtype;
  v.block_size = shape_.block_size;
  v.n_kv_heads = shape_.n_kv_heads;
  v.head_dim = shape_.head_dim;
  return v;
}

}  // namespace ferry
