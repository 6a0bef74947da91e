#include "offload/staging_ring.h"

#include "runtime/trace.h"

namespace ferry {

Expected<std::unique_ptr<StagingRing>> StagingRing::create(StreamDevice& dev, std::vector<RingLayer> order, int64_t layer_bytes,
                                                           const PackedManifest* store, const RingOptions& opts) {
  std::unique_ptr<StagingRing> r(new StagingRing(dev));
  if (order.empty()) return invalid_argument("staging ring: no streamed layers");
  r->order_ = std::move(order);
  r->layer_bytes_ = layer_bytes;
  r->store_ = store;
  bool any_disk = false;
  for (const RingLayer& l : r->order_) {
    if (l.host == nullptr && l.disk_block < 0) return invalid_argument(strprintf("staging ring: layer %lld has no source", (long long)l.layer));
    any_disk |= l.host == nullptr;
  }
  const int n_slots = std::max(2, opts.n_slots);
  for (int s = 0; s < n_slots; ++s) {
    FERRY_ASSIGN_OR_RETURN(void* p, dev.alloc(layer_bytes, "staging slot " + std::to_string(s)));
    r->slots_.push_back(p);
    r->copied_.push_back(dev.new_event());
    r->freed_.push_back(dev.new_event());
  }
  r->copy_stream_ = dev.new_stream();
  if (any_disk) {
    if (store == nullptr) return invalid_argument("staging ring: layers on disk but no packed store");
    FERRY_ASSIGN_OR_RETURN(r->reader_, DiskReader::open(*store, opts.disk));
    uint64_t largest = 0;
    for (const RingLayer& l : r->order_)
      if (l.host == nullptr) largest = std::max(largest, store->blocks.at(l.disk_block).padded_bytes);
    const int n_host = std::clamp(opts.n_host_slots, 1, 4);
    for (int h = 0; h < n_host; ++h) {
      FERRY_ASSIGN_OR_RETURN(void* p, dev.alloc_pinned(static_cast<int64_t>(largest), "disk read slot " + std::to_string(h)));
      r->host_slots_.push_back(p);
      r->read_done_.push_back(dev.new_event());
      r->host_free_.push_back(dev.new_event());
    }
    r->disk_stream_ = dev.new_stream();
  }
  return r;
}

StagingRing::~StagingRing() {
  // Nothing may still write into the slots when they are freed.
  try {
    for (StreamDevice::Stream s : {copy_stream_, disk_stream_}) {
      if (s == 0) continue;
      const StreamDevice::Event e = dev_.new_event();
      dev_.record(e, s);
      dev_.host_wait(e);
    }
  } catch (...) {
  }
  for (void* p : slots_) dev_.free(p);
  for (void* p : host_slots_) dev_.free_pinned(p);
}

void StagingRing::issue_until(int64_t upto) {
  const int64_t n = static_cast<int64_t>(order_.size());
  for (; issued_ < upto; ++issued_) {
    const int s = static_cast<int>(issued_ % static_cast<int64_t>(slots_.size()));
    const RingLayer& l = order_[issued_ % n];
    // The label only matters to the trace: no string work per copy otherwise.
    const std::string label = Tracer::get().enabled() ? "layer " + std::to_string(l.layer) + " -> slot " + std::to_string(s) : std::string();
    if (l.host != nullptr) {
      dev_.wait(copy_stream_, freed_[s]);
      dev_.copy_h2d(slots_[s], l.host, layer_bytes_, copy_stream_, label);
      dev_.record(copied_[s], copy_stream_);
    } else {
      const int h = static_cast<int>(disk_uses_++ % static_cast<int64_t>(host_slots_.size()));
      void* dst = host_slots_[h];
      const int64_t block = l.disk_block;
      dev_.wait(disk_stream_, host_free_[h]);
      dev_.host_fn(disk_stream_, [this, h, block, dst] {
        Status st = reader_->submit(h, block, dst);
        if (st.ok()) st = reader_->wait(h);
        if (!st.ok()) {
          std::lock_guard<std::mutex> lk(mu_);
          if (error_.ok()) error_ = st;
        }
      });
      dev_.record(read_done_[h], disk_stream_);
      dev_.wait(copy_stream_, freed_[s]);
      dev_.wait(copy_stream_, read_done_[h]);
      dev_.copy_h2d(slots_[s], dst, layer_bytes_, copy_stream_, label.empty() ? label : label + " (from disk)");
      dev_.record(copied_[s], copy_stream_);
      dev_.record(host_free_[h], copy_stream_);
    }
    bytes_copied_ += layer_bytes_;
  }
}

void* StagingRing::begin(int64_t il) {
  const int64_t n = static_cast<int64_t>(order_.size()), S = static_cast<int64_t>(slots_.size());
  FERRY_CHECK_MSG(order_[begun_ % n].layer == il, "streamed layers must be used in order");
  FERRY_CHECK_MSG(begun_ - ended_ < S, "staging ring: every slot is in use (end() the oldest first)");
  TraceRange r("stream_weights", il);
  issue_until(ended_ + S);
  const int s = static_cast<int>(begun_ % S);
  dev_.wait(StreamDevice::kCompute, copied_[s]);
  ++begun_;
  return slots_[s];
}

void StagingRing::end() {
  const int64_t S = static_cast<int64_t>(slots_.size());
  FERRY_CHECK_MSG(ended_ < begun_, "staging ring: end() without begin()");
  dev_.record(freed_[ended_ % S], StreamDevice::kCompute);
  ++ended_;
  issue_until(ended_ + S);  // the freed slot's next copy, now rather than at the next begin()
}

Status StagingRing::status() const {
  std::lock_guard<std::mutex> lk(mu_);
  return error_;
}

}  // namespace ferry
