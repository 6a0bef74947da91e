// Tracing: named ranges around layers and op classes, for two readers.
// - NVTX ranges when ferry is built with CUDA (Nsight Systems reads them).
// - With `--trace FILE.json`, a Chrome trace (Perfetto opens it): one track per stream of work
//   ("cpu", "gpu.compute", "gpu.copy", "disk"), copies and reads carrying their bytes. GPU spans come
//   from CUDA events converted to the host clock by the GPU executor.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/status.h"

namespace ferry {

class Tracer {
 public:
  // Returns the process's tracer (disabled until enable()).
  static Tracer& get();
  void enable();
  void disable() { enabled_ = false; }
  // Drops the recorded spans (between benchmark runs).
  void reset();
  bool enabled() const { return enabled_; }
  // Returns nanoseconds on the steady clock since the tracer was created.
  int64_t now_ns() const;
  // Records a finished span on `track`; bytes < 0: none.
  void complete(const std::string& track, const std::string& name, int64_t start_ns, int64_t dur_ns, int64_t bytes = -1);
  // Returns the fraction of the time spent on `copy_track` spans that overlaps spans of
  // `compute_track` (1: every copy hidden under compute), and the two busy times in ms.
  struct Overlap {
    double hidden_fraction = 0;
    double copy_ms = 0;
    double compute_ms = 0;
  };
  Overlap overlap(const std::string& copy_track, const std::string& compute_track) const;
  // The same against the union of several compute tracks (GPU and CPU compute).
  Overlap overlap(const std::string& copy_track, const std::vector<std::string>& compute_tracks) const;
  // Writes the Chrome trace JSON atomically.
  Status write(const std::string& path) const;
  size_t size() const;

 private:
  Tracer();
  struct Event {
    std::string track, name;
    int64_t start_ns, dur_ns, bytes;
  };
  bool enabled_ = false;
  int64_t origin_ns_ = 0;
  mutable std::mutex mu_;
  std::vector<Event> events_;
};

// Opens a range named `name` (with an optional index, e.g. the layer) until destruction: an NVTX
// range, and a span on the "cpu" track when tracing.
class TraceRange {
 public:
  explicit TraceRange(const char* name, int64_t index = -1);
  ~TraceRange();
  TraceRange(const TraceRange&) = delete;
  TraceRange& operator=(const TraceRange&) = delete;

 private:
  const char* name_;
  int64_t index_;
  int64_t start_ns_ = -1;
};

}  // namespace ferry
