// HostBuffer: an owned, aligned (64 bytes by default, 4 KiB for O_DIRECT reads) block of host memory
// (the unit later replaced by pinned allocations for DMA). Move-only.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace ferry {

class HostBuffer {
 public:
  HostBuffer() = default;
  // Allocates `n_bytes` (uninitialised). Returns an empty buffer when the allocation fails; callers
  // check `data()` and report out-of-memory with a size.
  explicit HostBuffer(size_t n_bytes, size_t align = 64) : size_(n_bytes) {
    if (n_bytes == 0) return;
    const size_t rounded = (n_bytes + align - 1) / align * align;
    data_ = std::aligned_alloc(align, rounded);
    if (data_ == nullptr) size_ = 0;
  }
  ~HostBuffer() { std::free(data_); }
  HostBuffer(HostBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    if (this != &o) {
      std::free(data_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return size_; }
  // Asks the kernel for transparent huge pages over the buffer (allocate with kHugePage alignment;
  // call before first touch). Large scattered reads then miss the TLB once per 2 MiB instead of
  // once per 4 KiB. Returns false where the kernel refuses (THP off): the buffer still works.
  static constexpr size_t kHugePage = size_t{2} << 20;
  bool advise_huge_pages() {
#if defined(MADV_HUGEPAGE)
    return data_ != nullptr && madvise(data_, (size_ + kHugePage - 1) / kHugePage * kHugePage, MADV_HUGEPAGE) == 0;
#else
    return false;
#endif
  }
  void zero() {
    if (data_) std::memset(data_, 0, size_);
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace ferry
