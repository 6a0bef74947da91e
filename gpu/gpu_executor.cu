#include "gpu/gpu_executor.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "cpu/cpu_executor.h"
#include "cpu/simd.h"
#include "gpu/cuda_stream_device.h"
#include "gpu/kernels.h"
#include "models/synthetic.h"
#include "models/weight_format.h"
#include "offload/layer_layout.h"
#include "offload/staging_ring.h"
#include "runtime/budget.h"
#include "runtime/topology.h"
#include "runtime/trace.h"

namespace ferry::gpu {

namespace {

int dtype_code(DType t) { return t == DType::kF32 ? 0 : t == DType::kF16 ? 1 : 2; }

// Whether decode steps run the fused layer (five kernels): yes unless FERRY_GPU_FUSE=0 (for comparison).
bool fused_decode() {
  static const bool on = [] {
    const char* e = std::getenv("FERRY_GPU_FUSE");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

}  // namespace

struct GpuExecutor::Impl {
  ModelConfig cfg;
  GpuOptions opts;
  cudaStream_t stream = nullptr;
  std::unique_ptr<CudaStreamDevice> dev;  // every GPU byte, streams, events, trace spans
  cublasHandle_t blas = nullptr;
  int n_sms = 0;

  // KV pool, per layer [n_blocks, block_size, n_kv, head_dim] bf16 (none for CPU-computed layers).
  KvCacheShape kv_shape;
  int32_t max_blocks = 0;  // per sequence
  std::vector<bf16*> k_pool, v_pool;
  float* inv_freq = nullptr;

  // Workspace, sized for cap_tokens tokens / cap_out output rows.
  int64_t cap_tokens = 0, cap_out = 0;
  float* x = nullptr;       // [T, E] residual stream
  bf16* xn = nullptr;       // [2T, E] normed: hi rows, then (for the QKV GEMM) lo rows
  float* qkv = nullptr;     // [2T, q + 2 kv]: the products of the hi rows, then of the lo rows
  bf16* q = nullptr;        // [T, q] rotated
  bf16* att = nullptr;      // [T, q]
  float* tmp = nullptr;     // [T, E] projection outputs added to the residual
  float* gu = nullptr;      // [T, 2 F]
  bf16* hbuf = nullptr;     // [T, F]
  float* logits = nullptr;  // [n_out, V]
  float* ss = nullptr;      // [kGemvFusedMaxRows, gemv_ss_parts(E)]: partial sums of squares of x's rows
  float* scratch = nullptr; // attention split partials
  int32_t* tokens_out = nullptr;  // [n_out] sampled tokens
  uint64_t* seeds_d = nullptr;    // [n_out]
  uint64_t* seeds_h = nullptr;    // pinned [n_out]
  int64_t scratch_floats = 0;
  // Step inputs: pinned host staging and its device copy: tokens, pos, row [T each], out rows [n_out],
  // query tiles [2T] (first token, count), block tables [n_rows, max_blocks].
  int32_t* in_h = nullptr;
  int32_t* in_d = nullptr;
  int64_t in_cap = 0;
  // Recorded after the copy out of in_h is enqueued (or the graph holding it): the host waits on it
  // before writing in_h again, since a step that keeps its logits on the GPU does not synchronise.
  cudaEvent_t in_free = nullptr;

  // Placement (runtime/budget.h): resident layers live in their own allocation; streamed layers come
  // through the StagingRing (from pinned host blocks or the packed store); CPU-computed layers run on
  // `cpu` from pinned host blocks, the residual crossing PCIe both ways.
  std::vector<Place> place;
  LayerLayout lay;                   // every layer's block (BF16 with q/k/v and gate/up adjacent, or quantised and fused)
  DType quant = DType::kBF16;        // the Linear weights' format (NF4, Q8: models/weight_format.h)
  bf16* wtile = nullptr;             // quantised weights dequantised a tile of rows at a time for cuBLAS
  int64_t wtile_elems = 0;
  std::vector<void*> host_layers;    // [n_layers] pinned blocks (streamed from host, CPU-computed)
  void* host_embedding = nullptr;    // the token embedding in pinned memory (the plan's embedding_on_host)
  std::unique_ptr<StagingRing> ring;
  bool ring_has_disk = false;
  std::unique_ptr<cpu::CpuExecutor> cpu;
  cudaEvent_t x_down = nullptr;      // the residual has reached the host for a CPU layer
  float* x_host = nullptr;           // [cap_tokens, E] pinned: the residual a CPU layer updates
  int64_t n_resident = 0;

  // Host-resident K/V (plan.kv_host, GPU-computed layers): attention on the CPU, in micro-batches.
  std::vector<bool> kv_host;          // per layer, CPU-computed layers excluded
  int64_t n_kv_host = 0;
  static constexpr int kMaxMb = 2;
  int n_mb = 1;                       // micro-batches of the current step
  cudaStream_t attn_stream = nullptr; // the CPU's attention, as host functions in layer order
  cudaEvent_t ev_qkv[kMaxMb] = {}, ev_att[kMaxMb] = {};
  // Pinned, and written / read by kernels through their mapped addresses: the small per-layer
  // transfers then never queue behind a streamed layer on a copy engine.
  uint16_t* qkv_host = nullptr;       // [cap, q + 2 kv] rotated q, k and v of the step
  uint16_t* att_host = nullptr;       // pinned [cap, q] the CPU's attention output
  // Fresh prompts' rotated q/k/v for the host cache, two buffers by layer parity: the GPU fills one
  // while the host appends the other (ev_fresh_done: that append has finished).
  uint16_t* fresh_host[2] = {nullptr, nullptr};
  cudaEvent_t ev_fresh_done[2] = {nullptr, nullptr};
  struct AttnJob {
    Impl* m;
    KvCache* kv;
    int64_t il, t0, n;
    bool append_only;  // fresh prompts: the GPU attends; the host only keeps their K/V
    const uint16_t* qkv;  // rows [t0, t0 + n) of q/k/v (qkv_host or a fresh_host buffer)
  };
  // Fresh prompts (sequences that start in this step, tokens [t_gpu, T)) attend on the GPU over a
  // scratch pool holding only this step's K/V; their K/V still go to the host cache for later steps.
  int64_t t_gpu = 0;
  QueryTiles gpu_tiles;  // the fresh prompts' query tiles (relative to t_gpu), on the device
  bf16* scratch_k = nullptr;
  bf16* scratch_v = nullptr;
  int64_t scratch_blocks = 0;
  cudaEvent_t ev_fresh = nullptr;
  std::deque<AttnJob> jobs;           // this step's host functions (stable addresses)
  // A host-K/V layer's output projections and MLPs, per micro-batch, wait to be issued until the
  // next layer's QKV of the micro-batch before (NEO's order): the GPU then prepares layer l + 1's
  // first micro-batch while the CPU still attends layer l's last, and the CPU goes from one
  // attention to the next without waiting for the GPU. Its ring slot is ended once all are issued.
  // Resident GPU-K/V layers that follow it join the chain: their rows run per micro-batch right
  // after the post of that micro-batch, so the GPU works through them for one micro-batch while the
  // CPU attends the other, and the pipeline no longer drains at a GPU-K/V layer (gpu_rows).
  struct PendingPosts {
    int64_t il = -1;    // -1: none
    LayerWeights w;     // the layer's weights (a ring slot's views when streamed)
    bool streamed = false;
    int n_mb = 0, next = 0;
    int64_t edge[kMaxMb + 1] = {};
    std::vector<std::pair<int64_t, LayerWeights>> gpu_layers;  // chained GPU-K/V layers, in order
  } pending;
  std::vector<int32_t> step_pos, step_seq;
  std::mutex attn_mu;
  std::string attn_error;             // the first failure of a host function this step

  // The current step.
  int64_t T = 0, n_out = 0, n_rows = 0;
  QueryTiles tiles;  // none (d null) for decode: one token a tile
  int n_splits = 1;
  bool pending_delta = false;
  // The fused decode layer left x current with its rows' partial sums of squares in `ss`: the next
  // layer's QKV GEMV normalises x itself (no RMSNorm kernel).
  bool ss_ready = false;
  enum class Mode { kEager, kCapture, kReplay } mode = Mode::kEager;
  std::map<int64_t, cudaGraphExec_t> graphs;  // decode graphs by batch size
  int64_t n_captured = 0, n_replays = 0;

  ~Impl() {
    ring.reset();  // waits for its copies and reads
    if (stream) cudaStreamSynchronize(stream);
    if (attn_stream) cudaStreamSynchronize(attn_stream);
    if (dev && dev->tracing()) {
      try {
        dev->resolve_spans();
      } catch (...) {
      }
    }
    for (auto& [t, g] : graphs) cudaGraphExecDestroy(g);
    if (blas) cublasDestroy(blas);
    if (in_h) cudaFreeHost(in_h);
    if (seeds_h) cudaFreeHost(seeds_h);
    if (in_free) cudaEventDestroy(in_free);
    if (x_down) cudaEventDestroy(x_down);
    if (x_host) cudaFreeHost(x_host);
    if (qkv_host) cudaFreeHost(qkv_host);
    for (int i = 0; i < 2; ++i) {
      if (fresh_host[i]) cudaFreeHost(fresh_host[i]);
      if (ev_fresh_done[i]) cudaEventDestroy(ev_fresh_done[i]);
    }
    if (att_host) cudaFreeHost(att_host);
    if (ev_fresh) cudaEventDestroy(ev_fresh);
    for (int i = 0; i < kMaxMb; ++i) {
      if (ev_qkv[i]) cudaEventDestroy(ev_qkv[i]);
      if (ev_att[i]) cudaEventDestroy(ev_att[i]);
    }
    if (dev) {
      for (void* h : host_layers)
        if (h) dev->free_pinned(h);
      if (host_embedding) dev->free_pinned(host_embedding);
    }
    dev.reset();  // frees the device memory
    if (stream) cudaStreamDestroy(stream);
    if (attn_stream) cudaStreamDestroy(attn_stream);
  }

  template <typename T>
  T* alloc(int64_t n, const char* what = "workspace") {
    return static_cast<T*>(dev->alloc_or_throw(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)), what));
  }
  void release(void* p) {
    if (p) dev->free(p);
  }

  PagedKv paged(int64_t il) const {
    PagedKv kv;
    kv.k = k_pool[il];
    kv.v = v_pool[il];
    kv.block_tables = in_d + 5 * T + n_out;
    kv.max_blocks = max_blocks;
    kv.block_size = static_cast<int32_t>(kv_shape.block_size);
    kv.n_kv_heads = static_cast<int32_t>(cfg.n_kv_heads);
    kv.head_dim = static_cast<int32_t>(cfg.head_dim);
    return kv;
  }

  // Views of one layer's block at `p` (q/k/v and gate/up adjacent, so each is one GEMM).
  LayerWeights layout(void* p, Tier tier) const { return lay.views(p, tier); }

  // y[M, N] (f32) = x[M, K] W^T, W [N, K] BF16 or quantised (the GEMV dequantises as it streams at
  // decode sizes; above, tiles of rows are dequantised to BF16 for cuBLAS, as hi + lo parts when
  // `precise`: the QKV product, whose rounding the attention scores feel most). x_lo: hi + lo rows
  // summed (GEMV sizes); without a GEMV the caller passes 2M rows instead.
  void linear(const bf16* x, const TensorView& W, int64_t N, int64_t K, float* y, int64_t M, bool fixed, const bf16* x_lo = nullptr,
              bool precise = false) {
    if (!is_quantized(W.dtype)) {
      if (x_lo) gemv(x, W.as<bf16>(), y, M, N, K, stream, fixed, x_lo);
      else gemm_f32(blas, x, W.as<bf16>(), y, M, N, K, stream, fixed);
      return;
    }
    if (x_lo || M <= kGemvMaxRows) {
      gemv_store(GemvIn{x, x_lo}, GemvW{W.data, W.dtype, precise || x_lo != nullptr}, y, M, N, K, stream, fixed);  // hi + lo rows: the QKV's
      return;
    }
    const int64_t tile = std::max<int64_t>(1, std::min(N, wtile_elems / (precise ? 2 : 1) / K));
    bf16* lo = precise ? wtile + tile * K : nullptr;
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t nt = std::min(tile, N - n0);
      dequantize_rows(W.dtype, W.as<uint8_t>(), N, K, n0, n0 + nt, wtile, stream, lo);
      gemm_ld(blas, x, wtile, y + n0, M, nt, K, N);
      if (lo) gemm_ld(blas, x, lo, y + n0, M, nt, K, N, true);
    }
  }

  void ensure_scratch(int64_t floats) {
    if (floats <= scratch_floats) return;
    for (auto& [k, g] : graphs) cudaGraphExecDestroy(g);
    graphs.clear();
    release(scratch);
    scratch = alloc<float>(floats);
    scratch_floats = floats;
  }

  void ensure_capacity(int64_t t, int64_t o, int64_t rows) {
    const int64_t need_in = 7 * t + o + 2 * rows * max_blocks;
    // Every reallocation frees device and pinned memory, which waits for the whole device: a
    // throughput run whose output rows grew by a few each prompt step paid 45-54 ms a step for it.
    // Output rows are sized once for the planned batch.
    if (o > cap_out) {
      for (auto& [k, g] : graphs) cudaGraphExecDestroy(g);
      graphs.clear();
      for (void* p : {(void*)logits, (void*)tokens_out, (void*)seeds_d}) release(p);
      cap_out = std::max(o, opts.max_outputs);
      logits = alloc<float>(cap_out * cfg.n_vocab);
      tokens_out = alloc<int32_t>(cap_out);
      seeds_d = alloc<uint64_t>(cap_out);
      if (seeds_h) CUDA_CHECK(cudaFreeHost(seeds_h));
      CUDA_CHECK(cudaMallocHost(&seeds_h, cap_out * sizeof(uint64_t)));
    }
    if (t > cap_tokens) {
      for (auto& [k, g] : graphs) cudaGraphExecDestroy(g);
      graphs.clear();
      for (void* p : {(void*)x, (void*)xn, (void*)qkv, (void*)q, (void*)att, (void*)tmp, (void*)gu, (void*)hbuf, (void*)ss}) release(p);
      cap_tokens = t;
      const int64_t E = cfg.n_embd, Q = cfg.q_dim(), KV = cfg.kv_dim(), F = cfg.n_ff;
      x = alloc<float>(cap_tokens * E);
      xn = alloc<bf16>(2 * cap_tokens * E);
      qkv = alloc<float>(2 * cap_tokens * (Q + 2 * KV));
      q = alloc<bf16>(cap_tokens * Q);
      att = alloc<bf16>(cap_tokens * Q);
      tmp = alloc<float>(cap_tokens * E);
      gu = alloc<float>(cap_tokens * 2 * F);
      hbuf = alloc<bf16>(cap_tokens * F);
      ss = alloc<float>(kGemvFusedMaxRows * gemv_ss_parts(E));
      if (cpu) {
        if (x_host) CUDA_CHECK(cudaFreeHost(x_host));
        x_host = nullptr;
        CUDA_CHECK(cudaMallocHost(&x_host, cap_tokens * E * sizeof(float)));
      }
      if (n_kv_host > 0) {
        if (qkv_host) CUDA_CHECK(cudaFreeHost(qkv_host));
        if (att_host) CUDA_CHECK(cudaFreeHost(att_host));
        for (uint16_t*& f : fresh_host) {
          if (f) CUDA_CHECK(cudaFreeHost(f));
          f = nullptr;
        }
        qkv_host = att_host = nullptr;
        for (uint16_t*& f : fresh_host) CUDA_CHECK(cudaMallocHost(&f, cap_tokens * (Q + 2 * KV) * 2));
        release(scratch_k);
        release(scratch_v);
        scratch_blocks = cap_tokens / kv_shape.block_size + 64;
        scratch_k = alloc<bf16>(scratch_blocks * kv_shape.block_size * KV, "fresh-prompt K/V scratch");
        scratch_v = alloc<bf16>(scratch_blocks * kv_shape.block_size * KV, "fresh-prompt K/V scratch");
        CUDA_CHECK(cudaMallocHost(&qkv_host, cap_tokens * (Q + 2 * KV) * 2));
        CUDA_CHECK(cudaMallocHost(&att_host, cap_tokens * Q * 2));
      }
    }
    if (need_in > in_cap) {
      for (auto& [k, g] : graphs) cudaGraphExecDestroy(g);
      graphs.clear();
      if (in_h) CUDA_CHECK(cudaFreeHost(in_h));
      release(in_d);
      in_cap = std::max(need_in, 2 * in_cap);
      CUDA_CHECK(cudaMallocHost(&in_h, in_cap * sizeof(int32_t)));
      in_d = alloc<int32_t>(in_cap);
    }
  }

  // Splits of the key range so that a small batch still fills the GPU.
  int choose_splits(int64_t t, int64_t max_keys) const {
    const int64_t blocks = t * cfg.n_kv_heads;
    const int64_t want = std::max<int64_t>(1, (2 * n_sms + blocks - 1) / blocks);
    const int64_t most = std::max<int64_t>(1, (max_keys + 127) / 128);
    return static_cast<int>(std::min<int64_t>({want, most, 32}));
  }
};

GpuExecutor::GpuExecutor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuExecutor::~GpuExecutor() = default;
int64_t GpuExecutor::device_bytes() const { return impl_->dev->held_bytes(); }
int64_t GpuExecutor::peak_device_bytes() const { return impl_->dev->peak_bytes(); }
int64_t GpuExecutor::graphs_captured() const { return impl_->n_captured; }
int64_t GpuExecutor::n_streamed_layers() const { return impl_->ring ? impl_->ring->n_layers() : 0; }
int64_t GpuExecutor::n_cpu_layers() const { return std::count(impl_->place.begin(), impl_->place.end(), Place::kCpu); }
int64_t GpuExecutor::n_kv_host_layers() const { return impl_->n_kv_host + n_cpu_layers(); }
int64_t GpuExecutor::streamed_bytes() const { return impl_->ring ? impl_->ring->bytes_copied() : 0; }
int64_t GpuExecutor::graph_replays() const { return impl_->n_replays; }

Expected<std::unique_ptr<GpuExecutor>> GpuExecutor::create(WeightStore& ws, const KvCacheShape& kvs, const GpuOptions& opts) {
  const ModelConfig& cfg = ws.config();
  const int64_t L = cfg.n_layers;
  if (!attention_supports(cfg.head_dim, cfg.n_heads / cfg.n_kv_heads))
    return unsupported(strprintf("--device gpu: head_dim %lld with %lld query heads per KV head is not supported by the GPU attention kernel",
                                 (long long)cfg.head_dim, (long long)(cfg.n_heads / cfg.n_kv_heads)));
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    cudaGetLastError();
    return unsupported("--device gpu: no usable CUDA GPU");
  }
  // Placement: the plan's, or layers 0..n_resident_layers-1 resident and the rest streamed from host.
  std::vector<Place> place = opts.plan.place;
  std::vector<Tier> source = opts.plan.source;
  if (place.empty()) {
    const int64_t n = opts.n_resident_layers < 0 ? L : std::min<int64_t>(L, opts.n_resident_layers);
    for (int64_t il = 0; il < L; ++il) {
      place.push_back(il < n ? Place::kResident : Place::kStreamed);
      source.push_back(il < n ? Tier::kDevice : Tier::kPinnedHost);
    }
  }
  if (static_cast<int64_t>(place.size()) != L || static_cast<int64_t>(source.size()) != L)
    return invalid_argument("--device gpu: the placement does not match the model's layers");
  const PackedManifest* store = ws.packed();
  if (store) {
    for (int64_t il = 0; il < L; ++il)
      for (const auto& t : store->blocks[il + 1].tensors)
        if (t.dtype != DType::kBF16 && !is_quantized(t.dtype))
          return unsupported(strprintf("--device gpu --disk %s: tensor '%s' is stored as %s; the GPU streams BF16 (or NF4 / Q8) blocks: repack with 'ferry pack --dtype bf16'",
                                       store->dir.c_str(), t.name.c_str(), std::string(dtype_name(t.dtype)).c_str()));
  }
  for (int64_t il = 0; il < L; ++il)
    if (source[il] == Tier::kDisk && store == nullptr)
      return invalid_argument(strprintf("--device gpu: layer %lld is planned on disk, but there is no --disk store", (long long)il));

  std::vector<bool> kv_host = opts.plan.kv_host;
  if (kv_host.empty()) kv_host.assign(L, opts.kv_on_host);
  if (static_cast<int64_t>(kv_host.size()) != L) return invalid_argument("--device gpu: the KV placement does not match the model's layers");
  for (int64_t il = 0; il < L; ++il) kv_host[il] = kv_host[il] && place[il] != Place::kCpu;

  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.cfg = cfg;
  m.opts = opts;
  m.place = place;
  m.kv_host = kv_host;
  m.n_kv_host = std::count(kv_host.begin(), kv_host.end(), true);
  m.n_resident = std::count(place.begin(), place.end(), Place::kResident);
  try {
    CUDA_CHECK(cudaSetDevice(opts.device));
    if (m.n_kv_host > 0) {
      // The CPU's attention wants every core: the host thread sleeps in its waits for the step
      // instead of spinning on a core a pinned attention worker runs on.
      if (cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync) != cudaSuccess) cudaGetLastError();
    }
    CUDA_CHECK(cudaDeviceGetAttribute(&m.n_sms, cudaDevAttrMultiProcessorCount, opts.device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&m.in_free, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&m.x_down, cudaEventDisableTiming));
    if (m.n_kv_host > 0) {
      CUDA_CHECK(cudaStreamCreateWithFlags(&m.attn_stream, cudaStreamNonBlocking));
      CUDA_CHECK(cudaEventCreateWithFlags(&m.ev_fresh, cudaEventDisableTiming));
      for (int i = 0; i < 2; ++i) CUDA_CHECK(cudaEventCreateWithFlags(&m.ev_fresh_done[i], cudaEventDisableTiming));
      for (int i = 0; i < Impl::kMaxMb; ++i) {
        CUDA_CHECK(cudaEventCreateWithFlags(&m.ev_qkv[i], cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&m.ev_att[i], cudaEventDisableTiming));
      }
    }
    m.dev = std::make_unique<CudaStreamDevice>(m.stream, opts.cap_bytes, Tracer::get().enabled());
    if (m.dev->tracing()) m.opts.cuda_graphs = false;  // every step eager, so every step has spans
    CUBLAS_CHECK(cublasCreate(&m.blas));
    CUBLAS_CHECK(cublasSetStream(m.blas, m.stream));
    // A fixed workspace lets cuBLAS run inside graph capture without allocating.
    const size_t ws_bytes = 32u << 20;
    CUBLAS_CHECK(cublasSetWorkspace(m.blas, m.alloc<uint8_t>(ws_bytes, "cuBLAS workspace"), ws_bytes));

    const int64_t E = cfg.n_embd, V = cfg.n_vocab;
    const DType lin = linear_dtype(ws.layer(0));
    m.quant = is_quantized(lin) ? lin : DType::kBF16;
    m.lay = layer_layout(cfg, 0, m.quant);
    const int64_t block = static_cast<int64_t>(m.lay.bytes);
    if (is_quantized(m.quant)) {
      // cuBLAS's rows: a tile of dequantised weight rows (32 MiB), reused by every product.
      m.wtile_elems = quant_tile_elems(cfg, m.quant);
      m.wtile = m.alloc<bf16>(m.wtile_elems, "dequantised weight tile");
    }
    auto pinned = [&](int64_t bytes, const std::string& what) {
      auto p = m.dev->alloc_pinned(bytes, what);
      if (!p.ok()) throw CudaError(p.status().message());
      return *p;
    };
    // Pinned blocks first (streamed from host, CPU-computed), so the ring knows its sources. A block
    // read from the store needs room for its 4 KiB-padded size.
    const int64_t host_block = store ? static_cast<int64_t>((m.lay.bytes + kPackAlign - 1) / kPackAlign * kPackAlign) : block;
    m.host_layers.assign(L, nullptr);
    std::vector<RingLayer> order;
    for (int64_t il = 0; il < L; ++il) {
      if (place[il] == Place::kResident) continue;
      if (source[il] != Tier::kDisk) m.host_layers[il] = pinned(host_block, "layer " + std::to_string(il));
      if (place[il] == Place::kStreamed) order.push_back({il, m.host_layers[il], source[il] == Tier::kDisk ? il + 1 : -1});
      if (place[il] == Place::kStreamed && source[il] == Tier::kDisk) m.ring_has_disk = true;
    }
    if (!order.empty()) {
      RingOptions ro;
      ro.n_slots = opts.n_slots;
      auto ring = StagingRing::create(*m.dev, std::move(order), block, store, ro);
      if (!ring.ok()) return ring.status();
      m.ring = std::move(*ring);
    }
    // Building a layer that does not stay resident needs one layer of device memory: ring slot 0
    // (unused until the first step), else a temporary buffer (the plan keeps room for the slots).
    void* build = nullptr;
    bool build_owned = false;
    auto build_buffer = [&]() {
      if (build) return build;
      if (m.ring) {
        build = m.ring->slot(0);
      } else {
        build = m.alloc<uint8_t>(block, "layer build buffer");
        build_owned = true;
      }
      return build;
    };

    // Host bytes go through one device staging buffer when they need converting to BF16.
    int64_t stage_elems = 0;
    // (Quantised blobs are copied as they are: no conversion.)
    auto consider = [&](const TensorView& v) {
      if (!v.empty() && v.dtype != DType::kBF16 && !is_quantized(v.dtype)) stage_elems = std::max(stage_elems, v.numel());
    };
    for (int64_t il = 0; il < L; ++il)
      for (const auto& v : ws.layer(il).t) consider(v);
    const bool emb_host = opts.plan.embedding_on_host && !cfg.tie_word_embeddings;
    for (int t = 0; t < kGlobalTensorCount; ++t)
      if (!(t == kTokEmbd && emb_host)) consider(ws.globals().t[t]);  // a host embedding is converted on the host
    void* stage = stage_elems ? m.alloc<float>(stage_elems, "conversion buffer") : nullptr;

    // A quantised weight: its blob copied as it is, or (synthetic, generated here) the BF16 rows of
    // each part generated a few at a time into the build tile and quantised into place.
    auto put_quant = [&](const TensorView& src, const TensorView& dst, int64_t il, int t) {
      if (src.data != nullptr) {
        FERRY_CHECK(src.dtype == dst.dtype);
        CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, dst.nbytes(), cudaMemcpyHostToDevice, m.stream));
        return;
      }
      FERRY_CHECK(ws.is_synthetic());
      std::vector<int> parts = {t};
      if (t == kWqkv) parts = {kWq, kWk, kWv};
      if (t == kWGateUp) parts = {kWGate, kWUp};
      const int64_t R = dst.shape[0], K = dst.shape[1];
      // NF4-DQ: the weight's fp32 absmax staged at the tile's end (quant_tile_elems leaves room).
      const int64_t stage_floats = quant_stage_floats(cfg, dst.dtype);
      float* stage = stage_floats ? reinterpret_cast<float*>(m.wtile) + (m.wtile_elems / 2 - stage_floats) / 64 * 64 : nullptr;
      const int64_t gen_elems = stage ? 2 * (stage - reinterpret_cast<float*>(m.wtile)) : m.wtile_elems;
      FERRY_CHECK(quant_stage_floats(dst.dtype, R, K) <= stage_floats && gen_elems >= K);
      const int64_t chunk = std::max<int64_t>(1, gen_elems / K);
      int64_t r = 0;
      std::vector<int64_t> part_rows;
      for (int part : parts) {
        const WeightStore::SyntheticInfo info = ws.synthetic_info(il, part);
        const int64_t rows = part == kWq ? cfg.q_dim() : part == kWk || part == kWv ? cfg.kv_dim() : part == kWo || part == kWDown ? cfg.n_embd : cfg.n_ff;
        part_rows.push_back(rows);
        for (int64_t pr = 0; pr < rows; pr += chunk) {
          const int64_t n = std::min(chunk, rows - pr);
          synthetic_fill(synthetic_key(info.name), synthetic_scale(info.fan_in, info.is_norm), false, n * K, m.wtile, m.stream, pr * K);
          quantize_rows(dst.dtype, m.wtile, R, K, r + pr, r + pr + n, dst.as<uint8_t>(), m.stream, stage);
        }
        r += rows;
      }
      FERRY_CHECK(r == R);
      finish_quant(dst.dtype, R, K, stage, dst.as<uint8_t>(), m.stream, part_rows);
    };
    auto put = [&](const TensorView& src, bf16* dst, int64_t il, int t) {
      const int64_t n = src.numel();
      if (src.data == nullptr) {
        FERRY_CHECK(ws.is_synthetic());
        const WeightStore::SyntheticInfo info = ws.synthetic_info(il, t);
        synthetic_fill(synthetic_key(info.name), synthetic_scale(info.fan_in, info.is_norm), info.is_norm, n, dst, m.stream);
      } else if (src.dtype == DType::kBF16) {
        CUDA_CHECK(cudaMemcpyAsync(dst, src.data, n * 2, cudaMemcpyHostToDevice, m.stream));
      } else {
        CUDA_CHECK(cudaMemcpyAsync(stage, src.data, n * dtype_size(src.dtype), cudaMemcpyHostToDevice, m.stream));
        to_bf16(stage, dtype_code(src.dtype), n, dst, m.stream);
        CUDA_CHECK(cudaStreamSynchronize(m.stream));  // the stage is reused
      }
    };
    std::unique_ptr<DiskReader> reader;
    void* disk_tmp = nullptr;
    if (store) {
      auto r = DiskReader::open(*store);
      if (!r.ok()) return r.status();
      reader = std::move(*r);
    }
    auto read_block = [&](int64_t il, void* dst) -> Status {
      FERRY_RETURN_IF_ERROR(reader->submit(0, il + 1, dst));
      return reader->wait(0);
    };
    // The store serves the placed views only once everything has succeeded (a failed create frees
    // the memory they point into).
    std::vector<std::pair<LayerWeights, Tier>> placed(L);
    for (int64_t il = 0; il < L; ++il) {
      if (place[il] != Place::kResident && source[il] == Tier::kDisk) {
        placed[il] = {m.layout(nullptr, Tier::kDisk), Tier::kDisk};  // the ring reads it
        continue;
      }
      if (store) {
        // From the packed store: straight into the pinned block, or via a pinned buffer to the GPU.
        if (place[il] != Place::kResident) {
          if (Status st = read_block(il, m.host_layers[il]); !st.ok()) return st;
          placed[il] = {m.layout(m.host_layers[il], Tier::kPinnedHost), Tier::kPinnedHost};
          continue;
        }
        if (!disk_tmp) disk_tmp = pinned(host_block, "disk read buffer");
        if (Status st = read_block(il, disk_tmp); !st.ok()) return st;
        void* base = m.alloc<uint8_t>(block, "resident layer");
        CUDA_CHECK(cudaMemcpyAsync(base, disk_tmp, block, cudaMemcpyHostToDevice, m.stream));
        CUDA_CHECK(cudaStreamSynchronize(m.stream));
        placed[il] = {m.layout(base, Tier::kDevice), Tier::kDevice};
        continue;
      }
      // Uploaded, converted or generated on the GPU; a non-resident layer is then copied down once.
      const LayerWeights& h = ws.layer(il);
      const bool resident = place[il] == Place::kResident;
      void* base = resident ? m.alloc<uint8_t>(block, "resident layer") : build_buffer();
      LayerWeights d = m.layout(base, Tier::kDevice);
      for (int t = 0; t < kLayerTensorCount; ++t) {
        if (h.t[t].n_dims == 0) continue;  // the model has no such tensor
        if (is_quantized(d.t[t].dtype)) put_quant(h.t[t], d.t[t], il, t);
        else put(h.t[t], d.t[t].as<bf16>(), il, t);
      }
      if (resident) {
        placed[il] = {d, Tier::kDevice};
        continue;
      }
      CUDA_CHECK(cudaMemcpyAsync(m.host_layers[il], base, block, cudaMemcpyDeviceToHost, m.stream));
      CUDA_CHECK(cudaStreamSynchronize(m.stream));
      placed[il] = {m.layout(m.host_layers[il], Tier::kPinnedHost), Tier::kPinnedHost};
    }
    const GlobalWeights& gh = ws.globals();
    GlobalWeights gd;
    if (emb_host) {
      // The token embedding in pinned host memory (the plan's embedding_on_host): the embedding
      // kernel reads a step's rows over PCIe. Filled on the host, or generated on the GPU a layer
      // buffer at a time and copied down.
      m.host_embedding = pinned(V * E * 2, "token embedding");
      bf16* table = static_cast<bf16*>(m.host_embedding);
      const TensorView& src = gh.t[kTokEmbd];
      if (src.data == nullptr) {
        FERRY_CHECK(ws.is_synthetic());
        const WeightStore::SyntheticInfo info = ws.synthetic_info(-1, kTokEmbd);
        bf16* tmp = static_cast<bf16*>(build_buffer());
        const int64_t chunk = std::max<int64_t>(E, block / 2 / E * E);
        for (int64_t first = 0; first < V * E; first += chunk) {
          const int64_t n = std::min(chunk, V * E - first);
          synthetic_fill(synthetic_key(info.name), synthetic_scale(info.fan_in, info.is_norm), info.is_norm, n, tmp, m.stream, first);
          CUDA_CHECK(cudaMemcpyAsync(table + first, tmp, n * 2, cudaMemcpyDeviceToHost, m.stream));
          CUDA_CHECK(cudaStreamSynchronize(m.stream));
        }
      } else {
        // BF16 copied; float32 and float16 rounded to nearest even, as the GPU's conversion does.
        FERRY_CHECK_MSG(src.dtype == DType::kBF16 || src.dtype == DType::kF32 || src.dtype == DType::kF16, "token embedding: BF16, F32 or F16");
        run_parallel(V, [&](int64_t r0, int64_t r1) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(table) + r0 * E;
          const int64_t n = (r1 - r0) * E;
          if (src.dtype == DType::kBF16) {
            std::memcpy(dst, static_cast<const uint16_t*>(src.data) + r0 * E, n * 2);
          } else if (src.dtype == DType::kF32) {
            cpu::f32_to_bf16_row(static_cast<const float*>(src.data) + r0 * E, dst, n);
          } else {
            std::vector<float> row(static_cast<size_t>(E));
            for (int64_t r = r0; r < r1; ++r) {
              cpu::f16_to_f32_row(static_cast<const uint16_t*>(src.data) + r * E, row.data(), E);
              cpu::f32_to_bf16_row(row.data(), dst + (r - r0) * E, E);
            }
          }
        }, std::max<int64_t>(1, (int64_t{1} << 20) / E));
      }
      gd.t[kTokEmbd] = TensorView::contiguous(table, DType::kBF16, {V, E}, Tier::kPinnedHost);
    }
    if (disk_tmp) m.dev->free_pinned(disk_tmp);
    if (build_owned) m.release(build);
    auto view = [](bf16* p, std::initializer_list<int64_t> shape) { return TensorView::contiguous(p, DType::kBF16, shape, Tier::kDevice); };
    if (!emb_host) {
      gd.t[kTokEmbd] = view(m.alloc<bf16>(V * E, "embedding"), {V, E});
      put(gh.t[kTokEmbd], gd.t[kTokEmbd].as<bf16>(), -1, kTokEmbd);
    }
    gd.t[kOutNorm] = view(m.alloc<bf16>(E, "final norm"), {E});
    put(gh.t[kOutNorm], gd.t[kOutNorm].as<bf16>(), -1, kOutNorm);
    if (cfg.tie_word_embeddings) {
      gd.t[kLmHead] = gd.t[kTokEmbd];
    } else if (const DType hq = gh.t[kLmHead].dtype; is_quantized(hq)) {
      // --quant-head: the host's blob copied, or (synthetic) rows generated into the dequantisation
      // tile and quantised into place (int8 and NF4 need no second pass over the weight).
      gd.t[kLmHead] = TensorView::contiguous(m.alloc<uint8_t>(quant_layout(hq, V, E).bytes, "lm_head"), hq, {V, E}, Tier::kDevice);
      uint8_t* blob = gd.t[kLmHead].as<uint8_t>();
      if (gh.t[kLmHead].data != nullptr) {
        CUDA_CHECK(cudaMemcpyAsync(blob, gh.t[kLmHead].data, gd.t[kLmHead].nbytes(), cudaMemcpyHostToDevice, m.stream));
      } else {
        FERRY_CHECK(ws.is_synthetic() && m.wtile != nullptr);
        CUDA_CHECK(cudaMemsetAsync(blob, 0, gd.t[kLmHead].nbytes(), m.stream));
        const WeightStore::SyntheticInfo info = ws.synthetic_info(-1, kLmHead);
        const int64_t chunk = std::max<int64_t>(1, m.wtile_elems / E);
        for (int64_t r = 0; r < V; r += chunk) {
          const int64_t n = std::min(chunk, V - r);
          synthetic_fill(synthetic_key(info.name), synthetic_scale(info.fan_in, info.is_norm), false, n * E, m.wtile, m.stream, r * E);
          quantize_rows(hq, m.wtile, V, E, r, r + n, blob, m.stream);
        }
        finish_quant(hq, V, E, nullptr, blob, m.stream);
      }
      CUDA_CHECK(cudaStreamSynchronize(m.stream));
    } else {
      gd.t[kLmHead] = view(m.alloc<bf16>(V * E, "lm_head"), {V, E});
      put(gh.t[kLmHead], gd.t[kLmHead].as<bf16>(), -1, kLmHead);
    }

    // KV pool (GPU-computed layers) and rotary frequencies.
    m.kv_shape = kvs;
    m.max_blocks = static_cast<int32_t>(std::min<int64_t>(kvs.n_blocks, (cfg.n_ctx_max + kvs.block_size - 1) / kvs.block_size));
    const int64_t pool = kvs.n_blocks * kvs.block_size * cfg.kv_dim();
    for (int64_t il = 0; il < L; ++il) {
      const bool gpu_kv = place[il] != Place::kCpu && !kv_host[il];
      m.k_pool.push_back(gpu_kv ? m.alloc<bf16>(pool, "KV cache") : nullptr);
      m.v_pool.push_back(gpu_kv ? m.alloc<bf16>(pool, "KV cache") : nullptr);
    }
    const std::vector<float> inv = rope_inv_freq(cfg);
    m.inv_freq = m.alloc<float>(static_cast<int64_t>(inv.size()), "rotary frequencies");
    CUDA_CHECK(cudaMemcpyAsync(m.inv_freq, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice, m.stream));
    CUDA_CHECK(cudaStreamSynchronize(m.stream));
    m.release(stage);
    for (int64_t il = 0; il < L; ++il) ws.place_layer(il, placed[il].first, placed[il].second);
    ws.place_globals(gd);
    if (std::count(place.begin(), place.end(), Place::kCpu) > 0) {
      m.cpu = std::make_unique<cpu::CpuExecutor>(cfg);
      m.cpu->set_precision(cpu::GemmPrecision::kBf16Inputs);
    }
  } catch (const CudaError& e) {
    return out_of_memory(std::string("--device gpu: ") + e.what());
  }
  return std::unique_ptr<GpuExecutor>(new GpuExecutor(std::move(impl)));
}

void finish_pending_posts(GpuExecutor::Impl& m);  // below, with the host-K/V layer

Status GpuExecutor::begin_step(const StepBatch& b, const KvCache& kv) {
  Impl& m = *impl_;
  TraceRange r("gpu.begin_step");
  const int64_t T = b.n_tokens();
  if (T == 0) return invalid_argument("empty step: no tokens");
  try {
    finish_pending_posts(m);  // only after a step that failed between its layers: keeps the ring's count
  } catch (const CudaError& e) {
    return Status(ErrorCode::kInternal, e.what());
  }
  for (int64_t t = 0; t < T; ++t)
    if (b.tokens[t] < 0 || b.tokens[t] >= m.cfg.n_vocab)
      return invalid_argument(strprintf("token id %d at index %lld is outside the vocabulary [0, %lld)", b.tokens[t], (long long)t,
                                        (long long)m.cfg.n_vocab));
  // Batch rows: the distinct sequences, in order of first appearance.
  std::vector<int32_t> seqs;
  std::vector<int32_t> row(T);
  for (int64_t t = 0; t < T; ++t) {
    auto it = std::find(seqs.begin(), seqs.end(), b.seq_ids[t]);
    row[t] = static_cast<int32_t>(it - seqs.begin());
    if (it == seqs.end()) seqs.push_back(b.seq_ids[t]);
  }
  const int64_t n_out = b.n_outputs(), n_rows = static_cast<int64_t>(seqs.size());
  const bool decode = n_out == T && n_rows == T;
  try {
    CUDA_CHECK(cudaEventSynchronize(m.in_free));  // the previous step's inputs have left in_h
    // Graphs are keyed by T alone, so a decode step always lays its inputs out for T rows.
    m.ensure_capacity(T, std::max<int64_t>(n_out, 1), decode ? T : n_rows);
    m.T = T;
    m.n_out = n_out;
    m.n_rows = decode ? T : n_rows;
    int32_t* in = m.in_h;
    std::memcpy(in, b.tokens.data(), T * 4);
    std::memcpy(in + T, b.positions.data(), T * 4);
    std::memcpy(in + 2 * T, row.data(), T * 4);
    std::memcpy(in + 3 * T, b.output_rows.data(), n_out * 4);
    // Query tiles for prefill: runs of consecutive tokens of one sequence share their K/V reads.
    int32_t* tiles = in + 3 * T + n_out;
    m.tiles = {};
    if (!decode) {
      m.tiles = build_query_tiles(b.seq_ids.data(), T, m.cfg.n_heads, m.cfg.n_kv_heads, m.cfg.head_dim, tensor_core_attention(), tiles);
      m.tiles.d = m.in_d + 3 * T + n_out;
    }
    int32_t* tables = in + 5 * T + n_out;
    int32_t max_pos = 0;
    for (int32_t p : b.positions) max_pos = std::max(max_pos, p);
    for (int64_t r = 0; r < n_rows; ++r) {
      const auto& bt = kv.block_table(seqs[r]);
      if (static_cast<int64_t>(bt.size()) > m.max_blocks) return invalid_argument("sequence longer than the GPU block table");
      std::copy(bt.begin(), bt.end(), tables + r * m.max_blocks);
    }
    if (m.n_kv_host > 0) {
      {
        TraceRange w("gpu.wait_host_fns");
        CUDA_CHECK(cudaStreamSynchronize(m.attn_stream));  // the last step's host functions are done
      }
      for (int64_t il = 0; il < m.cfg.n_layers; ++il)
        if (m.kv_host[il] && !kv.has_host_storage(il))
          return invalid_argument(strprintf("gpu executor: layer %lld keeps its K/V in host memory, but the KV cache has no host storage for it", (long long)il));
      m.jobs.clear();
      m.attn_error.clear();
      m.step_pos = b.positions;
      m.step_seq = b.seq_ids;
      m.n_mb = T >= 2 ? std::clamp(m.opts.micro_batches, 1, Impl::kMaxMb) : 1;
    }
    m.t_gpu = T;
    m.gpu_tiles = {};
    if (m.n_kv_host > 0) {
      // The fresh-prompt tail: the longest suffix of tokens whose sequences have nothing cached and
      // no token before it, and whose blocks fit the scratch pool.
      int64_t tc = T;
      while (tc > 0 && kv.length(b.seq_ids[tc - 1]) == 0) --tc;
      bool ok = tc < T;
      for (int64_t t = 0; ok && t < tc; ++t) ok = kv.length(b.seq_ids[t]) != 0 || std::find(b.seq_ids.begin() + tc, b.seq_ids.end(), b.seq_ids[t]) == b.seq_ids.end();
      int32_t* gtiles = in + 5 * T + n_out + m.n_rows * m.max_blocks;
      int32_t* stables = gtiles + 2 * T;
      const int64_t bs = m.kv_shape.block_size;
      int64_t next_block = 0;
      for (int64_t t = tc; ok && t < T;) {
        int64_t e = t + 1;
        while (e < T && b.seq_ids[e] == b.seq_ids[t]) ++e;
        const int64_t need = (e - t + bs - 1) / bs;
        if (next_block + need > m.scratch_blocks || need > m.max_blocks) {
          ok = false;
          break;
        }
        for (int64_t k = 0; k < need; ++k) stables[static_cast<int64_t>(row[t]) * m.max_blocks + k] = static_cast<int32_t>(next_block + k);
        next_block += need;
        t = e;
      }
      if (ok) {
        m.t_gpu = tc;
        m.gpu_tiles = build_query_tiles(b.seq_ids.data() + tc, T - tc, m.cfg.n_heads, m.cfg.n_kv_heads, m.cfg.head_dim, tensor_core_attention(), gtiles);
        m.gpu_tiles.d = m.in_d + 5 * T + n_out + m.n_rows * m.max_blocks;
      }
    }
    if (m.cpu) {
      for (int64_t il = 0; il < m.cfg.n_layers; ++il)
        if (m.place[il] == Place::kCpu && !kv.has_host_storage(il))
          return invalid_argument(strprintf("gpu executor: layer %lld is computed on the CPU but its KV cache has no host storage", (long long)il));
      m.cpu->use_hidden(m.x_host);
      FERRY_RETURN_IF_ERROR(m.cpu->begin_step(b, kv));
    }
    const int64_t in_n = 7 * T + n_out + 2 * m.n_rows * m.max_blocks;
    m.pending_delta = false;
    m.ss_ready = false;
    if (decode && m.opts.cuda_graphs && m.n_resident == m.cfg.n_layers && m.n_kv_host == 0) {
      // Fixed split count (from the longest possible context) so one graph serves every step.
      m.n_splits = m.choose_splits(T, static_cast<int64_t>(m.max_blocks) * m.kv_shape.block_size);
      m.ensure_scratch(m.n_splits > 1 ? T * m.cfg.n_heads * m.n_splits * (m.cfg.head_dim + 2) : 0);
      if (m.graphs.count(T)) {
        m.mode = Impl::Mode::kReplay;
        return Status::Ok();
      }
      m.mode = Impl::Mode::kCapture;
      CUDA_CHECK(cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal));
    } else {
      m.mode = Impl::Mode::kEager;
      m.n_splits = m.choose_splits(T, max_pos + 1);
      m.ensure_scratch(m.n_splits > 1 ? T * m.cfg.n_heads * m.n_splits * (m.cfg.head_dim + 2) : 0);
    }
    copy_by_kernel(m.in_h, m.in_d, in_n * 4, m.stream);  // not behind the ring's copies (kernels.h)
    if (m.mode == Impl::Mode::kEager) CUDA_CHECK(cudaEventRecord(m.in_free, m.stream));
  } catch (const CudaError& e) {
    return out_of_memory(e.what());
  }
  return Status::Ok();
}

void GpuExecutor::embed(const GlobalWeights& w) {
  Impl& m = *impl_;
  if (m.mode == Impl::Mode::kReplay) return;
  TraceRange r("gpu.embed");
  m.ss_ready = false;
  embedding(w[kTokEmbd].as<bf16>(), m.in_d, m.T, m.cfg.n_embd, m.x, m.stream);
}

namespace {

// A host function on the attention stream: appends one micro-batch's K/V to the host cache and
// computes its attention into the pinned output. Failures are kept for end_step (no CUDA call here).
void CUDART_CB run_attn_job(void* p) {
  auto& j = *static_cast<GpuExecutor::Impl::AttnJob*>(p);
  GpuExecutor::Impl& m = *j.m;
  const bool tracing = m.dev->tracing();
  const int64_t t_start = tracing ? Tracer::get().now_ns() : 0;
  try {
    const int64_t Q = m.cfg.q_dim(), KV = m.cfg.kv_dim(), W = Q + 2 * KV;
    j.kv->append_rows_bf16(j.il, j.n, m.step_seq.data() + j.t0, m.step_pos.data() + j.t0, j.qkv + j.t0 * W + Q, j.qkv + j.t0 * W + Q + KV, W);
    if (tracing && !j.append_only)
      Tracer::get().complete("cpu.kv_append", strprintf("layer %lld append %lld-%lld", (long long)j.il, (long long)j.t0, (long long)(j.t0 + j.n)),
                             t_start, Tracer::get().now_ns() - t_start);
    if (j.append_only) {
      if (tracing)
        Tracer::get().complete("cpu.attention", strprintf("layer %lld append %lld-%lld", (long long)j.il, (long long)j.t0, (long long)(j.t0 + j.n)),
                               t_start, Tracer::get().now_ns() - t_start);
      return;
    }
    cpu::AttnArgs a;
    a.q = j.qkv + j.t0 * W;
    a.q_bf16 = true;
    a.q_stride = W;
    a.n_tokens = j.n;
    a.positions = m.step_pos.data() + j.t0;
    a.seq_ids = m.step_seq.data() + j.t0;
    a.n_heads = m.cfg.n_heads;
    a.window = m.cfg.sliding_window;
    a.out = m.att_host + j.t0 * Q;
    a.out_bf16 = true;
    cpu::paged_attention(a, j.il, *j.kv);
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(m.attn_mu);
    if (m.attn_error.empty()) m.attn_error = strprintf("CPU attention of layer %lld: %s", (long long)j.il, e.what());
  }
  if (tracing)
    Tracer::get().complete("cpu.attention", strprintf("layer %lld tokens %lld-%lld", (long long)j.il, (long long)j.t0, (long long)(j.t0 + j.n)),
                           t_start, Tracer::get().now_ns() - t_start);
}

}  // namespace

namespace {

// Output projection and MLP of tokens [t0, t0 + n) of layer il (attention output in m.att).
void post_part(GpuExecutor::Impl& m, int64_t il, const LayerWeights& w, int64_t t0, int64_t n, const char* what) {
  const ModelConfig& c = m.cfg;
  const int64_t E = c.n_embd, Q = c.q_dim(), F = c.n_ff;
  const float eps = static_cast<float>(c.rms_norm_eps);
  cudaEvent_t span = m.dev->span_begin(m.stream);
  m.linear(m.att + t0 * Q, w[kWo], E, Q, m.tmp + t0 * E, n, false);
  add_rmsnorm(m.x + t0 * E, m.tmp + t0 * E, w[kFfnNorm].as<bf16>(), nullptr, n, E, eps, m.xn, m.stream);
  m.linear(m.xn, w[kWGateUp], 2 * F, E, m.gu, n, false);
  swiglu(m.gu, n, F, m.hbuf, m.stream);
  m.linear(m.hbuf, w[kWDown], E, F, m.tmp + t0 * E, n, false);
  if (span) m.dev->span_end(span, m.stream, "gpu.compute", strprintf("layer %lld out+mlp %s", (long long)il, what));
}

// A GPU-K/V layer over tokens [t0, t0 + n) only (its K/V pool on the GPU): the rows of one
// micro-batch, or the fresh prompts' rows with their query tiles (`tiles`, relative to t0).
void gpu_rows(GpuExecutor::Impl& m, int64_t il, const LayerWeights& w, int64_t t0, int64_t n, const QueryTiles& tiles, const char* what) {
  const ModelConfig& c = m.cfg;
  const int64_t T = m.T, E = c.n_embd, Q = c.q_dim(), W = Q + 2 * c.kv_dim();
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int32_t* pos = m.in_d + T + t0;
  const int32_t* row = m.in_d + 2 * T + t0;
  TraceRange r("gpu.chained_layer", il);
  cudaEvent_t span = m.dev->span_begin(m.stream);
  add_rmsnorm(m.x + t0 * E, m.pending_delta ? m.tmp + t0 * E : nullptr, w[kAttnNorm].as<bf16>(), nullptr, n, E, eps, m.xn, m.stream, m.xn + n * E);
  m.linear(m.xn, w[kWqkv], W, E, m.qkv, 2 * n, false, nullptr, true);
  rope_kv_append(m.qkv, m.qkv + n * W, c.attention_bias ? w[kBq].as<bf16>() : nullptr, pos, row, m.inv_freq, n, c.n_heads, m.paged(il), m.q + t0 * Q,
                 m.stream);
  attention(m.q + t0 * Q, pos, row, tiles, n, c.n_heads, c.sliding_window, m.paged(il), m.n_splits, m.scratch, m.att + t0 * Q, m.stream);
  if (span) m.dev->span_end(span, m.stream, "gpu.compute", strprintf("layer %lld attention %s", (long long)il, what));
  post_part(m, il, w, t0, n, what);
}

// Issues the pending layer's next micro-batch: the CPU's output comes up, then its post, then the
// chained GPU-K/V layers over the same rows.
void issue_pending_part(GpuExecutor::Impl& m) {
  auto& p = m.pending;
  const int mb = p.next++;
  const int64_t t0 = p.edge[mb], n = p.edge[mb + 1] - t0, Q = m.cfg.q_dim();
  TraceRange r("gpu.out_mlp", p.il);
  CUDA_CHECK(cudaStreamWaitEvent(m.stream, m.ev_att[mb], 0));
  copy_by_kernel(m.att_host + t0 * Q, m.att + t0 * Q, n * Q * 2, m.stream);  // the CPU's output, read over PCIe by a kernel
  post_part(m, p.il, p.w, t0, n, mb == 0 ? "part 0" : "part 1");
  for (const auto& [il, w] : p.gpu_layers) gpu_rows(m, il, w, t0, n, QueryTiles{}, mb == 0 ? "part 0" : "part 1");
}

}  // namespace

// Issues what is left of the pending host-K/V layer and ends its ring slot, then the chained
// GPU-K/V layers' fresh-prompt rows (the tokens after the micro-batches), layer by layer.
void finish_pending_posts(GpuExecutor::Impl& m) {
  auto& p = m.pending;
  if (p.il < 0) return;
  while (p.next < p.n_mb) issue_pending_part(m);
  if (p.streamed) m.ring->end();
  const int64_t Tc = p.edge[p.n_mb], n = m.T - Tc;
  if (n > 0)
    for (const auto& [il, w] : p.gpu_layers)
      gpu_rows(m, il, w, Tc, n, m.gpu_tiles, "fresh prompts");
  p.gpu_layers.clear();
  p.il = -1;
}

// A layer whose K/V live in host memory: per micro-batch the GPU runs norm, QKV and RoPE and sends
// q/k/v down; the CPU appends K/V and computes attention; the output comes back and the GPU runs the
// output projection and the MLP. The GPU work stays on one stream (its scratch is reused micro-batch
// after micro-batch); only the rows that cross PCIe are per part. The order on the GPU, for layers
// l - 1 and l both host-K/V with micro-batches A and B: post(l-1, A), QKV(l, A), post(l-1, B),
// QKV(l, B), fresh prompts of l; layer l's posts wait for layer l + 1 (finish_pending_posts).
void host_kv_layer(GpuExecutor::Impl& m, int64_t il, const LayerWeights& w, bool streamed, KvCache& kv) {
  const ModelConfig& c = m.cfg;
  const int64_t T = m.T, E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), W = Q + 2 * KV;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int32_t* pos = m.in_d + T;
  const int32_t* row = m.in_d + 2 * T;
  // CPU attention for tokens [0, Tc) in micro-batches; fresh prompts [Tc, T) attend on the GPU.
  const int64_t Tc = m.t_gpu;
  const int n_mb = Tc == 0 ? 0 : Tc >= 2 ? m.n_mb : 1;
  int64_t edge[GpuExecutor::Impl::kMaxMb + 1];
  for (int i = 0; i <= n_mb; ++i) edge[i] = Tc * i / n_mb;
  // The previous layer's parts interleave with this one's only when they cut the tokens alike
  // (always within a step; checked, not assumed).
  if (m.pending.il >= 0 && (m.pending.n_mb != n_mb || !std::equal(edge, edge + n_mb + 1, m.pending.edge))) finish_pending_posts(m);
  PagedKv none;  // no pool: q, k and v go straight to the pinned qkv_host
  none.n_kv_heads = static_cast<int32_t>(c.n_kv_heads);
  none.head_dim = static_cast<int32_t>(c.head_dim);
  for (int mb = 0; mb < n_mb; ++mb) {
    if (m.pending.il >= 0) issue_pending_part(m);  // the previous layer's post of this micro-batch
    TraceRange r("gpu.qkv", il);
    const int64_t t0 = edge[mb], n = edge[mb + 1] - t0;
    cudaEvent_t span = m.dev->span_begin(m.stream);
    add_rmsnorm(m.x + t0 * E, m.pending_delta ? m.tmp + t0 * E : nullptr, w[kAttnNorm].as<bf16>(), nullptr, n, E, eps, m.xn, m.stream, m.xn + n * E);
    m.linear(m.xn, w[kWqkv], W, E, m.qkv, 2 * n, false, nullptr, true);
    rope_kv_append(m.qkv, m.qkv + n * W, c.attention_bias ? w[kBq].as<bf16>() : nullptr, pos + t0, row + t0, m.inv_freq, n, c.n_heads, none,
                   reinterpret_cast<bf16*>(m.qkv_host) + t0 * W, m.stream);
    if (span) m.dev->span_end(span, m.stream, "gpu.compute", strprintf("layer %lld qkv part %d", (long long)il, mb));
    CUDA_CHECK(cudaEventRecord(m.ev_qkv[mb], m.stream));
    CUDA_CHECK(cudaStreamWaitEvent(m.attn_stream, m.ev_qkv[mb], 0));
    m.jobs.push_back({&m, &kv, il, t0, n, false, m.qkv_host});
    CUDA_CHECK(cudaLaunchHostFunc(m.attn_stream, run_attn_job, &m.jobs.back()));
    CUDA_CHECK(cudaEventRecord(m.ev_att[mb], m.attn_stream));
  }
  finish_pending_posts(m);  // (none left when the parts matched)
  if (Tc < T) {
    TraceRange r("gpu.fresh_prompts", il);
    const int64_t n = T - Tc;
    cudaEvent_t span = m.dev->span_begin(m.stream);
    add_rmsnorm(m.x + Tc * E, m.pending_delta ? m.tmp + Tc * E : nullptr, w[kAttnNorm].as<bf16>(), nullptr, n, E, eps, m.xn, m.stream, m.xn + n * E);
    m.linear(m.xn, w[kWqkv], W, E, m.qkv, 2 * n, false, nullptr, true);
    const bf16* bias = c.attention_bias ? w[kBq].as<bf16>() : nullptr;
    // Rotated k and v for the host cache, then q and K/V into the scratch pool for this step.
    // This parity's buffer is free once the host appended what the layer before last left in it.
    const int par = static_cast<int>(il & 1);
    CUDA_CHECK(cudaStreamWaitEvent(m.stream, m.ev_fresh_done[par], 0));
    rope_kv_append(m.qkv, m.qkv + n * W, bias, pos + Tc, row + Tc, m.inv_freq, n, c.n_heads, none, reinterpret_cast<bf16*>(m.fresh_host[par]) + Tc * W,
                   m.stream);
    CUDA_CHECK(cudaEventRecord(m.ev_fresh, m.stream));
    CUDA_CHECK(cudaStreamWaitEvent(m.attn_stream, m.ev_fresh, 0));
    m.jobs.push_back({&m, &kv, il, Tc, n, true, m.fresh_host[par]});
    CUDA_CHECK(cudaLaunchHostFunc(m.attn_stream, run_attn_job, &m.jobs.back()));
    CUDA_CHECK(cudaEventRecord(m.ev_fresh_done[par], m.attn_stream));
    PagedKv sk = m.paged(il);
    sk.k = m.scratch_k;
    sk.v = m.scratch_v;
    sk.block_tables = m.in_d + 7 * T + m.n_out + m.n_rows * m.max_blocks;
    rope_kv_append(m.qkv, m.qkv + n * W, bias, pos + Tc, row + Tc, m.inv_freq, n, c.n_heads, sk, m.q + Tc * Q, m.stream);
    attention(m.q + Tc * Q, pos + Tc, row + Tc, m.gpu_tiles, n, c.n_heads, c.sliding_window, sk,
              m.n_splits, m.scratch, m.att + Tc * Q, m.stream);
    if (span) m.dev->span_end(span, m.stream, "gpu.compute", strprintf("layer %lld fresh prompts qkv+attention", (long long)il));
    post_part(m, il, w, Tc, n, "fresh prompts");
  }
  // This layer's posts wait for the next layer (or finish_pending_posts before anything else).
  auto& p = m.pending;
  p.il = n_mb > 0 ? il : -1;
  p.w = w;
  p.streamed = streamed;
  p.n_mb = n_mb;
  p.next = 0;
  std::copy(edge, edge + n_mb + 1, p.edge);
  if (n_mb == 0 && streamed) m.ring->end();
}

void GpuExecutor::layer(int64_t il, const LayerWeights& wl, KvCache& kv) {
  Impl& m = *impl_;
  if (m.mode == Impl::Mode::kReplay) return;
  const bool ss_ready = m.ss_ready;  // only the fused path below leaves it set
  m.ss_ready = false;
  // The previous host-K/V layer's posts go first unless this layer interleaves with them (a host-K/V
  // layer; the ring has at least two slots, so both may be streamed).
  const bool streamed = m.place[il] == Place::kStreamed;
  // A resident GPU-K/V layer after a host-K/V one joins its chain: its rows are issued per
  // micro-batch with that layer's posts. (A streamed one does not: the chain would hold ring slots
  // past the next layer's begin.)
  if (m.pending.il >= 0 && m.place[il] == Place::kResident && !m.kv_host[il]) {
    m.pending.gpu_layers.emplace_back(il, wl);
    m.pending_delta = true;
    return;
  }
  if (m.pending.il >= 0 && (m.place[il] == Place::kCpu || !m.kv_host[il])) finish_pending_posts(m);
  if (m.place[il] == Place::kCpu) {
    // The residual goes down, the CPU runs the layer from pinned host memory (its KV in host memory),
    // the residual comes back. The copy stream keeps streaming the next layers meanwhile.
    TraceRange r("gpu.cpu_layer", il);
    const int64_t n = m.T * m.cfg.n_embd;
    if (m.pending_delta) add_f32(m.x, m.tmp, n, m.stream);
    CUDA_CHECK(cudaMemcpyAsync(m.x_host, m.x, n * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
    CUDA_CHECK(cudaEventRecord(m.x_down, m.stream));
    CUDA_CHECK(cudaEventSynchronize(m.x_down));
    const int64_t t0 = m.dev->tracing() ? Tracer::get().now_ns() : 0;
    m.cpu->layer(il, wl, kv);
    if (m.dev->tracing()) Tracer::get().complete("cpu.compute", "layer " + std::to_string(il), t0, Tracer::get().now_ns() - t0);
    copy_by_kernel(m.x_host, m.x, n * static_cast<int64_t>(sizeof(float)), m.stream);
    m.pending_delta = false;
    return;
  }
  const LayerWeights* wp = &wl;
  LayerWeights slot_views;
  if (streamed) {
    // This layer's copy (issued layers ago) and the next ones' (wrapping into the next step); the
    // compute stream waits for this layer's bytes only.
    slot_views = m.layout(m.ring->begin(il), Tier::kDevice);
    wp = &slot_views;
  }
  const LayerWeights& w = *wp;
  FERRY_CHECK(w[kWq].tier == Tier::kDevice);
  if (m.kv_host[il]) {
    host_kv_layer(m, il, w, streamed, kv);  // traces its parts; ends its ring slot itself, possibly a layer later
    m.pending_delta = true;
    return;
  }
  cudaEvent_t span = m.dev->span_begin(m.stream);
  const ModelConfig& c = m.cfg;
  const int64_t T = m.T, E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const bool fixed = !streamed;  // resident weights: the GEMVs may start streaming them early
  const int32_t* pos = m.in_d + T;
  const int32_t* row = m.in_d + 2 * T;
  const bool fused = T <= kGemvFusedMaxRows && fused_decode() && E % 8 == 0 && Q % 8 == 0 && F % 8 == 0 && c.head_dim % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(w[kAttnNorm].data) % 16 == 0 && reinterpret_cast<uintptr_t>(w[kFfnNorm].data) % 16 == 0;
  if (fused) {
    // Decode: five kernels a layer (BF16). The QKV GEMV normalises the residual itself (or reads
    // hi + lo rows after a layer that did not leave its sums of squares) and applies RoPE and the
    // K/V append in its epilogue; the output projection and the down projection add into the
    // residual and leave its sums of squares; the gate/up GEMV normalises and applies SwiGLU.
    // Quantised weights take BF16 rows from RMSNorm kernels instead: reading the float residual and
    // the norm weight for every 32 codes cost more than the kernel (NF4 Llama-2-7B: 218 tok/s fused
    // that way, 271 with the layer unfused, H200).
    TraceRange r("gpu.fused_layer", il);
    const bool quant = is_quantized(w[kWDown].dtype);
    const int64_t n_ss = gemv_ss_parts(E, w[kWDown].dtype, T, F);  // (the down projection's; the o projection's is the same whenever it is read: BF16)
    GemvIn in;
    if (ss_ready && !quant) {
      in = GemvIn{nullptr, nullptr, m.x, w[kAttnNorm].as<bf16>(), m.ss, n_ss, eps};
    } else {
      // NF4 QKV on the tensor cores takes FP16 hi + lo rows (its code values FP16; kernels.h).
      const bool f16 = nf4_f16_path(w[kWqkv].dtype, T, E);
      add_rmsnorm(m.x, m.pending_delta ? m.tmp : nullptr, w[kAttnNorm].as<bf16>(), nullptr, T, E, eps, m.xn, m.stream, m.xn + T * E, f16);
      in = GemvIn{m.xn, m.xn + T * E};
      in.f16 = f16;
    }
    gemv_rope_kv(in, GemvW{w[kWqkv].data, w[kWqkv].dtype}, c.attention_bias ? w[kBq].as<bf16>() : nullptr, pos, row, m.inv_freq, c.n_heads, m.paged(il), m.q, T, E,
                 m.stream, fixed);
    attention(m.q, pos, row, m.tiles, T, c.n_heads, c.sliding_window, m.paged(il), m.n_splits, m.scratch, m.att, m.stream);
    gemv_residual(GemvIn{m.att}, GemvW{w[kWo].data, w[kWo].dtype}, m.x, m.ss, T, E, Q, m.stream, fixed);
    GemvIn ffn{nullptr, nullptr, m.x, w[kFfnNorm].as<bf16>(), m.ss, n_ss, eps};
    if (quant) {
      add_rmsnorm(m.x, nullptr, w[kFfnNorm].as<bf16>(), nullptr, T, E, eps, m.xn, m.stream);
      ffn = GemvIn{m.xn};
    }
    gemv_swiglu(ffn, GemvW{w[kWGateUp].data, w[kWGateUp].dtype}, m.hbuf, T, F, E, m.stream, fixed);
    gemv_residual(GemvIn{m.hbuf}, GemvW{w[kWDown].data, w[kWDown].dtype}, m.x, m.ss, T, E, F, m.stream, fixed);
    if (span) m.dev->span_end(span, m.stream, "gpu.compute", "layer " + std::to_string(il));
    if (streamed) m.ring->end();
    m.pending_delta = false;
    m.ss_ready = true;
    return;
  }
  {
    TraceRange r("gpu.attention_block", il);
    // The attention scores are the most sensitive to the rounding of this GEMM's input, so it runs
    // on hi and lo BF16 parts of the normed activations (notes/gpu.md): M = 2T, q, k, v adjacent.
    // At decode sizes the GEMV sums hi + lo itself: T rows of weight products, not 2T.
    add_rmsnorm(m.x, m.pending_delta ? m.tmp : nullptr, w[kAttnNorm].as<bf16>(), nullptr, T, E, eps, m.xn, m.stream, m.xn + T * E);
    const bool fused_lo = T <= kGemvPreferRows && E % 8 == 0;
    if (fused_lo) m.linear(m.xn, w[kWqkv], Q + 2 * KV, E, m.qkv, T, fixed, m.xn + T * E);
    else m.linear(m.xn, w[kWqkv], Q + 2 * KV, E, m.qkv, 2 * T, fixed, nullptr, true);
    rope_kv_append(m.qkv, fused_lo ? nullptr : m.qkv + T * (Q + 2 * KV), c.attention_bias ? w[kBq].as<bf16>() : nullptr, pos, row, m.inv_freq, T, c.n_heads,
                   m.paged(il), m.q, m.stream);
    attention(m.q, pos, row, m.tiles, T, c.n_heads, c.sliding_window, m.paged(il),
              m.n_splits, m.scratch, m.att, m.stream);
    m.linear(m.att, w[kWo], E, Q, m.tmp, T, fixed);
  }
  {
    TraceRange r("gpu.mlp_block", il);
    add_rmsnorm(m.x, m.tmp, w[kFfnNorm].as<bf16>(), nullptr, T, E, eps, m.xn, m.stream);
    m.linear(m.xn, w[kWGateUp], 2 * F, E, m.gu, T, fixed);
    swiglu(m.gu, T, F, m.hbuf, m.stream);
    m.linear(m.hbuf, w[kWDown], E, F, m.tmp, T, fixed);
  }
  if (span) m.dev->span_end(span, m.stream, "gpu.compute", "layer " + std::to_string(il));
  if (streamed) m.ring->end();  // the slot may be refilled once this layer's kernels are done
  m.pending_delta = true;
}

void GpuExecutor::head(const GlobalWeights& w, float* logits) {
  Impl& m = *impl_;
  const ModelConfig& c = m.cfg;
  if (m.mode != Impl::Mode::kReplay) finish_pending_posts(m);
  if (m.mode != Impl::Mode::kReplay && m.n_out > 0) {
    TraceRange r("gpu.head");
    cudaEvent_t span = m.dev->span_begin(m.stream);
    add_rmsnorm(m.x, m.pending_delta ? m.tmp : nullptr, w[kOutNorm].as<bf16>(), m.in_d + 3 * m.T, m.n_out, c.n_embd,
                static_cast<float>(c.rms_norm_eps), m.xn, m.stream);
    m.linear(m.xn, w[kLmHead], c.n_vocab, c.n_embd, m.logits, m.n_out, true);  // BF16, or --quant-head's format
    m.dev->span_end(span, m.stream, "gpu.compute", "head");
  }
  if (m.mode == Impl::Mode::kCapture) {
    cudaGraph_t g = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(m.stream, &g));
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
    CUDA_CHECK(cudaGraphDestroy(g));
    m.graphs[m.T] = exec;
    ++m.n_captured;
    m.mode = Impl::Mode::kReplay;
  }
  if (m.mode == Impl::Mode::kReplay) {
    TraceRange r("gpu.decode_graph");
    ++m.n_replays;
    CUDA_CHECK(cudaGraphLaunch(m.graphs.at(m.T), m.stream));
    CUDA_CHECK(cudaEventRecord(m.in_free, m.stream));
  }
  if (logits == nullptr) return;  // kept on the device for sample()
  if (m.n_out > 0) CUDA_CHECK(cudaMemcpyAsync(logits, m.logits, m.n_out * c.n_vocab * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
  CUDA_CHECK(cudaStreamSynchronize(m.stream));
  m.dev->resolve_spans();
}

Status GpuExecutor::end_step() {
  Impl& m = *impl_;
  if (m.n_kv_host > 0) {
    try {
      CUDA_CHECK(cudaStreamSynchronize(m.attn_stream));
    } catch (const CudaError& e) {
      return Status(ErrorCode::kInternal, e.what());
    }
    std::lock_guard<std::mutex> lock(m.attn_mu);
    if (!m.attn_error.empty()) return Status(ErrorCode::kInternal, m.attn_error);
  }
  if (!m.ring_has_disk) return Status::Ok();
  // Disk reads report their errors on the host: wait for this step's work, then ask.
  try {
    CUDA_CHECK(cudaStreamSynchronize(m.stream));
  } catch (const CudaError& e) {
    return Status(ErrorCode::kInternal, e.what());
  }
  return m.ring->status();
}

bool GpuExecutor::can_sample(const SamplingParams& p) const { return p.temperature == 0.0f || (p.top_k >= 1 && p.top_k <= kMaxTopK); }

Status GpuExecutor::sample(const SamplingParams& p, const std::vector<uint64_t>& seeds, uint64_t step, int32_t* out) {
  Impl& m = *impl_;
  if (!can_sample(p)) return unsupported("GPU sampling needs temperature 0 or top-k in [1, 256]");
  if (static_cast<int64_t>(seeds.size()) != m.n_out) return invalid_argument("sample: one seed per output row");
  TraceRange r("gpu.sample");
  try {
    if (p.temperature == 0.0f) {
      argmax_rows(m.logits, m.n_out, m.cfg.n_vocab, m.tokens_out, m.stream);
    } else {
      std::memcpy(m.seeds_h, seeds.data(), seeds.size() * 8);  // free: the last sample() synchronised
      copy_by_kernel(m.seeds_h, m.seeds_d, static_cast<int64_t>(seeds.size()) * 8, m.stream);
      topk_sample(m.logits, m.n_out, m.cfg.n_vocab, static_cast<int>(std::min<int64_t>(p.top_k, m.cfg.n_vocab)), p.temperature, p.top_p,
                  m.seeds_d, step, m.tokens_out, m.stream);
    }
    CUDA_CHECK(cudaMemcpyAsync(out, m.tokens_out, m.n_out * 4, cudaMemcpyDeviceToHost, m.stream));
    CUDA_CHECK(cudaStreamSynchronize(m.stream));
    m.dev->resolve_spans();
  } catch (const CudaError& e) {
    return Status(ErrorCode::kInternal, e.what());
  }
  for (int64_t r = 0; r < m.n_out; ++r)
    if (out[r] == kNonFiniteToken) return non_finite_logits_error(r);
  return Status::Ok();
}

}  // namespace ferry::gpu
