// DiskReader: reads blocks of a packed store into 4 KiB-aligned host buffers with io_uring and
// O_DIRECT (several 1 MiB reads in flight per block), and checks each block's xxh3 checksum when it
// completes. A read is submitted (`submit`) and later collected (`wait`), so the next layer's read
// runs while the current layer computes. Short reads, I/O errors and checksum mismatches are errors
// that name the block and the offset.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "offload/packed_store.h"
#include "runtime/status.h"

namespace ferry {

struct DiskReaderOptions {
  unsigned queue_depth = 16;
  uint64_t chunk_bytes = 1u << 20;
  bool verify = true;
  // Test hooks: fail the read of block `fail_block` with `fail_errno`, or make it return short.
  int64_t fail_block = -1;
  int fail_errno = 0;
  bool fail_short = false;
};

class DiskReader {
 public:
  ~DiskReader();
  // Opens `m`'s weights.bin (O_DIRECT where the filesystem allows, buffered otherwise).
  static Expected<std::unique_ptr<DiskReader>> open(const PackedManifest& m, const DiskReaderOptions& opts = {});

  // Starts reading block `b` into `dst` (4 KiB aligned, at least padded_bytes). One block in flight
  // per ticket; at most 4 tickets.
  Status submit(int ticket, int64_t b, void* dst);
  // Waits for the ticket's block, then verifies its checksum.
  Status wait(int ticket);
  bool direct_io() const { return direct_; }
  // Bytes read and seconds spent waiting, for benchmarks.
  uint64_t bytes_read() const { return bytes_read_; }
  double verify_seconds() const { return verify_s_; }

 private:
  DiskReader() = default;
  struct Ticket;
  const PackedManifest* m_ = nullptr;
  DiskReaderOptions opts_;
  int fd_ = -1;
  bool direct_ = false;
  struct Ring;
  std::unique_ptr<Ring> ring_;
  std::unique_ptr<Ticket[]> tickets_;
  uint64_t bytes_read_ = 0;
  double verify_s_ = 0;
};

}  // namespace ferry
