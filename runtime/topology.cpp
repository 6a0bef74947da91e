#include "runtime/topology.h"

#include <hwloc.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>

#include <tbb/blocked_range.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>
#include <tbb/task_scheduler_observer.h>

#include "runtime/status.h"

namespace ferry {

namespace {

struct Topology {
  hwloc_topology_t topo = nullptr;
  int n_cores = 0, n_nodes = 0;
  Topology() {
    if (hwloc_topology_init(&topo) != 0) {
      topo = nullptr;
      return;
    }
    hwloc_topology_set_io_types_filter(topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (hwloc_topology_load(topo) != 0) {
      hwloc_topology_destroy(topo);
      topo = nullptr;
      return;
    }
    n_cores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    n_nodes = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
  }
  ~Topology() {
    if (topo) hwloc_topology_destroy(topo);
  }
};
Topology& topology() {
  static Topology t;
  return t;
}

// Pins each worker to one core while it works in the arena: the core of its arena slot (slots are
// unique among the threads in an arena at a time; slot 0, the calling thread's, is never pinned).
// On leaving, the worker gets the whole machine back, since TBB's workers also serve the default
// arena (the CPU GEMMs), whose threads must not inherit a pin. FERRY_PIN=0 turns pinning off.
class PinWorkers : public tbb::task_scheduler_observer {
 public:
  explicit PinWorkers(tbb::task_arena& a) : tbb::task_scheduler_observer(a) {
    Topology& t = topology();
    const char* env = std::getenv("FERRY_PIN");
    enabled_ = t.topo != nullptr && t.n_cores > 1 && !(env && std::string(env) == "0");
    if (enabled_) all_ = hwloc_bitmap_dup(hwloc_topology_get_allowed_cpuset(t.topo));
    observe(true);
  }
  ~PinWorkers() override {
    observe(false);
    if (all_) hwloc_bitmap_free(all_);
  }
  void on_scheduler_entry(bool is_worker) override {
    if (!enabled_ || !is_worker) return;
    Topology& t = topology();
    const int slot = tbb::this_task_arena::current_thread_index();
    if (slot <= 0) return;
    hwloc_obj_t core = hwloc_get_obj_by_type(t.topo, HWLOC_OBJ_CORE, static_cast<unsigned>(slot % t.n_cores));
    if (core) hwloc_set_cpubind(t.topo, core->cpuset, HWLOC_CPUBIND_THREAD);
  }
  void on_scheduler_exit(bool is_worker) override {
    if (enabled_ && is_worker) hwloc_set_cpubind(topology().topo, all_, HWLOC_CPUBIND_THREAD);
  }
  bool enabled() const { return enabled_; }

 private:
  bool enabled_ = false;
  hwloc_bitmap_t all_ = nullptr;
};

struct Arena {
  tbb::task_arena arena;
  std::unique_ptr<PinWorkers> pin;
  int threads = 1;
  Arena() {
    const int cores = topology().n_cores;
    threads = cores > 0 ? std::min(cores, tbb::info::default_concurrency()) : tbb::info::default_concurrency();
    arena.initialize(threads);
    pin = std::make_unique<PinWorkers>(arena);
  }
};
Arena& arena() {
  static Arena a;
  return a;
}

}  // namespace

int64_t compute_threads() { return arena().threads; }

void run_parallel(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain) {
  if (n <= 0) return;
  arena().arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, std::max<int64_t>(1, grain)),
                      [&](const tbb::blocked_range<int64_t>& r) { fn(r.begin(), r.end()); });
  });
}

int bind_near_pci(void* p, size_t bytes, const std::string& pci_bus) {
  Topology& t = topology();
  if (t.topo == nullptr || pci_bus.empty() || p == nullptr || t.n_nodes <= 1) return t.n_nodes == 1 ? 0 : -1;
  hwloc_obj_t dev = hwloc_get_pcidev_by_busidstring(t.topo, pci_bus.c_str());
  if (dev == nullptr) return -1;
  hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(t.topo, dev);
  if (anc == nullptr || anc->nodeset == nullptr) return -1;
  if (hwloc_set_area_membind(t.topo, p, bytes, anc->nodeset, HWLOC_MEMBIND_BIND, HWLOC_MEMBIND_BYNODESET) != 0) return -1;
  return hwloc_bitmap_first(anc->nodeset);
}

int64_t huge_page_bytes(const std::vector<std::pair<const void*, size_t>>& ranges) {
  std::FILE* f = std::fopen("/proc/self/smaps", "r");
  if (f == nullptr) return 0;
  char line[4096];
  int64_t total = 0, overlap = 0;  // overlap: bytes of the ranges inside the current mapping
  while (std::fgets(line, sizeof line, f)) {
    unsigned long lo = 0, hi = 0;
    long kb = 0;
    if (std::sscanf(line, "%lx-%lx ", &lo, &hi) == 2) {  // a mapping's header line
      overlap = 0;
      for (const auto& [p, n] : ranges) {
        const auto s = reinterpret_cast<uintptr_t>(p);
        if (s < hi && s + n > lo) overlap += static_cast<int64_t>(std::min<uintptr_t>(s + n, hi) - std::max<uintptr_t>(s, lo));
      }
    } else if (overlap > 0 && std::sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) {
      total += std::min<int64_t>(static_cast<int64_t>(kb) * 1024, overlap);
    }
  }
  std::fclose(f);
  return total;
}

bool collapse_huge_pages(void* p, size_t bytes) {
#if defined(__linux__)
  constexpr int kMadvCollapse = 25;  // MADV_COLLAPSE, Linux 6.1; older headers lack the name
  return p != nullptr && madvise(p, bytes, kMadvCollapse) == 0;
#else
  return false;
#endif
}

std::string topology_summary() {
  Topology& t = topology();
  return strprintf("%d cores, %d NUMA node%s, %lld compute threads%s", t.n_cores, t.n_nodes, t.n_nodes == 1 ? "" : "s",
                   static_cast<long long>(compute_threads()), arena().pin->enabled() ? " pinned" : "");
}

}  // namespace ferry
