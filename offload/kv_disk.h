// KvDiskFile: the disk tier of the K/V cache. Fixed-size records (one K/V block of every layer) in
// an anonymous file under the directory the user gives (O_TMPFILE: nothing is left behind when the
// process ends, however it ends), written and read with io_uring and O_DIRECT (buffered where the
// filesystem refuses O_DIRECT, as tmpfs does). Each record's xxh3 checksum is kept in memory when it
// is written and checked when it is read back: a record the disk changed or lost is an error naming
// the file and the record, never K/V silently wrong.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/status.h"

namespace ferry {

class KvDiskFile {
 public:
  ~KvDiskFile();
  // Makes room for `n_records` records of `record_bytes` (rounded up to 4 KiB) in directory `dir`;
  // the space is allocated now, so a full disk is an error here rather than mid-run.
  static Expected<std::unique_ptr<KvDiskFile>> create(const std::string& dir, int64_t record_bytes, int64_t n_records);

  // Writes `bufs[i]` (4 KiB aligned, record_bytes()) to record `records[i]`, all in flight at once.
  Status write(const std::vector<int64_t>& records, const std::vector<const void*>& bufs);
  // Reads them back into `bufs` and verifies each checksum.
  Status read(const std::vector<int64_t>& records, const std::vector<void*>& bufs);

  int64_t record_bytes() const { return record_bytes_; }
  int64_t n_records() const { return n_records_; }
  const std::string& where() const { return where_; }
  bool direct_io() const { return direct_; }
  int fd() const { return fd_; }  // tests corrupt records through it
  uint64_t bytes_written() const { return bytes_written_; }
  uint64_t bytes_read() const { return bytes_read_; }

 private:
  KvDiskFile() = default;
  Status submit(bool is_write, const std::vector<int64_t>& records, const std::vector<void*>& bufs);
  int fd_ = -1;
  bool direct_ = false;
  int64_t record_bytes_ = 0, n_records_ = 0;
  std::string where_;
  std::vector<uint64_t> sums_;
  std::vector<bool> written_;
  struct Ring;
  std::unique_ptr<Ring> ring_;
  uint64_t bytes_written_ = 0, bytes_read_ = 0;
};

}  // namespace ferry
