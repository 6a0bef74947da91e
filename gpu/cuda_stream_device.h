// CudaStreamDevice: the StreamDevice of one CUDA GPU. Device memory comes from cudaMalloc counted
// against a cap (--gpu-mem less the CUDA runtime's own reserve): the executor's weights, KV, workspace
// and staging slots all come from it, so ferry's allocations can never pass the budget. Streams and
// events are CUDA's; host functions run through cudaLaunchHostFunc. With tracing on, copies and
// compute spans are bracketed by CUDA events and handed to the Tracer on the host clock.
// GPU-only header (CUDA types).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "gpu/common.cuh"
#include "offload/stream_device.h"

namespace ferry::gpu {

class CudaStreamDevice final : public StreamDevice {
 public:
  // `compute` becomes stream kCompute; `cap_bytes` <= 0: no cap.
  CudaStreamDevice(cudaStream_t compute, int64_t cap_bytes, bool tracing);
  ~CudaStreamDevice() override;

  std::string_view name() const override { return "cuda"; }
  Expected<void*> alloc(int64_t bytes, const std::string& what) override;
  void free(void* p) override;
  int64_t held_bytes() const override { return held_; }
  int64_t peak_bytes() const override { return peak_; }
  Expected<void*> alloc_pinned(int64_t bytes, const std::string& what) override;
  void free_pinned(void* p) override;

  Stream new_stream() override;
  Event new_event() override;
  void record(Event e, Stream s) override;
  void wait(Stream s, Event e) override;
  void host_wait(Event e) override;
  void copy_h2d(void* dst, const void* src, int64_t bytes, Stream s, const std::string& label) override;
  void host_fn(Stream s, std::function<void()> fn) override;

  cudaStream_t stream(Stream s) const { return streams_.at(s); }
  // Allocation that throws CudaError (for the executor's own buffers).
  void* alloc_or_throw(int64_t bytes, const std::string& what);

  // Tracing: a span on `track` from span_begin to span_end in `s`'s order.
  bool tracing() const { return tracing_; }
  cudaEvent_t span_begin(cudaStream_t s);
  void span_end(cudaEvent_t a, cudaStream_t s, const char* track, std::string name, int64_t bytes = -1);
  // Hands finished spans to the tracer.
  void resolve_spans();

 private:
  int64_t cap_ = 0, held_ = 0, peak_ = 0;
  // Layer copies go in pieces of this size, so the small copies of other streams (the attention's
  // q/k/v and outputs) are not queued behind a whole layer on the copy engine (FERRY_COPY_CHUNK_MB).
  int64_t chunk_bytes_ = int64_t{16} << 20;
  std::map<void*, int64_t> allocations_;
  std::map<void*, void*> pinned_;  // aligned -> what cudaMallocHost returned
  std::vector<cudaStream_t> streams_;  // [0]: the compute stream (not owned)
  std::vector<cudaEvent_t> events_;
  bool tracing_ = false;
  cudaEvent_t base_event_ = nullptr;
  int64_t base_ns_ = 0;
  struct Span {
    std::string track, name;
    cudaEvent_t a, b;
    int64_t bytes;
  };
  std::vector<Span> spans_;
  std::vector<cudaEvent_t> event_pool_;
};

}  // namespace ferry::gpu
