// Trace: named ranges around layers and op classes. Today they become NVTX ranges when ferry is
// built with CUDA (Nsight Systems reads them) and nothing otherwise; the offload engine adds the
// Chrome/Perfetto JSON writer (`--trace FILE`) behind the same TraceRange.
#pragma once

#include <cstdint>

namespace ferry {

// Opens a range named `name` (with an optional index, e.g. the layer) until destruction.
class TraceRange {
 public:
  explicit TraceRange(const char* name, int64_t index = -1);
  ~TraceRange();
  TraceRange(const TraceRange&) = delete;
  TraceRange& operator=(const TraceRange&) = delete;
};

}  // namespace ferry
