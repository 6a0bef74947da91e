#include "runtime/trace.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>

#include <nlohmann/json.hpp>

#include "models/safetensors.h"

#ifdef FERRY_HAVE_NVTX
#include <nvtx3/nvToolsExt.h>
#endif

namespace ferry {

namespace {
int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Tracer::Tracer() : origin_ns_(steady_ns()) {}

Tracer& Tracer::get() {
  static Tracer t;
  return t;
}

void Tracer::enable() { enabled_ = true; }

int64_t Tracer::now_ns() const { return steady_ns() - origin_ns_; }

void Tracer::complete(const std::string& track, const std::string& name, int64_t start_ns, int64_t dur_ns, int64_t bytes) {
  if (!enabled_) return;
  std::lock_guard<std::mutex> l(mu_);
  events_.push_back(Event{track, name, start_ns, std::max<int64_t>(dur_ns, 0), bytes});
}

size_t Tracer::size() const {
  std::lock_guard<std::mutex> l(mu_);
  return events_.size();
}

Tracer::Overlap Tracer::overlap(const std::string& copy_track, const std::string& compute_track) const {
  return overlap(copy_track, std::vector<std::string>{compute_track});
}

Tracer::Overlap Tracer::overlap(const std::string& copy_track, const std::vector<std::string>& compute_tracks) const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::pair<int64_t, int64_t>> compute, copies;
  for (const auto& e : events_) {
    if (std::find(compute_tracks.begin(), compute_tracks.end(), e.track) != compute_tracks.end()) compute.emplace_back(e.start_ns, e.start_ns + e.dur_ns);
    if (e.track == copy_track) copies.emplace_back(e.start_ns, e.start_ns + e.dur_ns);
  }
  // Union of the compute spans, then the part of each copy inside it.
  std::sort(compute.begin(), compute.end());
  std::vector<std::pair<int64_t, int64_t>> merged;
  for (auto [a, b] : compute) {
    if (!merged.empty() && a <= merged.back().second) merged.back().second = std::max(merged.back().second, b);
    else merged.emplace_back(a, b);
  }
  Overlap o;
  double copy_ns = 0, hidden_ns = 0, compute_ns = 0;
  for (auto [a, b] : merged) compute_ns += static_cast<double>(b - a);
  for (auto [a, b] : copies) {
    copy_ns += static_cast<double>(b - a);
    auto it = std::upper_bound(merged.begin(), merged.end(), std::make_pair(a, INT64_MAX));
    if (it != merged.begin()) --it;
    for (; it != merged.end() && it->first < b; ++it) hidden_ns += static_cast<double>(std::max<int64_t>(0, std::min(b, it->second) - std::max(a, it->first)));
  }
  o.copy_ms = copy_ns / 1e6;
  o.compute_ms = compute_ns / 1e6;
  o.hidden_fraction = copy_ns > 0 ? hidden_ns / copy_ns : 0;
  return o;
}

void Tracer::reset() {
  std::lock_guard<std::mutex> l(mu_);
  events_.clear();
}

Status Tracer::write(const std::string& path) const {
  using json = nlohmann::json;
  std::lock_guard<std::mutex> l(mu_);
  json ev = json::array();
  std::map<std::string, int> tids;
  for (const char* t : {"cpu", "cpu.compute", "gpu.compute", "gpu.copy", "disk"}) tids.emplace(t, static_cast<int>(tids.size()) + 1);
  for (const auto& e : events_)
    if (!tids.count(e.track)) tids.emplace(e.track, static_cast<int>(tids.size()) + 1);
  for (const auto& [name, tid] : tids) {
    ev.push_back({{"ph", "M"}, {"pid", 1}, {"tid", tid}, {"name", "thread_name"}, {"args", {{"name", name}}}});
    ev.push_back({{"ph", "M"}, {"pid", 1}, {"tid", tid}, {"name", "thread_sort_index"}, {"args", {{"sort_index", tid}}}});
  }
  for (const auto& e : events_) {
    json j = {{"ph", "X"}, {"pid", 1}, {"tid", tids[e.track]}, {"name", e.name}, {"ts", e.start_ns / 1e3}, {"dur", e.dur_ns / 1e3}};
    if (e.bytes >= 0) j["args"] = {{"bytes", e.bytes}};
    ev.push_back(std::move(j));
  }
  const std::string text = json{{"traceEvents", ev}, {"displayTimeUnit", "ms"}}.dump();
  return write_file_atomic(path, text.data(), text.size()).with_context("--trace");
}

TraceRange::TraceRange(const char* name, int64_t index) : name_(name), index_(index) {
#ifdef FERRY_HAVE_NVTX
  if (index < 0) {
    nvtxRangePushA(name);
  } else {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s %lld", name, static_cast<long long>(index));
    nvtxRangePushA(buf);
  }
#endif
  if (Tracer::get().enabled()) start_ns_ = Tracer::get().now_ns();
}

TraceRange::~TraceRange() {
#ifdef FERRY_HAVE_NVTX
  nvtxRangePop();
#endif
  if (start_ns_ >= 0) {
    Tracer& t = Tracer::get();
    t.complete("cpu", index_ < 0 ? std::string(name_) : std::string(name_) + " " + std::to_string(index_), start_ns_, t.now_ns() - start_ns_);
  }
}

}  // namespace ferry
