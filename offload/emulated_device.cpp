#include "offload/emulated_device.h"

#include <cstdlib>
#include <cstring>

#include "runtime/budget.h"
#include "runtime/trace.h"

namespace ferry {

struct EmulatedDevice::Worker {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  bool busy = false, stop = false;
  std::thread thread;

  Worker() {
    thread = std::thread([this] {
      std::unique_lock<std::mutex> lk(mu);
      for (;;) {
        cv.wait(lk, [&] { return stop || !queue.empty(); });
        if (queue.empty()) return;  // stop, drained
        std::function<void()> fn = std::move(queue.front());
        queue.pop_front();
        busy = true;
        lk.unlock();
        fn();
        lk.lock();
        busy = false;
        cv.notify_all();
      }
    });
  }
  ~Worker() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    cv.notify_all();
    thread.join();
  }
  void drain() {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return queue.empty() && !busy; });
  }
};

EmulatedDevice::EmulatedDevice(int64_t budget_bytes) : budget_(budget_bytes) { workers_.emplace_back(); }

EmulatedDevice::~EmulatedDevice() {
  synchronize();
  workers_.clear();
  for (auto& [p, n] : allocations_) std::free(p);
}

Expected<void*> EmulatedDevice::alloc(int64_t bytes, const std::string& what) {
  std::lock_guard<std::mutex> lk(mu_);
  if (budget_ > 0 && held_ + bytes > budget_)
    return out_of_memory(strprintf("--gpu-mem %s: the (emulated) device cannot hold %s more for %s (%s held)", format_bytes(budget_).c_str(),
                                   format_bytes(static_cast<double>(bytes)).c_str(), what.c_str(), format_bytes(held_).c_str()));
  void* p = std::aligned_alloc(4096, (static_cast<size_t>(std::max<int64_t>(bytes, 1)) + 4095) / 4096 * 4096);
  if (p == nullptr) return out_of_memory(strprintf("cannot allocate %s of host memory for %s", format_bytes(static_cast<double>(bytes)).c_str(), what.c_str()));
  allocations_[p] = bytes;
  held_ += bytes;
  peak_ = std::max(peak_, held_);
  return p;
}

void EmulatedDevice::free(void* p) {
  if (p == nullptr) return;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = allocations_.find(p);
  if (it == allocations_.end()) return;
  held_ -= it->second;
  allocations_.erase(it);
  std::free(p);
}

int64_t EmulatedDevice::held_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return held_;
}
int64_t EmulatedDevice::peak_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return peak_;
}

Expected<void*> EmulatedDevice::alloc_pinned(int64_t bytes, const std::string& what) {
  void* p = std::aligned_alloc(4096, (static_cast<size_t>(std::max<int64_t>(bytes, 1)) + 4095) / 4096 * 4096);
  if (p == nullptr) return out_of_memory(strprintf("cannot allocate %s of pinned host memory for %s", format_bytes(static_cast<double>(bytes)).c_str(), what.c_str()));
  return p;
}
void EmulatedDevice::free_pinned(void* p) { std::free(p); }

StreamDevice::Stream EmulatedDevice::new_stream() {
  workers_.push_back(std::make_unique<Worker>());
  return static_cast<Stream>(workers_.size() - 1);
}

StreamDevice::Event EmulatedDevice::new_event() {
  std::lock_guard<std::mutex> lk(mu_);
  issued_.push_back(0);
  done_.push_back(0);
  return static_cast<Event>(issued_.size() - 1);
}

void EmulatedDevice::enqueue(Stream s, std::function<void()> fn) {
  if (s == kCompute) {
    fn();
    return;
  }
  Worker& w = *workers_.at(s);
  {
    std::lock_guard<std::mutex> lk(w.mu);
    w.queue.push_back(std::move(fn));
  }
  w.cv.notify_all();
}

void EmulatedDevice::record(Event e, Stream s) {
  int64_t target;
  {
    std::lock_guard<std::mutex> lk(mu_);
    target = ++issued_.at(e);
  }
  enqueue(s, [this, e, target] {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_[e] = std::max(done_[e], target);
    }
    cv_.notify_all();
  });
}

void EmulatedDevice::wait_for(Event e, int64_t target) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_[e] >= target; });
}

void EmulatedDevice::wait(Stream s, Event e) {
  int64_t target;
  {
    std::lock_guard<std::mutex> lk(mu_);
    target = issued_.at(e);
  }
  enqueue(s, [this, e, target] { wait_for(e, target); });
}

void EmulatedDevice::host_wait(Event e) {
  int64_t target;
  {
    std::lock_guard<std::mutex> lk(mu_);
    target = issued_.at(e);
  }
  wait_for(e, target);
}

void EmulatedDevice::copy_h2d(void* dst, const void* src, int64_t bytes, Stream s, const std::string& label) {
  enqueue(s, [dst, src, bytes, label] {
    const int64_t t0 = Tracer::get().enabled() ? Tracer::get().now_ns() : 0;
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    if (Tracer::get().enabled()) Tracer::get().complete("emulated.copy", label, t0, Tracer::get().now_ns() - t0, bytes);
  });
}

void EmulatedDevice::host_fn(Stream s, std::function<void()> fn) { enqueue(s, std::move(fn)); }

void EmulatedDevice::synchronize() {
  for (auto& w : workers_)
    if (w) w->drain();
}

}  // namespace ferry
