#include "runtime/trace.h"

#ifdef FERRY_HAVE_NVTX
#include <nvtx3/nvToolsExt.h>

#include <cstdio>
#endif

namespace ferry {

#ifdef FERRY_HAVE_NVTX
TraceRange::TraceRange(const char* name, int64_t index) {
  if (index < 0) {
    nvtxRangePushA(name);
  } else {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s %lld", name, static_cast<long long>(index));
    nvtxRangePushA(buf);
  }
}
TraceRange::~TraceRange() { nvtxRangePop(); }
#else
TraceRange::TraceRange(const char*, int64_t) {}
TraceRange::~TraceRange() {}
#endif

}  // namespace ferry
