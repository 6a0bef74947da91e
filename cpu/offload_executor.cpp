#include "cpu/offload_executor.h"

#include <cstring>

#include "runtime/trace.h"

namespace ferry::cpu {

namespace {

int64_t round4k(int64_t n) { return (n + 4095) / 4096 * 4096; }

}  // namespace

int64_t stored_layer_bytes(const WeightStore& ws) {
  int64_t most = 0;
  for (int64_t il = 0; il < ws.config().n_layers; ++il)
    most = std::max<int64_t>(most, round4k(static_cast<int64_t>(layer_layout(ws.config(), il, ws.layer(il)).bytes)));
  return most;
}

int64_t stored_globals_bytes(const WeightStore& ws) {
  int64_t n = 0;
  const GlobalWeights& g = ws.globals();
  for (int t = 0; t < kGlobalTensorCount; ++t) {
    if (t == kLmHead && ws.config().tie_word_embeddings) continue;
    n += static_cast<int64_t>(g.t[t].nbytes());
  }
  return n;
}

Expected<std::unique_ptr<OffloadCpuExecutor>> OffloadCpuExecutor::create(WeightStore& ws, const GpuPlan& plan, int64_t budget_bytes,
                                                                         const RingOptions& ring_opts) {
  const ModelConfig& cfg = ws.config();
  const int64_t L = cfg.n_layers;
  if (static_cast<int64_t>(plan.place.size()) != L) return invalid_argument("offload: the plan does not match the model");
  std::unique_ptr<OffloadCpuExecutor> ex(new OffloadCpuExecutor(cfg));
  ex->dev_ = std::make_unique<EmulatedDevice>(budget_bytes);
  ex->plan_ = plan;
  EmulatedDevice& dev = *ex->dev_;
  const PackedManifest* store = ws.packed();
  std::unique_ptr<DiskReader> reader;
  if (store) {
    FERRY_ASSIGN_OR_RETURN(reader, DiskReader::open(*store, ring_opts.disk));
  }
  const int64_t block_bytes = stored_layer_bytes(ws);
  // Fills `dst` (block_bytes, 4 KiB aligned) with layer il's block: gathered from host views, or
  // read (checksummed) from the packed store.
  auto load = [&](int64_t il, const LayerLayout& lay, void* dst) -> Status {
    if (ws.layer(il).t[kWq].data != nullptr) {
      lay.gather(ws.layer(il), dst);
      return Status::Ok();
    }
    FERRY_CHECK(store != nullptr);
    FERRY_RETURN_IF_ERROR(reader->submit(0, il + 1, dst));
    return reader->wait(0);
  };
  std::vector<RingLayer> order;
  ex->views_.resize(L);
  // The store serves the placed views only once everything has succeeded: a failed create must not
  // leave it pointing into memory that is freed with the executor.
  std::vector<std::pair<LayerWeights, Tier>> placed(L);
  for (int64_t il = 0; il < L; ++il) {
    const LayerLayout lay = layer_layout(cfg, il, ws.layer(il));
    ex->layouts_.push_back(lay);
    const Place pl = plan.place[il];
    if (pl == Place::kResident) {
      FERRY_ASSIGN_OR_RETURN(void* d, dev.alloc(block_bytes, "layer " + std::to_string(il)));
      FERRY_RETURN_IF_ERROR(load(il, lay, d));
      ex->views_[il] = lay.views(d, Tier::kDevice);
      placed[il] = {ex->views_[il], Tier::kDevice};
    } else if (pl == Place::kCpu || plan.source[il] == Tier::kPinnedHost) {
      FERRY_ASSIGN_OR_RETURN(void* h, dev.alloc_pinned(block_bytes, "layer " + std::to_string(il)));
      ex->pinned_.push_back(h);
      FERRY_RETURN_IF_ERROR(load(il, lay, h));
      ex->views_[il] = lay.views(h, Tier::kPinnedHost);
      placed[il] = {ex->views_[il], Tier::kPinnedHost};
      if (pl == Place::kStreamed) order.push_back({il, h, -1});
    } else {
      if (store == nullptr) return invalid_argument(strprintf("offload: layer %lld is planned on disk but there is no --disk store", (long long)il));
      order.push_back({il, nullptr, il + 1});
      placed[il] = {lay.views(nullptr, Tier::kDisk), Tier::kDisk};
    }
  }
  // Globals on the device; the token embedding stays in host memory where the plan put it there.
  const GlobalWeights& g = ws.globals();
  for (int t = 0; t < kGlobalTensorCount; ++t) {
    if (t == kLmHead && cfg.tie_word_embeddings) continue;
    const TensorView& v = g.t[t];
    if (t == kTokEmbd && plan.embedding_on_host) {
      ex->globals_.t[t] = v;
      continue;
    }
    FERRY_ASSIGN_OR_RETURN(void* d, dev.alloc(static_cast<int64_t>(v.nbytes()), "globals"));
    std::memcpy(d, v.data, v.nbytes());
    ex->globals_.t[t] = v;
    ex->globals_.t[t].data = d;
    ex->globals_.t[t].tier = Tier::kDevice;
  }
  if (cfg.tie_word_embeddings) ex->globals_.t[kLmHead] = ex->globals_.t[kTokEmbd];
  if (!order.empty()) {
    FERRY_ASSIGN_OR_RETURN(ex->ring_, StagingRing::create(dev, std::move(order), block_bytes, store, ring_opts));
  }
  for (int64_t il = 0; il < L; ++il) ws.place_layer(il, placed[il].first, placed[il].second);
  return ex;
}

OffloadCpuExecutor::~OffloadCpuExecutor() {
  ring_.reset();
  for (void* p : pinned_) dev_->free_pinned(p);
}

Status OffloadCpuExecutor::begin_step(const StepBatch& batch, const KvCache& kv) { return cpu_.begin_step(batch, kv); }

void OffloadCpuExecutor::embed(const GlobalWeights&) { cpu_.embed(globals_); }

void OffloadCpuExecutor::layer(int64_t il, const LayerWeights&, KvCache& kv) {
  const bool streamed = plan_.place[il] == Place::kStreamed;
  // The compute stream (this thread) waits for a streamed layer's copy.
  const LayerWeights w = streamed ? layouts_[il].views(ring_->begin(il), Tier::kDevice) : views_[il];
  const int64_t t0 = Tracer::get().enabled() ? Tracer::get().now_ns() : 0;
  cpu_.layer(il, w, kv);
  if (Tracer::get().enabled()) Tracer::get().complete("cpu.compute", "layer " + std::to_string(il), t0, Tracer::get().now_ns() - t0);
  if (streamed) ring_->end();
}

void OffloadCpuExecutor::head(const GlobalWeights&, float* logits) { cpu_.head(globals_, logits); }

Status OffloadCpuExecutor::end_step() { return ring_ ? ring_->status() : Status::Ok(); }

}  // namespace ferry::cpu
