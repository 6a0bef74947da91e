#include "offload/kv_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

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
  // Huge pages for pools of 2 MiB and more (FERRY_KV_HUGEPAGES=0 turns them off, to measure them):
  // attention reads each head's 4 KiB tile of every block, a page apart with 4 KiB pages.
  const char* huge_env = std::getenv("FERRY_KV_HUGEPAGES");
  const bool huge = layer_bytes >= HostBuffer::kHugePage && !(huge_env && std::string(huge_env) == "0");
  const size_t align = huge ? HostBuffer::kHugePage : 4096;
  for (int64_t il = 0; il < shape.n_layers; ++il) {
    if (!host_layers.at(il)) continue;
    HostBuffer k(layer_bytes, align), v(layer_bytes, align);
    if (k.data() == nullptr || v.data() == nullptr)
      return out_of_memory(strprintf("KV cache: cannot allocate %.2f GiB of host memory (%lld blocks of %lld tokens, %lld layers)",
                                     static_cast<double>(shape.bytes()) / (1u << 30), (long long)shape.n_blocks,
                                     (long long)shape.block_size, (long long)shape.n_layers));
    for (HostBuffer* b : {&k, &v}) {
      if (huge) b->advise_huge_pages();
      kv.numa_node_ = bind_near_pci(b->data(), b->size(), near_pci);
    }
    kv.k_[il] = std::move(k);
    kv.v_[il] = std::move(v);
  }
  // Zeroing places the pages (on the bound node, whichever thread touches them); an unwritten slot
  // never holds a NaN that 0 * NaN would spread. Then the pages that came as 4 KiB ones (a
  // fragmented host, THP defrag off) are collapsed into huge pages: on the GPU host the attention
  // bench read a pool of 4 KiB pages at 76.2 GB/s against 86.5 in huge pages (notes/kv.md).
  std::vector<HostBuffer*> pools;
  std::vector<std::pair<const void*, size_t>> ranges;
  for (auto* side : {&kv.k_, &kv.v_})
    for (HostBuffer& b : *side)
      if (b.data() != nullptr) {
        pools.push_back(&b);
        ranges.emplace_back(b.data(), b.size());
      }
  run_parallel(static_cast<int64_t>(pools.size()), [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) pools[i]->zero();
  });
  if (huge && !pools.empty()) {
    const int64_t total = kv.host_bytes();
    kv.huge_bytes_ = ferry::huge_page_bytes(ranges);
    if (kv.huge_bytes_ < total - total / 50) {
      run_parallel(static_cast<int64_t>(pools.size()), [&](int64_t a, int64_t e) {
        for (int64_t i = a; i < e; ++i) collapse_huge_pages(pools[i]->data(), pools[i]->size());
      });
      kv.huge_bytes_ = ferry::huge_page_bytes(ranges);
    }
  }
  kv.free_.reserve(shape.n_blocks);
  for (int64_t b = shape.n_blocks - 1; b >= 0; --b) kv.free_.push_back(static_cast<int32_t>(b));
  kv.refs_.assign(shape.n_blocks, 0);
  kv.block_hash_.assign(shape.n_blocks, 0);
  kv.freed_at_.assign(shape.n_blocks, 0);
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
  for (size_t b = 0; b < s.blocks.size(); ++b) {
    const int32_t phys = s.blocks[b];
    if (phys >= 0 && disk_) {
      free_.push_back(phys);
      owner_[phys] = Owner{};
    } else if (phys >= 0 && --refs_[phys] == 0) {
      if (block_hash_[phys] != 0) {  // kept for the prefix cache
        freed_at_[phys] = ++tick_;
        evictable_.insert({freed_at_[phys], phys});
      } else {
        free_.push_back(phys);
      }
    }
    if (disk_ && s.disk[b] >= 0) disk_free_.push_back(s.disk[b]);
  }
  if (disk_) committed_ -= static_cast<int64_t>(s.blocks.size());
  s = Seq{};
}

int32_t KvCache::take_block() {
  if (!free_.empty()) {
    const int32_t b = free_.back();
    free_.pop_back();
    return b;
  }
  if (evictable_.empty()) return -1;
  const int32_t b = evictable_.begin()->second;
  evictable_.erase(evictable_.begin());
  cached_.erase(block_hash_[b]);
  block_hash_[b] = 0;
  return b;
}

void KvCache::register_block(int32_t seq, int64_t index, uint64_t hash) {
  if (disk_ || hash == 0) return;
  const Seq& s = seqs_[seq];
  if (index < 0 || index >= static_cast<int64_t>(s.blocks.size()) || (index + 1) * shape_.block_size > s.length) return;
  const int32_t phys = s.blocks[index];
  if (phys < 0 || block_hash_[phys] != 0 || cached_.count(hash)) return;
  block_hash_[phys] = hash;
  cached_[hash] = phys;
}

int64_t KvCache::share_prefix(int32_t seq, std::span<const uint64_t> hashes) {
  Seq& s = seqs_[seq];
  if (disk_ || !s.blocks.empty()) return 0;
  for (uint64_t h : hashes) {
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    const int32_t phys = it->second;
    if (refs_[phys]++ == 0) evictable_.erase({freed_at_[phys], phys});
    s.blocks.push_back(phys);
  }
  s.length = static_cast<int64_t>(s.blocks.size()) * shape_.block_size;
  return static_cast<int64_t>(s.blocks.size());
}

Status KvCache::reserve(int32_t seq, int64_t n_tokens) {
  Seq& s = seqs_[seq];
  const int64_t need = (n_tokens + shape_.block_size - 1) / shape_.block_size;
  while (static_cast<int64_t>(s.blocks.size()) < need) {
    if (disk_) {
      // Logical blocks: host memory comes with make_resident.
      if (committed_ >= capacity())
        return out_of_memory(strprintf("KV cache is full: %lld tokens need %lld blocks of %lld, %lld in host memory and %lld on disk",
                                       (long long)n_tokens, (long long)need, (long long)shape_.block_size, (long long)shape_.n_blocks,
                                       (long long)disk_->n_records()));
      s.blocks.push_back(-1);
      s.disk.push_back(-1);
      ++committed_;
      continue;
    }
    const int32_t phys = take_block();
    if (phys < 0)
      return out_of_memory(strprintf("KV cache is full: %lld tokens need %lld blocks of %lld, %lld in the pool", (long long)n_tokens,
                                     (long long)need, (long long)shape_.block_size, (long long)shape_.n_blocks));
    refs_[phys] = 1;
    s.blocks.push_back(phys);
  }
  return Status::Ok();
}

Status KvCache::enable_disk(const std::string& dir, int64_t n_records) {
  if (disk_) return invalid_argument("--kv-disk given twice");
  for (int64_t il = 0; il < shape_.n_layers; ++il)
    if (!has_host_storage(il))
      return invalid_argument(strprintf("--kv-disk: layer %lld keeps its K/V on the GPU; the disk tier needs every layer's K/V in host memory (--kv host)",
                                        (long long)il));
  for (const Seq& q : seqs_)
    if (q.live) return invalid_argument("--kv-disk: the cache already holds sequences");
  const int64_t record = 2 * shape_.n_layers * shape_.n_kv_heads * shape_.block_size * shape_.head_dim * static_cast<int64_t>(dtype_size(shape_.dtype));
  FERRY_ASSIGN_OR_RETURN(disk_, KvDiskFile::create(dir, record, n_records));
  for (const auto& [tick, phys] : evictable_) free_.push_back(phys);  // no prefix cache with a disk tier
  evictable_.clear();
  cached_.clear();
  std::fill(block_hash_.begin(), block_hash_.end(), 0);
  disk_free_.clear();
  for (int64_t r = n_records - 1; r >= 0; --r) disk_free_.push_back(static_cast<int32_t>(r));
  owner_.assign(shape_.n_blocks, Owner{});
  stamp_.assign(shape_.n_blocks, 0);
  committed_ = 0;
  return Status::Ok();
}

void KvCache::gather(int32_t phys, void* record) const {
  const size_t bytes = static_cast<size_t>(shape_.n_kv_heads * shape_.block_size * shape_.head_dim) * dtype_size(shape_.dtype);
  char* out = static_cast<char*>(record);
  for (int64_t il = 0; il < shape_.n_layers; ++il) {
    std::memcpy(out, k_[il].as<const char>() + phys * bytes, bytes);
    std::memcpy(out + bytes, v_[il].as<const char>() + phys * bytes, bytes);
    out += 2 * bytes;
  }
}

void KvCache::scatter(const void* record, int32_t phys) {
  const size_t bytes = static_cast<size_t>(shape_.n_kv_heads * shape_.block_size * shape_.head_dim) * dtype_size(shape_.dtype);
  const char* in = static_cast<const char*>(record);
  for (int64_t il = 0; il < shape_.n_layers; ++il) {
    std::memcpy(k_[il].as<char>() + phys * bytes, in, bytes);
    std::memcpy(v_[il].as<char>() + phys * bytes, in + bytes, bytes);
    in += 2 * bytes;
  }
}

bool KvCache::resident(int32_t seq, int64_t n_tokens) const {
  const Seq& s = seqs_[seq];
  const int64_t need = (n_tokens + shape_.block_size - 1) / shape_.block_size;
  if (need > static_cast<int64_t>(s.blocks.size())) return false;
  for (int64_t b = 0; b < need; ++b)
    if (s.blocks[b] < 0) return false;
  return true;
}

Expected<bool> KvCache::make_resident(int32_t seq, int64_t n_tokens) {
  if (!disk_) return true;
  Seq& s = seqs_[seq];
  const int64_t bs = shape_.block_size;
  const int64_t need = (n_tokens + bs - 1) / bs;
  if (need > static_cast<int64_t>(s.blocks.size()))
    return Status(ErrorCode::kInternal, strprintf("KV cache: sequence %d makes %lld tokens resident but reserved %zu blocks", seq,
                                                  (long long)n_tokens, s.blocks.size()));
  std::vector<int64_t> missing;
  for (int64_t b = 0; b < need; ++b)
    if (s.blocks[b] < 0) missing.push_back(b);
  // Room: free host blocks, then unpinned blocks of other sequences, coldest first.
  std::vector<int32_t> victims;
  if (static_cast<int64_t>(missing.size()) > static_cast<int64_t>(free_.size())) {
    for (int32_t p = 0; p < static_cast<int32_t>(shape_.n_blocks); ++p)
      if (owner_[p].seq >= 0 && owner_[p].seq != seq && stamp_[p] < epoch_) victims.push_back(p);
    if (free_.size() + victims.size() < missing.size()) return false;
    std::sort(victims.begin(), victims.end(), [&](int32_t a, int32_t b) { return stamp_[a] != stamp_[b] ? stamp_[a] < stamp_[b] : a < b; });
  }
  for (int64_t b = 0; b < need; ++b)
    if (s.blocks[b] >= 0) stamp_[s.blocks[b]] = epoch_;
  if (missing.empty()) return true;
  // In batches: read the spilled blocks back (freeing their records), spill victims into records
  // (the reads first, so the records freed serve the spills), then place the blocks read.
  constexpr size_t kBatch = 8;
  const int64_t record = disk_->record_bytes();
  if (staging_.empty())
    for (size_t i = 0; i < 2 * kBatch; ++i) {
      HostBuffer b(static_cast<size_t>(record), 4096);
      if (b.data() == nullptr) return out_of_memory(strprintf("KV cache: cannot allocate %lld bytes of spill buffers", (long long)(2 * kBatch * record)));
      staging_.push_back(std::move(b));
    }
  size_t next_victim = 0;
  for (size_t at = 0; at < missing.size(); at += kBatch) {
    const size_t n = std::min(kBatch, missing.size() - at);
    std::vector<int64_t> rd;
    std::vector<void*> rd_buf;
    std::vector<int64_t> rd_block;  // index into this batch
    for (size_t i = 0; i < n; ++i) {
      const int64_t b = missing[at + i];
      if (s.disk[b] < 0) continue;
      rd.push_back(s.disk[b]);
      rd_buf.push_back(staging_[rd.size() - 1].data());
      rd_block.push_back(static_cast<int64_t>(i));
    }
    if (!rd.empty()) {
      FERRY_RETURN_IF_ERROR(disk_->read(rd, rd_buf));
      for (int64_t r : rd) disk_free_.push_back(static_cast<int32_t>(r));
      for (int64_t i : rd_block) s.disk[missing[at + i]] = -1;
      n_restored_ += static_cast<int64_t>(rd.size());
    }
    // Host blocks for the batch.
    std::vector<int32_t> phys(n);
    std::vector<int64_t> wr;
    std::vector<const void*> wr_buf;
    for (size_t i = 0; i < n; ++i) {
      if (!free_.empty()) {
        phys[i] = free_.back();
        free_.pop_back();
        continue;
      }
      const int32_t v = victims.at(next_victim++);
      Seq& o = seqs_[owner_[v].seq];
      const int32_t idx = owner_[v].index;
      o.blocks[idx] = -1;
      if (static_cast<int64_t>(idx) * bs < o.length) {  // holds tokens: to disk
        if (disk_free_.empty()) return Status(ErrorCode::kInternal, "KV cache: the spill file has no free record");
        const int32_t r = disk_free_.back();
        disk_free_.pop_back();
        void* buf = staging_[kBatch + wr.size()].data();
        gather(v, buf);
        wr.push_back(r);
        wr_buf.push_back(buf);
        o.disk[idx] = r;
      }
      owner_[v] = Owner{};
      phys[i] = v;
    }
    if (!wr.empty()) {
      FERRY_RETURN_IF_ERROR(disk_->write(wr, wr_buf));
      n_spilled_ += static_cast<int64_t>(wr.size());
    }
    for (size_t j = 0; j < rd_block.size(); ++j) scatter(rd_buf[j], phys[rd_block[j]]);
    for (size_t i = 0; i < n; ++i) {
      const int64_t b = missing[at + i];
      s.blocks[b] = phys[i];
      owner_[phys[i]] = Owner{seq, static_cast<int32_t>(b)};
      stamp_[phys[i]] = epoch_;
    }
  }
  return true;
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

void KvCache::append_rows_bf16(int64_t il, int64_t n, const int32_t* seq_ids, const int32_t* positions, const uint16_t* k, const uint16_t* v,
                               int64_t stride) {
  if (n <= 0) return;
  // Tasks: runs of consecutive tokens of one sequence within one block, so no two threads write
  // the same tile.
  const int64_t bs = shape_.block_size;
  std::vector<int64_t> starts;
  for (int64_t t = 0; t < n; ++t)
    if (t == 0 || seq_ids[t] != seq_ids[t - 1] || positions[t] != positions[t - 1] + 1 || positions[t] / bs != positions[t - 1] / bs)
      starts.push_back(t);
  starts.push_back(n);
  const int64_t n_tasks = static_cast<int64_t>(starts.size()) - 1;
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t t = starts[i0]; t < starts[i1]; ++t) store(il, seq_ids[t], positions[t], k + t * stride, v + t * stride);
  };
  // Each token's K scatters over head_dim / 2 cache lines of every head's tile (the layout the
  // kernels read), each a store miss: about 7 us a token on the H100 host. A decode micro-batch of
  // 128 tokens took 0.8-0.9 ms appended serially and 0.13 ms over the threads (notes/kv.md), so only
  // a handful of tokens stay on the calling thread.
  constexpr int64_t kSerialBelow = 16;
  if (n < kSerialBelow) run(0, n_tasks);
  else run_parallel(n_tasks, [&](int64_t i0, int64_t i1) { run(i0, i1); });
}

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
