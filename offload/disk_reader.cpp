#include "offload/disk_reader.h"

#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include <xxhash.h>

#include "runtime/trace.h"

namespace ferry {

namespace {
constexpr int kMaxTickets = 4;
}

// One request per ticket; an I/O thread feeds io_uring and verifies checksums, so reads and checks
// run while the caller computes.
struct DiskReader::Ticket {
  int64_t block = -1;
  uint8_t* dst = nullptr;
  bool busy = false, done = false;
  Status status;
};

struct DiskReader::Ring {
  io_uring ring{};
  bool ok = false;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<int> queue;  // tickets to read
  bool stop = false;
  std::thread worker;
  ~Ring() {
    {
      std::lock_guard<std::mutex> l(mu);
      stop = true;
    }
    cv.notify_all();
    if (worker.joinable()) worker.join();
    if (ok) io_uring_queue_exit(&ring);
  }
};

DiskReader::~DiskReader() {
  ring_.reset();  // joins the I/O thread before the descriptor closes
  if (fd_ >= 0) ::close(fd_);
}

Expected<std::unique_ptr<DiskReader>> DiskReader::open(const PackedManifest& m, const DiskReaderOptions& opts) {
  std::unique_ptr<DiskReader> r(new DiskReader());
  r->m_ = &m;
  r->opts_ = opts;
  const std::string path = m.weights_path();
  r->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  r->direct_ = r->fd_ >= 0;
  if (r->fd_ < 0 && errno == EINVAL) r->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);  // no O_DIRECT here (tmpfs)
  if (r->fd_ < 0) return io_error(strprintf("%s: cannot open: %s", path.c_str(), std::strerror(errno)));
  r->ring_ = std::make_unique<Ring>();
  if (int e = io_uring_queue_init(opts.queue_depth, &r->ring_->ring, 0); e < 0)
    return io_error(strprintf("io_uring_queue_init: %s", std::strerror(-e)));
  r->ring_->ok = true;
  r->tickets_ = std::make_unique<Ticket[]>(kMaxTickets);
  DiskReader* self = r.get();
  Ring* ring = r->ring_.get();  // captured directly: self->ring_ is already null while ~DiskReader joins
  r->ring_->worker = std::thread([self, ring] {
    Ring& g = *ring;
    while (true) {
      int t;
      {
        std::unique_lock<std::mutex> l(g.mu);
        g.cv.wait(l, [&] { return g.stop || !g.queue.empty(); });
        if (g.stop) return;
        t = g.queue.front();
        g.queue.pop_front();
      }
      Ticket& tk = self->tickets_[t];
      Status st = Status::Ok();
      const int64_t span_start = Tracer::get().enabled() ? Tracer::get().now_ns() : 0;
      const PackedBlock& b = self->m_->blocks[tk.block];
      const std::string where = strprintf("%s: block '%s'", self->m_->weights_path().c_str(), b.name.c_str());
      // Keep up to queue_depth chunk reads in flight until the block is in.
      const uint64_t chunk = self->opts_.chunk_bytes;
      const uint64_t n_chunks = (b.padded_bytes + chunk - 1) / chunk;
      uint64_t next = 0, done = 0, in_flight = 0;
      while (done < n_chunks && st.ok()) {
        while (next < n_chunks && in_flight < self->opts_.queue_depth) {
          io_uring_sqe* sqe = io_uring_get_sqe(&g.ring);
          if (sqe == nullptr) break;
          const uint64_t off = next * chunk, len = std::min(chunk, b.padded_bytes - off);
          io_uring_prep_read(sqe, self->fd_, tk.dst + off, static_cast<unsigned>(len), b.offset + off);
          io_uring_sqe_set_data64(sqe, (next << 32) | len);
          ++next;
          ++in_flight;
        }
        io_uring_submit(&g.ring);
        io_uring_cqe* cqe = nullptr;
        if (int e = io_uring_wait_cqe(&g.ring, &cqe); e < 0) {
          st = io_error(strprintf("%s: io_uring wait failed: %s", where.c_str(), std::strerror(-e)));
          break;
        }
        const uint64_t data = io_uring_cqe_get_data64(cqe);
        const uint64_t idx = data >> 32, len = data & 0xffffffffu;
        int res = cqe->res;
        io_uring_cqe_seen(&g.ring, cqe);
        --in_flight;
        ++done;
        if (tk.block == self->opts_.fail_block && idx == 0) {  // test hooks
          if (self->opts_.fail_errno) res = -self->opts_.fail_errno;
          else if (self->opts_.fail_short) res = static_cast<int>(len / 2);
        }
        const uint64_t at = b.offset + idx * chunk;
        if (res < 0) st = io_error(strprintf("%s: read error at offset %llu: %s", where.c_str(), (unsigned long long)at, std::strerror(-res)));
        else if (static_cast<uint64_t>(res) < len)
          st = io_error(strprintf("%s: short read at offset %llu: %d of %llu bytes (truncated store?)", where.c_str(), (unsigned long long)at, res,
                                  (unsigned long long)len));
      }
      // Drain what is still in flight before the buffer is handed back.
      while (in_flight > 0) {
        io_uring_cqe* cqe = nullptr;
        if (io_uring_wait_cqe(&g.ring, &cqe) < 0) break;
        io_uring_cqe_seen(&g.ring, cqe);
        --in_flight;
      }
      if (st.ok()) self->bytes_read_ += b.padded_bytes;
      if (st.ok() && self->opts_.verify) {
        auto t0 = std::chrono::steady_clock::now();
        const uint64_t h = XXH3_64bits(tk.dst, b.bytes);
        self->verify_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (h != b.xxh3)
          st = corrupt(strprintf("%s at offset %llu: checksum mismatch (manifest %016llx, read %016llx)", where.c_str(),
                                 (unsigned long long)b.offset, (unsigned long long)b.xxh3, (unsigned long long)h));
      }
      if (Tracer::get().enabled())
        Tracer::get().complete("disk", "read " + b.name, span_start, Tracer::get().now_ns() - span_start, static_cast<int64_t>(b.padded_bytes));
      {
        std::lock_guard<std::mutex> l(g.mu);
        tk.status = st;
        tk.done = true;
      }
      g.cv.notify_all();
    }
  });
  return r;
}

Status DiskReader::submit(int ticket, int64_t b, void* dst) {
  FERRY_CHECK(ticket >= 0 && ticket < kMaxTickets);
  FERRY_CHECK(b >= 0 && b < static_cast<int64_t>(m_->blocks.size()));
  FERRY_CHECK(reinterpret_cast<uintptr_t>(dst) % kPackAlign == 0);
  std::lock_guard<std::mutex> l(ring_->mu);
  Ticket& t = tickets_[ticket];
  FERRY_CHECK(!t.busy);
  t = Ticket{b, static_cast<uint8_t*>(dst), true, false, Status::Ok()};
  ring_->queue.push_back(ticket);
  ring_->cv.notify_all();
  return Status::Ok();
}

Status DiskReader::wait(int ticket) {
  std::unique_lock<std::mutex> l(ring_->mu);
  Ticket& t = tickets_[ticket];
  FERRY_CHECK(t.busy);
  ring_->cv.wait(l, [&] { return t.done; });
  t.busy = false;
  return t.status;
}

}  // namespace ferry
