#include "offload/kv_disk.h"

#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <xxhash.h>

#include "runtime/trace.h"

namespace ferry {

namespace {
constexpr unsigned kQueueDepth = 32;
constexpr int64_t kAlign = 4096;
}  // namespace

struct KvDiskFile::Ring {
  io_uring ring{};
  bool ok = false;
  ~Ring() {
    if (ok) io_uring_queue_exit(&ring);
  }
};

KvDiskFile::~KvDiskFile() {
  ring_.reset();
  if (fd_ >= 0) ::close(fd_);
}

Expected<std::unique_ptr<KvDiskFile>> KvDiskFile::create(const std::string& dir, int64_t record_bytes, int64_t n_records) {
  if (record_bytes <= 0 || n_records <= 0) return invalid_argument("--kv-disk: empty spill file");
  std::unique_ptr<KvDiskFile> f(new KvDiskFile());
  f->where_ = dir + " (ferry's K/V spill file)";
  f->record_bytes_ = (record_bytes + kAlign - 1) / kAlign * kAlign;
  f->n_records_ = n_records;
  f->fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC | O_DIRECT, 0600);
  f->direct_ = f->fd_ >= 0;
  if (f->fd_ < 0 && errno == EINVAL) f->fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);  // no O_DIRECT here
  if (f->fd_ < 0 && (errno == EOPNOTSUPP || errno == EISDIR)) {
    // No O_TMPFILE on this filesystem: a named file, unlinked at once (gone as soon as it closes).
    std::string name = dir + "/.ferry-kv-XXXXXX";
    f->fd_ = ::mkostemp(name.data(), O_CLOEXEC);
    if (f->fd_ >= 0) {
      ::unlink(name.c_str());
      const int flags = ::fcntl(f->fd_, F_GETFL);
      f->direct_ = flags >= 0 && ::fcntl(f->fd_, F_SETFL, flags | O_DIRECT) == 0;
    }
  }
  if (f->fd_ < 0) {
    const int e = errno;
    if (e == ENOENT || e == ENOTDIR) return Status(ErrorCode::kNotFound, strprintf("--kv-disk %s: no such directory", dir.c_str()));
    return io_error(strprintf("--kv-disk %s: cannot create a file there: %s", dir.c_str(), std::strerror(e)));
  }
  const int64_t total = f->record_bytes_ * n_records;
  if (int e = ::posix_fallocate(f->fd_, 0, total); e != 0)
    return io_error(strprintf("--kv-disk %s: cannot reserve %.2f GiB: %s", dir.c_str(), static_cast<double>(total) / (1 << 30), std::strerror(e)));
  f->sums_.assign(n_records, 0);
  f->written_.assign(n_records, false);
  f->ring_ = std::make_unique<Ring>();
  if (int e = io_uring_queue_init(kQueueDepth, &f->ring_->ring, 0); e < 0)
    return io_error(strprintf("--kv-disk: io_uring_queue_init: %s", std::strerror(-e)));
  f->ring_->ok = true;
  return f;
}

Status KvDiskFile::submit(bool is_write, const std::vector<int64_t>& records, const std::vector<void*>& bufs) {
  const char* what = is_write ? "write" : "read";
  for (int64_t r : records)
    if (r < 0 || r >= n_records_) return Status(ErrorCode::kInternal, strprintf("%s: record %lld out of range", where_.c_str(), (long long)r));
  // Each request is one record; what a completion leaves short is resubmitted for the rest.
  std::vector<int64_t> done(records.size(), 0);
  size_t next = 0, in_flight = 0;
  Status st = Status::Ok();
  io_uring& ring = ring_->ring;
  auto queue = [&](size_t i) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    char* p = static_cast<char*>(bufs[i]) + done[i];
    const unsigned len = static_cast<unsigned>(record_bytes_ - done[i]);
    const uint64_t off = static_cast<uint64_t>(records[i] * record_bytes_ + done[i]);
    if (is_write) io_uring_prep_write(sqe, fd_, p, len, off);
    else io_uring_prep_read(sqe, fd_, p, len, off);
    io_uring_sqe_set_data64(sqe, i);
    ++in_flight;
  };
  while (next < records.size() || in_flight > 0) {
    while (next < records.size() && in_flight < kQueueDepth) queue(next++);
    io_uring_submit(&ring);
    io_uring_cqe* cqe = nullptr;
    if (int e = io_uring_wait_cqe(&ring, &cqe); e < 0) return io_error(strprintf("%s: io_uring wait: %s", where_.c_str(), std::strerror(-e)));
    const size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
    const int res = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
    --in_flight;
    if (res <= 0) {
      if (st.ok())
        st = io_error(strprintf("%s: %s of record %lld failed: %s", where_.c_str(), what, (long long)records[i],
                                res == 0 ? "end of file" : std::strerror(-res)));
      continue;
    }
    done[i] += res;
    if (done[i] < record_bytes_ && st.ok() && in_flight < kQueueDepth) queue(i);
  }
  return st;
}

Status KvDiskFile::write(const std::vector<int64_t>& records, const std::vector<const void*>& bufs) {
  TraceRange tr("kv.spill", static_cast<int64_t>(records.size()));
  for (size_t i = 0; i < records.size(); ++i) {
    sums_.at(records[i]) = XXH3_64bits(bufs[i], record_bytes_);
    written_.at(records[i]) = true;
  }
  std::vector<void*> b(bufs.size());
  for (size_t i = 0; i < bufs.size(); ++i) b[i] = const_cast<void*>(bufs[i]);
  FERRY_RETURN_IF_ERROR(submit(true, records, b));
  bytes_written_ += static_cast<uint64_t>(records.size() * record_bytes_);
  return Status::Ok();
}

Status KvDiskFile::read(const std::vector<int64_t>& records, const std::vector<void*>& bufs) {
  TraceRange tr("kv.restore", static_cast<int64_t>(records.size()));
  for (int64_t r : records)
    if (r < 0 || r >= n_records_ || !written_[r])
      return Status(ErrorCode::kInternal, strprintf("%s: record %lld was never written", where_.c_str(), (long long)r));
  FERRY_RETURN_IF_ERROR(submit(false, records, bufs));
  bytes_read_ += static_cast<uint64_t>(records.size() * record_bytes_);
  for (size_t i = 0; i < records.size(); ++i)
    if (XXH3_64bits(bufs[i], record_bytes_) != sums_[records[i]])
      return Status(ErrorCode::kCorrupt, strprintf("%s: record %lld (offset %lld) fails its checksum: the K/V read back are not those written",
                                                   where_.c_str(), (long long)records[i], (long long)(records[i] * record_bytes_)));
  return Status::Ok();
}

}  // namespace ferry
