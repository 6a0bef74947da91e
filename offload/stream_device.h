// StreamDevice: what the offload engine needs from an accelerator, and nothing more: memory from a
// pool capped at --gpu-mem, pinned host memory, streams (in-order queues of work), events, host-to-
// device copies and host functions run in stream order. The staging ring (staging_ring.h) is written
// against it once; the CUDA backend implements it with cudaStream/cudaEvent (gpu/), and the emulated
// device (emulated_device.h) with a worker thread per stream, so CI runs the same streaming code
// without a GPU.
//
// Events have CUDA's semantics: wait(s, e) and host_wait(e) wait for the work before the most recent
// record(e, ...) issued at the time of the call (nothing, if e was never recorded).
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "runtime/status.h"

namespace ferry {

// Thrown by a StreamDevice operation that failed (a CUDA error, say); the executor turns it into a
// Status at its boundary.
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class StreamDevice {
 public:
  using Stream = int;
  using Event = int;
  static constexpr Stream kCompute = 0;  // the stream the executor computes on

  virtual ~StreamDevice() = default;
  virtual std::string_view name() const = 0;

  // Device memory from the capped pool; over the cap is an error naming `what` and the budget.
  virtual Expected<void*> alloc(int64_t bytes, const std::string& what) = 0;
  virtual void free(void* p) = 0;
  virtual int64_t held_bytes() const = 0;
  virtual int64_t peak_bytes() const = 0;
  // Page-locked host memory (4 KiB aligned, so O_DIRECT reads can land in it).
  virtual Expected<void*> alloc_pinned(int64_t bytes, const std::string& what) = 0;
  virtual void free_pinned(void* p) = 0;

  virtual Stream new_stream() = 0;
  virtual Event new_event() = 0;
  virtual void record(Event e, Stream s) = 0;
  virtual void wait(Stream s, Event e) = 0;
  virtual void host_wait(Event e) = 0;
  // Copies host -> device in stream order; `label` names the copy in the trace (with its bytes).
  virtual void copy_h2d(void* dst, const void* src, int64_t bytes, Stream s, const std::string& label) = 0;
  // Runs `fn` on a host thread in stream order (it must not call the device).
  virtual void host_fn(Stream s, std::function<void()> fn) = 0;
};

}  // namespace ferry
