#include "gpu/cuda_stream_device.h"

#include <algorithm>
#include <cstdlib>

#include "runtime/budget.h"
#include "runtime/trace.h"

namespace ferry::gpu {

CudaStreamDevice::CudaStreamDevice(cudaStream_t compute, int64_t cap_bytes, bool tracing) : cap_(cap_bytes), tracing_(tracing) {
  streams_.push_back(compute);
  if (const char* c = std::getenv("FERRY_COPY_CHUNK_MB"); c && *c) chunk_bytes_ = std::max<int64_t>(0, std::atoll(c)) << 20;
  if (tracing_) {
    CUDA_CHECK(cudaEventCreate(&base_event_));
    CUDA_CHECK(cudaEventRecord(base_event_, compute));
    CUDA_CHECK(cudaEventSynchronize(base_event_));
    base_ns_ = Tracer::get().now_ns();
  }
}

CudaStreamDevice::~CudaStreamDevice() {
  if (tracing_) {
    cudaDeviceSynchronize();
    try {
      resolve_spans();
    } catch (...) {
    }
  }
  for (auto& sp : spans_) {
    cudaEventDestroy(sp.a);
    cudaEventDestroy(sp.b);
  }
  for (cudaEvent_t e : event_pool_) cudaEventDestroy(e);
  if (base_event_) cudaEventDestroy(base_event_);
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  for (size_t i = 1; i < streams_.size(); ++i) cudaStreamDestroy(streams_[i]);
  for (auto& [p, n] : allocations_) cudaFree(p);
  for (auto& [a, p] : pinned_) cudaFreeHost(p);
}

Expected<void*> CudaStreamDevice::alloc(int64_t bytes, const std::string& what) {
  if (cap_ > 0 && held_ + bytes > cap_)
    return out_of_memory(strprintf("--gpu-mem: %s for %s would take ferry's GPU memory past its cap of %s (%s held)",
                                   format_bytes(static_cast<double>(bytes)).c_str(), what.c_str(), format_bytes(static_cast<double>(cap_)).c_str(),
                                   format_bytes(static_cast<double>(held_)).c_str()));
  void* p = nullptr;
  const size_t nb = static_cast<size_t>(std::max<int64_t>(bytes, 1));
  if (cudaMalloc(&p, nb) != cudaSuccess) {
    cudaGetLastError();
    return out_of_memory(strprintf("out of GPU memory: cannot allocate %s for %s (ferry holds %s)", format_bytes(static_cast<double>(nb)).c_str(),
                                   what.c_str(), format_bytes(static_cast<double>(held_)).c_str()));
  }
  allocations_[p] = static_cast<int64_t>(nb);
  held_ += static_cast<int64_t>(nb);
  peak_ = std::max(peak_, held_);
  return p;
}

void* CudaStreamDevice::alloc_or_throw(int64_t bytes, const std::string& what) {
  auto p = alloc(bytes, what);
  if (!p.ok()) throw CudaError(p.status().message());
  return *p;
}

void CudaStreamDevice::free(void* p) {
  if (p == nullptr) return;
  auto it = allocations_.find(p);
  if (it == allocations_.end()) return;
  held_ -= it->second;
  allocations_.erase(it);
  cudaFree(p);
}

Expected<void*> CudaStreamDevice::alloc_pinned(int64_t bytes, const std::string& what) {
  // cudaMallocHost sub-allocates small requests: over-allocate and align to 4 KiB for O_DIRECT.
  void* p = nullptr;
  if (cudaMallocHost(&p, static_cast<size_t>(std::max<int64_t>(bytes, 1)) + 4096) != cudaSuccess) {
    cudaGetLastError();
    return out_of_memory(strprintf("cannot allocate %s of pinned host memory for %s", format_bytes(static_cast<double>(bytes)).c_str(), what.c_str()));
  }
  void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(p) + 4095) & ~uintptr_t{4095});
  pinned_[aligned] = p;
  return aligned;
}

void CudaStreamDevice::free_pinned(void* p) {
  auto it = pinned_.find(p);
  if (it == pinned_.end()) return;
  cudaFreeHost(it->second);
  pinned_.erase(it);
}

StreamDevice::Stream CudaStreamDevice::new_stream() {
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  streams_.push_back(s);
  return static_cast<Stream>(streams_.size() - 1);
}

StreamDevice::Event CudaStreamDevice::new_event() {
  cudaEvent_t e;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  events_.push_back(e);
  return static_cast<Event>(events_.size() - 1);
}

void CudaStreamDevice::record(Event e, Stream s) { CUDA_CHECK(cudaEventRecord(events_.at(e), streams_.at(s))); }
void CudaStreamDevice::wait(Stream s, Event e) { CUDA_CHECK(cudaStreamWaitEvent(streams_.at(s), events_.at(e), 0)); }
void CudaStreamDevice::host_wait(Event e) { CUDA_CHECK(cudaEventSynchronize(events_.at(e))); }

void CudaStreamDevice::copy_h2d(void* dst, const void* src, int64_t bytes, Stream s, const std::string& label) {
  cudaStream_t st = streams_.at(s);
  cudaEvent_t a = span_begin(st);
  const int64_t piece = chunk_bytes_ > 0 ? chunk_bytes_ : bytes;
  for (int64_t off = 0; off < bytes; off += piece)
    CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, static_cast<size_t>(std::min(piece, bytes - off)),
                               cudaMemcpyHostToDevice, st));
  span_end(a, st, "gpu.copy", label, bytes);
}

namespace {
void CUDART_CB run_host_fn(void* p) {
  auto* fn = static_cast<std::function<void()>*>(p);
  (*fn)();
  delete fn;
}
}  // namespace

void CudaStreamDevice::host_fn(Stream s, std::function<void()> fn) {
  auto* heap = new std::function<void()>(std::move(fn));
  cudaError_t e = cudaLaunchHostFunc(streams_.at(s), run_host_fn, heap);
  if (e != cudaSuccess) {
    delete heap;
    throw_cuda(e, "cudaLaunchHostFunc", __FILE__, __LINE__);
  }
}

cudaEvent_t CudaStreamDevice::span_begin(cudaStream_t st) {
  if (!tracing_) return nullptr;
  cudaEvent_t a;
  if (!event_pool_.empty()) {
    a = event_pool_.back();
    event_pool_.pop_back();
  } else {
    CUDA_CHECK(cudaEventCreate(&a));
  }
  CUDA_CHECK(cudaEventRecord(a, st));
  return a;
}

void CudaStreamDevice::span_end(cudaEvent_t a, cudaStream_t st, const char* track, std::string name, int64_t bytes) {
  if (!tracing_ || a == nullptr) return;
  cudaEvent_t b = span_begin(st);
  spans_.push_back(Span{track, std::move(name), a, b, bytes});
}

void CudaStreamDevice::resolve_spans() {
  if (!tracing_) return;
  std::vector<Span> left;
  for (auto& sp : spans_) {
    if (cudaEventQuery(sp.b) != cudaSuccess) {
      cudaGetLastError();  // cudaErrorNotReady is not an error here
      left.push_back(sp);
      continue;
    }
    float ta = 0, tb = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ta, base_event_, sp.a));
    CUDA_CHECK(cudaEventElapsedTime(&tb, base_event_, sp.b));
    const int64_t a_ns = base_ns_ + static_cast<int64_t>(static_cast<double>(ta) * 1e6);
    Tracer::get().complete(sp.track, sp.name, a_ns, static_cast<int64_t>(static_cast<double>(tb - ta) * 1e6), sp.bytes);
    event_pool_.push_back(sp.a);
    event_pool_.push_back(sp.b);
  }
  spans_.swap(left);
}

}  // namespace ferry::gpu
