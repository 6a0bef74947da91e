// EmulatedDevice: a StreamDevice in host memory, for the CPU backend under --gpu-mem and for CI.
// "Device" memory is host memory counted against the cap (an allocation over it fails like the GPU's
// would); the compute stream is the calling thread (work on it runs at once, waits on it block);
// every other stream is a worker thread running its queue in order, so copies really run on a copy
// thread and every hand-off really goes through an event.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "offload/stream_device.h"

namespace ferry {

class EmulatedDevice final : public StreamDevice {
 public:
  // `budget_bytes` <= 0: no cap.
  explicit EmulatedDevice(int64_t budget_bytes);
  ~EmulatedDevice() override;

  std::string_view name() const override { return "emulated"; }
  Expected<void*> alloc(int64_t bytes, const std::string& what) override;
  void free(void* p) override;
  int64_t held_bytes() const override;
  int64_t peak_bytes() const override;
  Expected<void*> alloc_pinned(int64_t bytes, const std::string& what) override;
  void free_pinned(void* p) override;

  Stream new_stream() override;
  Event new_event() override;
  void record(Event e, Stream s) override;
  void wait(Stream s, Event e) override;
  void host_wait(Event e) override;
  void copy_h2d(void* dst, const void* src, int64_t bytes, Stream s, const std::string& label) override;
  void host_fn(Stream s, std::function<void()> fn) override;
  // Waits until every stream's queue has drained.
  void synchronize();

 private:
  struct Worker;
  void enqueue(Stream s, std::function<void()> fn);
  void wait_for(Event e, int64_t target);
  int64_t budget_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<void*, int64_t> allocations_;
  int64_t held_ = 0, peak_ = 0;
  std::vector<int64_t> issued_, done_;  // per event: records issued, records executed
  std::vector<std::unique_ptr<Worker>> workers_;  // [0] unused (the compute stream)
};

}  // namespace ferry
