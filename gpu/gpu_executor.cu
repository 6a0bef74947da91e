#include "gpu/gpu_executor.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <vector>

#include "gpu/kernels.h"
#include "models/synthetic.h"
#include "runtime/trace.h"

namespace ferry::gpu {

namespace {

int dtype_code(DType t) { return t == DType::kF32 ? 0 : t == DType::kF16 ? 1 : 2; }

}  // namespace

struct GpuExecutor::Impl {
  ModelConfig cfg;
  GpuOptions opts;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  int n_sms = 0;
  std::map<void*, size_t> allocations;  // pointer -> bytes
  int64_t bytes = 0;

  // KV pool, per layer [n_blocks, block_size, n_kv, head_dim] bf16.
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
  float* scratch = nullptr; // attention split partials
  int32_t* tokens_out = nullptr;  // [n_out] sampled tokens
  uint64_t* seeds_d = nullptr;    // [n_out]
  int64_t scratch_floats = 0;
  // Step inputs: pinned host staging and its device copy: tokens, pos, row [T each], out rows [n_out],
  // query tiles [2T] (first token, count), block tables [n_rows, max_blocks].
  int32_t* in_h = nullptr;
  int32_t* in_d = nullptr;
  int64_t in_cap = 0;
  // Recorded after the copy out of in_h is enqueued (or the graph holding it): the host waits on it
  // before writing in_h again, since a step that keeps its logits on the GPU does not synchronise.
  cudaEvent_t in_free = nullptr;

  // Streaming: layers >= n_resident live in pinned host memory (fused layout) and are copied on
  // copy_stream into a ring of n_slots device slots; copied[s] / freed[s] order each slot's reuse.
  int64_t n_resident = 0;
  int n_slots = 0;
  int64_t layer_elems = 0;           // bf16 elements of one layer
  std::vector<bf16*> host_layers;    // [n_layers], pinned; null for resident layers
  std::vector<bf16*> slots;          // [n_slots] device
  // A ring in use order: the u-th use of a streamed layer (layers n_resident.. in order, step after
  // step) is served from slot u % n_slots; copies for uses [use, use + n_slots) are in flight.
  int64_t use = 0, issued = 0;
  std::vector<LayerWeights> slot_views;
  std::vector<cudaEvent_t> copied, freed;
  cudaStream_t copy_stream = nullptr;
  int64_t streamed_bytes = 0;

  // Tracing (--trace): spans bracketed by CUDA events, converted to the tracer's clock through a
  // base event recorded when the executor was created.
  bool tracing = false;
  cudaEvent_t base_event = nullptr;
  int64_t base_ns = 0;
  struct Span {
    std::string track, name;
    cudaEvent_t a, b;
    int64_t bytes;
  };
  std::vector<Span> spans;
  std::vector<cudaEvent_t> event_pool;

  cudaEvent_t take_event() {
    if (!event_pool.empty()) {
      cudaEvent_t e = event_pool.back();
      event_pool.pop_back();
      return e;
    }
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
  cudaEvent_t span_begin(cudaStream_t st) {
    if (!tracing) return nullptr;
    cudaEvent_t a = take_event();
    CUDA_CHECK(cudaEventRecord(a, st));
    return a;
  }
  void span_end(cudaEvent_t a, cudaStream_t st, const char* track, std::string name, int64_t bytes = -1) {
    if (!tracing || a == nullptr) return;
    cudaEvent_t b = take_event();
    CUDA_CHECK(cudaEventRecord(b, st));
    spans.push_back(Span{track, std::move(name), a, b, bytes});
  }
  // Hands finished spans to the tracer.
  void resolve_spans() {
    if (!tracing) return;
    std::vector<Span> left;
    for (auto& sp : spans) {
      if (cudaEventQuery(sp.b) != cudaSuccess) {
        cudaGetLastError();  // cudaErrorNotReady is not an error here
        left.push_back(sp);
        continue;
      }
      float ta = 0, tb = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ta, base_event, sp.a));
      CUDA_CHECK(cudaEventElapsedTime(&tb, base_event, sp.b));
      const int64_t a_ns = base_ns + static_cast<int64_t>(static_cast<double>(ta) * 1e6);
      Tracer::get().complete(sp.track, sp.name, a_ns, static_cast<int64_t>(static_cast<double>(tb - ta) * 1e6), sp.bytes);
      event_pool.push_back(sp.a);
      event_pool.push_back(sp.b);
    }
    spans.swap(left);
  }

  // The current step.
  int64_t T = 0, n_out = 0, n_rows = 0, n_tiles = 0;  // n_tiles 0: one token per tile (decode)
  int n_splits = 1;
  bool pending_delta = false;
  enum class Mode { kEager, kCapture, kReplay } mode = Mode::kEager;
  std::map<int64_t, cudaGraphExec_t> graphs;  // decode graphs by batch size
  int64_t n_captured = 0, n_replays = 0;

  ~Impl() {
    if (tracing && stream) {
      cudaDeviceSynchronize();
      try {
        resolve_spans();
      } catch (...) {
      }
    }
    for (auto& sp : spans) {
      cudaEventDestroy(sp.a);
      cudaEventDestroy(sp.b);
    }
    for (cudaEvent_t e : event_pool) cudaEventDestroy(e);
    if (base_event) cudaEventDestroy(base_event);
    for (auto& [t, g] : graphs) cudaGraphExecDestroy(g);
    if (blas) cublasDestroy(blas);
    for (auto& [p, n] : allocations) cudaFree(p);
    if (in_h) cudaFreeHost(in_h);
    if (in_free) cudaEventDestroy(in_free);
    for (bf16* h : host_layers)
      if (h) cudaFreeHost(h);
    for (cudaEvent_t e : copied) cudaEventDestroy(e);
    for (cudaEvent_t e : freed) cudaEventDestroy(e);
    if (copy_stream) cudaStreamDestroy(copy_stream);
    if (stream) cudaStreamDestroy(stream);
  }

  template <typename T>
  T* alloc(int64_t n) {
    void* p = nullptr;
    const size_t nb = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    cudaError_t e = cudaMalloc(&p, nb);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw CudaError(strprintf("out of GPU memory: cannot allocate %.2f MiB (ferry holds %.2f GiB)", nb / 1048576.0, bytes / 1073741824.0));
    }
    allocations[p] = nb;
    bytes += static_cast<int64_t>(nb);
    return static_cast<T*>(p);
  }
  void release(void* p) {
    if (!p) return;
    auto it = allocations.find(p);
    if (it == allocations.end()) return;
    bytes -= static_cast<int64_t>(it->second);
    allocations.erase(it);
    cudaFree(p);
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

  // Views of one layer laid out at `p` (q/k/v and gate/up adjacent, so each is one GEMM).
  LayerWeights layout(bf16* p, Tier tier) const {
    const int64_t E = cfg.n_embd, Q = cfg.q_dim(), KV = cfg.kv_dim(), F = cfg.n_ff;
    auto view = [tier](bf16* q, std::initializer_list<int64_t> shape) { return TensorView::contiguous(q, DType::kBF16, shape, tier); };
    LayerWeights d;
    d.t[kAttnNorm] = view(p, {E});
    p += E;
    d.t[kWq] = view(p, {Q, E});
    d.t[kWk] = view(p + Q * E, {KV, E});
    d.t[kWv] = view(p + (Q + KV) * E, {KV, E});
    p += (Q + 2 * KV) * E;
    if (cfg.attention_bias) {
      d.t[kBq] = view(p, {Q});
      d.t[kBk] = view(p + Q, {KV});
      d.t[kBv] = view(p + Q + KV, {KV});
      p += Q + 2 * KV;
    }
    d.t[kWo] = view(p, {E, Q});
    p += E * Q;
    d.t[kFfnNorm] = view(p, {E});
    p += E;
    d.t[kWGate] = view(p, {F, E});
    d.t[kWUp] = view(p + F * E, {F, E});
    p += 2 * F * E;
    d.t[kWDown] = view(p, {E, F});
    return d;
  }

  // Issues the copies of uses [issued, upto): each into its ring slot once the use before it there
  // (n_slots earlier, already enqueued on the compute stream) has released it.
  void issue_until(int64_t upto) {
    const int64_t n_streamed = cfg.n_layers - n_resident;
    for (; issued < upto; ++issued) {
      const int s = static_cast<int>(issued % n_slots);
      const int64_t il = n_resident + issued % n_streamed;
      CUDA_CHECK(cudaStreamWaitEvent(copy_stream, freed[s], 0));
      cudaEvent_t t0 = span_begin(copy_stream);
      CUDA_CHECK(cudaMemcpyAsync(slots[s], host_layers[il], layer_elems * 2, cudaMemcpyHostToDevice, copy_stream));
      span_end(t0, copy_stream, "gpu.copy", "layer " + std::to_string(il) + " -> slot " + std::to_string(s), layer_elems * 2);
      CUDA_CHECK(cudaEventRecord(copied[s], copy_stream));
      streamed_bytes += layer_elems * 2;
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
    const int64_t need_in = 5 * t + o + rows * max_blocks;
    if (t > cap_tokens || o > cap_out) {
      for (auto& [k, g] : graphs) cudaGraphExecDestroy(g);
      graphs.clear();
      for (void* p : {(void*)x, (void*)xn, (void*)qkv, (void*)q, (void*)att, (void*)tmp, (void*)gu, (void*)hbuf, (void*)logits})
        release(p);
      cap_tokens = std::max(t, cap_tokens);
      cap_out = std::max(o, cap_out);
      const int64_t E = cfg.n_embd, Q = cfg.q_dim(), KV = cfg.kv_dim(), F = cfg.n_ff;
      x = alloc<float>(cap_tokens * E);
      xn = alloc<bf16>(2 * cap_tokens * E);
      qkv = alloc<float>(2 * cap_tokens * (Q + 2 * KV));
      q = alloc<bf16>(cap_tokens * Q);
      att = alloc<bf16>(cap_tokens * Q);
      tmp = alloc<float>(cap_tokens * E);
      gu = alloc<float>(cap_tokens * 2 * F);
      hbuf = alloc<bf16>(cap_tokens * F);
      logits = alloc<float>(cap_out * cfg.n_vocab);
      release(tokens_out);
      release(seeds_d);
      tokens_out = alloc<int32_t>(cap_out);
      seeds_d = alloc<uint64_t>(cap_out);
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
int64_t GpuExecutor::device_bytes() const { return impl_->bytes; }
int64_t GpuExecutor::graphs_captured() const { return impl_->n_captured; }
int64_t GpuExecutor::n_streamed_layers() const { return impl_->cfg.n_layers - impl_->n_resident; }
int64_t GpuExecutor::streamed_bytes() const { return impl_->streamed_bytes; }
int64_t GpuExecutor::graph_replays() const { return impl_->n_replays; }

Expected<std::unique_ptr<GpuExecutor>> GpuExecutor::create(WeightStore& ws, const KvCacheShape& kvs, const GpuOptions& opts) {
  const ModelConfig& cfg = ws.config();
  if (!attention_supports(cfg.head_dim, cfg.n_heads / cfg.n_kv_heads))
    return unsupported(strprintf("--device gpu: head_dim %lld with %lld query heads per KV head is not supported by the GPU attention kernel",
                                 (long long)cfg.head_dim, (long long)(cfg.n_heads / cfg.n_kv_heads)));
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    cudaGetLastError();
    return unsupported("--device gpu: no usable CUDA GPU");
  }
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.cfg = cfg;
  m.opts = opts;
  try {
    CUDA_CHECK(cudaSetDevice(opts.device));
    CUDA_CHECK(cudaDeviceGetAttribute(&m.n_sms, cudaDevAttrMultiProcessorCount, opts.device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&m.in_free, cudaEventDisableTiming));
    if (Tracer::get().enabled()) {
      m.tracing = true;
      m.opts.cuda_graphs = false;  // every step eager, so every step has spans
      CUDA_CHECK(cudaEventCreate(&m.base_event));
      CUDA_CHECK(cudaEventRecord(m.base_event, m.stream));
      CUDA_CHECK(cudaEventSynchronize(m.base_event));
      m.base_ns = Tracer::get().now_ns();
    }
    CUBLAS_CHECK(cublasCreate(&m.blas));
    CUBLAS_CHECK(cublasSetStream(m.blas, m.stream));
    // A fixed workspace lets cuBLAS run inside graph capture without allocating.
    const size_t ws_bytes = 32u << 20;
    CUBLAS_CHECK(cublasSetWorkspace(m.blas, m.alloc<uint8_t>(ws_bytes), ws_bytes));

    const int64_t E = cfg.n_embd, Q = cfg.q_dim(), KV = cfg.kv_dim(), F = cfg.n_ff, V = cfg.n_vocab;
    // Host bytes go through one device staging buffer when they need converting to BF16.
    int64_t stage_elems = 0;
    auto consider = [&](const TensorView& v) {
      if (!v.empty() && v.dtype != DType::kBF16) stage_elems = std::max(stage_elems, v.numel());
    };
    for (int64_t il = 0; il < cfg.n_layers; ++il)
      for (const auto& v : ws.layer(il).t) consider(v);
    for (const auto& v : ws.globals().t) consider(v);
    void* stage = stage_elems ? m.alloc<float>(stage_elems) : nullptr;

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
    auto view = [](bf16* p, std::initializer_list<int64_t> shape) { return TensorView::contiguous(p, DType::kBF16, shape, Tier::kDevice); };
    const int64_t L = cfg.n_layers;
    m.n_resident = opts.n_resident_layers < 0 ? L : std::min<int64_t>(L, opts.n_resident_layers);
    m.layer_elems = E + (Q + 2 * KV) * E + (cfg.attention_bias ? Q + 2 * KV : 0) + E * Q + E + 2 * F * E + E * F;
    m.host_layers.assign(L, nullptr);
    if (m.n_resident < L) {
      m.n_slots = std::max(2, opts.n_slots);
      CUDA_CHECK(cudaStreamCreateWithFlags(&m.copy_stream, cudaStreamNonBlocking));
      for (int sl = 0; sl < m.n_slots; ++sl) {
        m.slots.push_back(m.alloc<bf16>(m.layer_elems));
        m.slot_views.push_back(m.layout(m.slots.back(), Tier::kDevice));
        cudaEvent_t a, b;
        CUDA_CHECK(cudaEventCreateWithFlags(&a, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&b, cudaEventDisableTiming));
        m.copied.push_back(a);
        m.freed.push_back(b);
      }
    }
    // Resident layers: one allocation each. Streamed layers: built in slot 0 (uploaded, converted or
    // generated exactly as resident ones), then kept in pinned host memory.
    for (int64_t il = 0; il < L; ++il) {
      const LayerWeights& h = ws.layer(il);
      const bool resident = il < m.n_resident;
      bf16* base = resident ? m.alloc<bf16>(m.layer_elems) : m.slots[0];
      LayerWeights d = m.layout(base, Tier::kDevice);
      for (int t = 0; t < kLayerTensorCount; ++t)
        if (h.t[t].n_dims > 0) put(h.t[t], d.t[t].as<bf16>(), il, t);  // n_dims 0: the model has no such tensor
      if (resident) {
        ws.place_layer(il, d, Tier::kDevice);
        continue;
      }
      bf16* host = nullptr;
      if (cudaMallocHost(&host, m.layer_elems * 2) != cudaSuccess) {
        cudaGetLastError();
        throw CudaError(strprintf("cannot allocate %.2f MiB of pinned host memory for streamed layer %lld", m.layer_elems * 2 / 1048576.0,
                                  static_cast<long long>(il)));
      }
      m.host_layers[il] = host;
      CUDA_CHECK(cudaMemcpyAsync(host, base, m.layer_elems * 2, cudaMemcpyDeviceToHost, m.stream));
      CUDA_CHECK(cudaStreamSynchronize(m.stream));
      ws.place_layer(il, m.layout(host, Tier::kPinnedHost), Tier::kPinnedHost);
    }
    const GlobalWeights& gh = ws.globals();
    GlobalWeights gd;
    gd.t[kTokEmbd] = view(m.alloc<bf16>(V * E), {V, E});
    put(gh.t[kTokEmbd], gd.t[kTokEmbd].as<bf16>(), -1, kTokEmbd);
    gd.t[kOutNorm] = view(m.alloc<bf16>(E), {E});
    put(gh.t[kOutNorm], gd.t[kOutNorm].as<bf16>(), -1, kOutNorm);
    if (cfg.tie_word_embeddings) {
      gd.t[kLmHead] = gd.t[kTokEmbd];
    } else {
      gd.t[kLmHead] = view(m.alloc<bf16>(V * E), {V, E});
      put(gh.t[kLmHead], gd.t[kLmHead].as<bf16>(), -1, kLmHead);
    }
    ws.place_globals(gd);

    // KV pool and rotary frequencies.
    m.kv_shape = kvs;
    m.max_blocks = static_cast<int32_t>(std::min<int64_t>(kvs.n_blocks, (cfg.n_ctx_max + kvs.block_size - 1) / kvs.block_size));
    const int64_t pool = kvs.n_blocks * kvs.block_size * KV;
    for (int64_t il = 0; il < cfg.n_layers; ++il) {
      m.k_pool.push_back(m.alloc<bf16>(pool));
      m.v_pool.push_back(m.alloc<bf16>(pool));
    }
    const std::vector<float> inv = rope_inv_freq(cfg);
    m.inv_freq = m.alloc<float>(static_cast<int64_t>(inv.size()));
    CUDA_CHECK(cudaMemcpyAsync(m.inv_freq, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice, m.stream));
    CUDA_CHECK(cudaStreamSynchronize(m.stream));
    m.release(stage);
  } catch (const CudaError& e) {
    return out_of_memory(std::string("--device gpu: ") + e.what());
  }
  return std::unique_ptr<GpuExecutor>(new GpuExecutor(std::move(impl)));
}

Status GpuExecutor::begin_step(const StepBatch& b, const KvCache& kv) {
  Impl& m = *impl_;
  const int64_t T = b.n_tokens();
  if (T == 0) return invalid_argument("empty step: no tokens");
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
    m.n_tiles = 0;
    if (!decode) {
      const int qt = query_tile_tokens(m.cfg.n_heads, m.cfg.n_kv_heads);
      for (int64_t t = 0; t < T;) {
        int64_t e = t + 1;
        while (e < T && e - t < qt && b.seq_ids[e] == b.seq_ids[t]) ++e;
        tiles[2 * m.n_tiles] = static_cast<int32_t>(t);
        tiles[2 * m.n_tiles + 1] = static_cast<int32_t>(e - t);
        ++m.n_tiles;
        t = e;
      }
    }
    int32_t* tables = in + 5 * T + n_out;
    int32_t max_pos = 0;
    for (int32_t p : b.positions) max_pos = std::max(max_pos, p);
    for (int64_t r = 0; r < n_rows; ++r) {
      const auto& bt = kv.block_table(seqs[r]);
      if (static_cast<int64_t>(bt.size()) > m.max_blocks) return invalid_argument("sequence longer than the GPU block table");
      std::copy(bt.begin(), bt.end(), tables + r * m.max_blocks);
    }
    const int64_t in_n = 5 * T + n_out + m.n_rows * m.max_blocks;
    m.pending_delta = false;
    if (decode && m.opts.cuda_graphs && m.n_resident == m.cfg.n_layers) {
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
    CUDA_CHECK(cudaMemcpyAsync(m.in_d, m.in_h, in_n * 4, cudaMemcpyHostToDevice, m.stream));
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
  embedding(w[kTokEmbd].as<bf16>(), m.in_d, m.T, m.cfg.n_embd, m.x, m.stream);
}

void GpuExecutor::layer(int64_t il, const LayerWeights& wl, KvCache&) {
  Impl& m = *impl_;
  if (m.mode == Impl::Mode::kReplay) return;
  const LayerWeights* wp = &wl;
  int slot = -1;
  if (il >= m.n_resident) {
    // This layer's copy (issued one or more layers ago) and the next ones' (wrapping into the next
    // step), then the compute stream waits for this layer's bytes only.
    TraceRange r("gpu.stream_weights", il);
    const int64_t n_streamed = m.cfg.n_layers - m.n_resident;
    FERRY_CHECK(il == m.n_resident + m.use % n_streamed);  // streamed layers are used in order
    m.issue_until(m.use + m.n_slots);
    slot = static_cast<int>(m.use % m.n_slots);
    CUDA_CHECK(cudaStreamWaitEvent(m.stream, m.copied[slot], 0));
    wp = &m.slot_views[slot];
    ++m.use;
  }
  const LayerWeights& w = *wp;
  FERRY_CHECK(w[kWq].tier == Tier::kDevice);
  cudaEvent_t span = m.span_begin(m.stream);
  const ModelConfig& c = m.cfg;
  const int64_t T = m.T, E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int32_t* pos = m.in_d + T;
  const int32_t* row = m.in_d + 2 * T;
  {
    TraceRange r("gpu.attention_block", il);
    // The attention scores are the most sensitive to the rounding of this GEMM's input, so it runs
    // on hi and lo BF16 parts of the normed activations (notes/gpu.md): M = 2T, q, k, v adjacent.
    add_rmsnorm(m.x, m.pending_delta ? m.tmp : nullptr, w[kAttnNorm].as<bf16>(), nullptr, T, E, eps, m.xn, m.stream, m.xn + T * E);
    gemm_f32(m.blas, m.xn, w[kWq].as<bf16>(), m.qkv, 2 * T, Q + 2 * KV, E, m.stream);
    rope_kv_append(m.qkv, m.qkv + T * (Q + 2 * KV), c.attention_bias ? w[kBq].as<bf16>() : nullptr, pos, row, m.inv_freq, T, c.n_heads, m.paged(il), m.q, m.stream);
    attention(m.q, pos, row, m.n_tiles ? m.in_d + 3 * T + m.n_out : nullptr, m.n_tiles, T, c.n_heads, c.sliding_window, m.paged(il),
              m.n_splits, m.scratch, m.att, m.stream);
    gemm_f32(m.blas, m.att, w[kWo].as<bf16>(), m.tmp, T, E, Q, m.stream);
  }
  {
    TraceRange r("gpu.mlp_block", il);
    add_rmsnorm(m.x, m.tmp, w[kFfnNorm].as<bf16>(), nullptr, T, E, eps, m.xn, m.stream);
    gemm_f32(m.blas, m.xn, w[kWGate].as<bf16>(), m.gu, T, 2 * F, E, m.stream);  // gate and up are adjacent
    swiglu(m.gu, T, F, m.hbuf, m.stream);
    gemm_f32(m.blas, m.hbuf, w[kWDown].as<bf16>(), m.tmp, T, E, F, m.stream);
  }
  m.span_end(span, m.stream, "gpu.compute", "layer " + std::to_string(il));
  if (slot >= 0) CUDA_CHECK(cudaEventRecord(m.freed[slot], m.stream));  // the slot may be refilled
  m.pending_delta = true;
}

void GpuExecutor::head(const GlobalWeights& w, float* logits) {
  Impl& m = *impl_;
  const ModelConfig& c = m.cfg;
  if (m.mode != Impl::Mode::kReplay && m.n_out > 0) {
    TraceRange r("gpu.head");
    cudaEvent_t span = m.span_begin(m.stream);
    add_rmsnorm(m.x, m.pending_delta ? m.tmp : nullptr, w[kOutNorm].as<bf16>(), m.in_d + 3 * m.T, m.n_out, c.n_embd,
                static_cast<float>(c.rms_norm_eps), m.xn, m.stream);
    gemm_f32(m.blas, m.xn, w[kLmHead].as<bf16>(), m.logits, m.n_out, c.n_vocab, c.n_embd, m.stream);
    m.span_end(span, m.stream, "gpu.compute", "head");
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
  m.resolve_spans();
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
      CUDA_CHECK(cudaMemcpyAsync(m.seeds_d, seeds.data(), seeds.size() * 8, cudaMemcpyHostToDevice, m.stream));
      topk_sample(m.logits, m.n_out, m.cfg.n_vocab, static_cast<int>(std::min<int64_t>(p.top_k, m.cfg.n_vocab)), p.temperature, p.top_p,
                  m.seeds_d, step, m.tokens_out, m.stream);
    }
    CUDA_CHECK(cudaMemcpyAsync(out, m.tokens_out, m.n_out * 4, cudaMemcpyDeviceToHost, m.stream));
    CUDA_CHECK(cudaStreamSynchronize(m.stream));
    m.resolve_spans();
  } catch (const CudaError& e) {
    return Status(ErrorCode::kInternal, e.what());
  }
  return Status::Ok();
}

}  // namespace ferry::gpu
