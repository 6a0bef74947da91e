// StagingRing: streams layers that do not stay on the device through a ring of device slots, with
// their copies on a copy stream running ahead of the compute (prefetch depth n_slots - 1), and, for
// layers in the disk tier, checksummed io_uring reads into pinned host slots on a disk stream ahead
// of the copies. Every hand-off is an event:
//
//   disk stream:  wait host_free[h] -> read layer into host slot h -> record read_done[h]
//   copy stream:  wait freed[s] (+ read_done[h]) -> copy into slot s -> record copied[s] (+ host_free[h])
//   compute:      wait copied[s] -> the layer's kernels -> record freed[s]
//
// The u-th use of a streamed layer (in the executor's layer order, step after step) is served from
// slot u % n_slots, so the ring wraps across steps without a collision. Written once against
// StreamDevice: the GPU and the emulated device run the same code.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "offload/disk_reader.h"
#include "offload/packed_store.h"
#include "offload/stream_device.h"

namespace ferry {

struct RingLayer {
  int64_t layer = 0;
  const void* host = nullptr;  // the layer's block in pinned host memory, or
  int64_t disk_block = -1;     // its block in the packed store
};

struct RingOptions {
  int n_slots = 3;       // device slots
  int n_host_slots = 2;  // pinned host slots for disk reads (at most 4)
  DiskReaderOptions disk;
};

class StagingRing {
 public:
  // `order`: the streamed layers, ascending (the order the executor uses them in every step);
  // `layer_bytes`: each layer's block (its LayerLayout). `store` is needed when a layer is on disk.
  static Expected<std::unique_ptr<StagingRing>> create(StreamDevice& dev, std::vector<RingLayer> order, int64_t layer_bytes,
                                                       const PackedManifest* store, const RingOptions& opts = {});
  ~StagingRing();  // waits for the copies and reads in flight

  // Makes the compute stream wait for layer `il`'s bytes (issuing the copies and reads of the next
  // uses first) and returns the device slot that holds it. `il` must be the next streamed layer.
  void* begin(int64_t il);
  // After the work that reads the slot is enqueued on the compute stream: the slot may be refilled.
  // Ends the oldest begun layer: begin() may run ahead of end() by up to n_slots() - 1 layers (the
  // GPU executor ends a host-K/V layer after the next layer's first part is issued).
  void end();
  // The first disk-read error so far (a read that failed left garbage in its slot: the step that
  // used it must fail). Reads complete in order, so after the step's compute has finished this
  // covers every layer the step used.
  Status status() const;

  // A device slot, for use before the first begin() (the GPU executor builds layers in slot 0).
  void* slot(int s) const { return slots_.at(s); }
  int64_t bytes_copied() const { return bytes_copied_; }
  int64_t n_layers() const { return static_cast<int64_t>(order_.size()); }
  int n_slots() const { return static_cast<int>(slots_.size()); }
  int64_t device_bytes() const { return static_cast<int64_t>(slots_.size()) * layer_bytes_; }

 private:
  StagingRing(StreamDevice& dev) : dev_(dev) {}
  void issue_until(int64_t upto);
  StreamDevice& dev_;
  std::vector<RingLayer> order_;
  int64_t layer_bytes_ = 0;
  const PackedManifest* store_ = nullptr;
  StreamDevice::Stream copy_stream_ = 0, disk_stream_ = 0;
  std::vector<void*> slots_;
  std::vector<StreamDevice::Event> copied_, freed_;
  std::vector<void*> host_slots_;
  std::vector<StreamDevice::Event> read_done_, host_free_;
  std::unique_ptr<DiskReader> reader_;
  int64_t begun_ = 0, ended_ = 0, issued_ = 0, disk_uses_ = 0;
  int64_t bytes_copied_ = 0;
  mutable std::mutex mu_;
  Status error_;
};

}  // namespace ferry
