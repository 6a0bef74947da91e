// The machine's layout through hwloc: ferry's compute arena (oneTBB workers pinned one per core, so
// CPU attention and CPU layers keep their caches), and host memory bound to the NUMA node nearest
// the GPU. Without hwloc information (a container hiding it) everything still runs, unpinned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace ferry {

// Returns the number of threads of the compute arena (physical cores, or the TBB default).
int64_t compute_threads();
// Runs fn(begin, end) over [0, n) in the compute arena, in ranges of `grain` or more.
void run_parallel(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain = 1);
// Binds [p, p + bytes) to the NUMA node nearest the PCI device `pci_bus` ("0000:41:00.0"); pages not
// yet touched are then allocated there. Returns the node's index, or -1 when hwloc cannot tell.
int bind_near_pci(void* p, size_t bytes, const std::string& pci_bus);
// Bytes of [p, p + bytes) ranges backed by transparent huge pages now (the kernel's AnonHugePages of
// the mappings they lie in, from /proc/self/smaps; 0 where it cannot be read).
int64_t huge_page_bytes(const std::vector<std::pair<const void*, size_t>>& ranges);
// Asks the kernel to collapse [p, p + bytes) into huge pages now (MADV_COLLAPSE, Linux 6.1): where
// faults were served with 4 KiB pages (memory fragmented, THP defrag off), large scattered reads miss
// the TLB 512 times as often. Returns false where the kernel refuses; the range still works.
bool collapse_huge_pages(void* p, size_t bytes);
// Returns "N cores, M NUMA nodes" (for the CLI's backend line).
std::string topology_summary();

}  // namespace ferry
