#include "models/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace ferry {

using json = nlohmann::json;

namespace {
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // as the safetensors crate

std::string errno_str() { return std::strerror(errno); }

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }
}  // namespace

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr && map_ != MAP_FAILED) munmap(map_, file_bytes_);
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

TensorView SafetensorsFile::view(const SafetensorsEntry& e) const {
  return TensorView::contiguous(const_cast<uint8_t*>(data_ + e.begin), e.dtype, e.shape);
}

Expected<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return not_found(strprintf("%s: file not found", path.c_str()));
    return io_error(strprintf("%s: cannot open: %s", path.c_str(), errno_str().c_str()));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return io_error(strprintf("%s: cannot stat: %s", path.c_str(), errno_str().c_str()));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(strprintf("%s: not a regular file", path.c_str()));
  }
  f->file_bytes_ = static_cast<uint64_t>(st.st_size);
  if (f->file_bytes_ < 8) {
    ::close(fd);
    return corrupt(strprintf("%s: truncated: %llu bytes, shorter than the 8-byte header length", path.c_str(),
                             static_cast<unsigned long long>(f->file_bytes_)));
  }
  f->map_ = mmap(nullptr, f->file_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    return io_error(strprintf("%s: cannot mmap: %s", path.c_str(), errno_str().c_str()));
  }
  const uint8_t* base = static_cast<const uint8_t*>(f->map_);
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian on every platform ferry runs on
  if (header_len > f->file_bytes_ - 8)
    return corrupt(strprintf("%s: header length %llu runs past the end of the file (%llu bytes)", path.c_str(),
                             static_cast<unsigned long long>(header_len), static_cast<unsigned long long>(f->file_bytes_)));
  if (header_len > kMaxHeaderBytes)
    return corrupt(strprintf("%s: header length %llu is larger than the 100 MiB limit", path.c_str(),
                             static_cast<unsigned long long>(header_len)));
  const uint64_t data_bytes = f->file_bytes_ - 8 - header_len;
  f->data_ = base + 8 + header_len;

  json h = json::parse(base + 8, base + 8 + header_len, nullptr, /*allow_exceptions=*/false);
  if (h.is_discarded() || !h.is_object())
    return corrupt(strprintf("%s: header is not a valid JSON object", path.c_str()));

  std::vector<const SafetensorsEntry*> by_offset;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return corrupt(strprintf("%s: __metadata__ must be an object", path.c_str()));
      for (auto m = v.begin(); m != v.end(); ++m)
        if (m.value().is_string()) f->metadata_[m.key()] = m.value().get<std::string>();
      continue;
    }
    auto bad = [&](const std::string& why) {
      return corrupt(strprintf("%s: tensor '%s': %s", path.c_str(), name.c_str(), why.c_str()));
    };
    if (!v.is_object()) return bad("entry is not an object");
    SafetensorsEntry e;
    e.name = name;
    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) return bad("missing 'dtype'");
    if (!dtype_from_name(dt->get<std::string>(), &e.dtype)) return bad("unknown dtype '" + dt->get<std::string>() + "'");
    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array()) return bad("missing 'shape'");
    if (sh->size() > static_cast<size_t>(kMaxDims)) return bad(strprintf("%zu dimensions (at most %d)", sh->size(), kMaxDims));
    uint64_t numel = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) return bad("shape holds a non-integer or negative value");
      const uint64_t dv = d.get<uint64_t>();
      if (dv > (1ull << 40)) return bad("dimension too large");
      if (mul_overflows(numel, dv, &numel)) return bad("shape product overflows");
      e.shape.push_back(static_cast<int64_t>(dv));
    }
    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
      return bad("'data_offsets' must be two non-negative integers");
    e.begin = (*off)[0].get<uint64_t>();
    e.end = (*off)[1].get<uint64_t>();
    if (e.begin > e.end) return bad(strprintf("data_offsets [%llu, %llu] are reversed", (unsigned long long)e.begin, (unsigned long long)e.end));
    if (e.end > data_bytes)
      return bad(strprintf("data_offsets [%llu, %llu] lie outside the data section (%llu bytes): the file is truncated or the offsets are wrong",
                           (unsigned long long)e.begin, (unsigned long long)e.end, (unsigned long long)data_bytes));
    uint64_t want = 0;
    if (mul_overflows(numel, dtype_size(e.dtype), &want)) return bad("byte size overflows");
    if (want != e.end - e.begin)
      return bad(strprintf("dtype %s and shape need %llu bytes but data_offsets give %llu", std::string(dtype_name(e.dtype)).c_str(),
                           (unsigned long long)want, (unsigned long long)(e.end - e.begin)));
    auto [ins, fresh] = f->entries_.emplace(name, std::move(e));
    if (!fresh) return bad("appears twice");
    by_offset.push_back(&ins->second);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsEntry* a = by_offset[i - 1];
    const SafetensorsEntry* b = by_offset[i];
    if (b->begin < a->end && b->end > b->begin && a->end > a->begin)
      return corrupt(strprintf("%s: tensors '%s' and '%s' overlap in the data section", path.c_str(), a->name.c_str(), b->name.c_str()));
  }
  // Tensors are used in place (mapped): an element must sit at a multiple of its size, as the
  // safetensors library's writer guarantees (larger dtypes first, the header padded to 8 bytes).
  for (const SafetensorsEntry* e : by_offset)
    if (const uint64_t a = dtype_size(e->dtype); a > 1 && (8 + header_len + e->begin) % a != 0)
      return corrupt(strprintf("%s: tensor '%s': its data starts at byte %llu of the file, not a multiple of its dtype's %llu bytes (a writer "
                               "that does not align tensors; re-save the file with the safetensors library)",
                               path.c_str(), e->name.c_str(), (unsigned long long)(8 + header_len + e->begin), (unsigned long long)a));
  return f;
}

namespace {
// An existing `path` must be a regular file (or a link to one): renaming over a device node, a
// directory or a FIFO would replace it, not write to it.
Status refuse_non_regular(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    return invalid_argument(strprintf("%s: not a regular file (ferry writes a temporary file beside it and renames it over the path)", path.c_str()));
  return Status::Ok();
}
}  // namespace

Status check_output_path(const std::string& path) {
  if (path.empty()) return invalid_argument("empty output path");
  FERRY_RETURN_IF_ERROR(refuse_non_regular(path));
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return io_error(strprintf("%s: cannot write there: %s", path.c_str(), errno_str().c_str()));
  ::close(fd);
  ::unlink(tmp.c_str());
  return Status::Ok();
}

Expected<std::string> read_file_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return not_found(strprintf("%s: cannot open: %s", path.c_str(), errno_str().c_str()));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return io_error(strprintf("%s: read failed", path.c_str()));
  return ss.str();
}

Status write_file_atomic(const std::string& path, const void* data, size_t n_bytes) {
  FERRY_RETURN_IF_ERROR(refuse_non_regular(path));
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return io_error(strprintf("%s: cannot create: %s", tmp.c_str(), errno_str().c_str()));
  const uint8_t* p = static_cast<const uint8_t*>(data);
  size_t left = n_bytes;
  while (left > 0) {
    ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      const std::string why = errno_str();
      ::close(fd);
      ::unlink(tmp.c_str());
      return io_error(strprintf("%s: write failed: %s", path.c_str(), why.c_str()));
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const std::string why = errno_str();
    ::unlink(tmp.c_str());
    return io_error(strprintf("%s: flush failed: %s", path.c_str(), why.c_str()));
  }
  if (Status st = refuse_non_regular(path); !st.ok()) {  // it may have appeared meanwhile
    ::unlink(tmp.c_str());
    return st;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_str();
    ::unlink(tmp.c_str());
    return io_error(strprintf("%s: rename failed: %s", path.c_str(), why.c_str()));
  }
  // The rename itself is durable once the directory is flushed.
  const std::string dir = std::filesystem::path(path).parent_path().string();
  if (int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
}

Status write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  // Larger dtypes first (stable otherwise), the header padded to 8 bytes: every tensor then starts at
  // a multiple of its element size, as readers that map the file need (and the safetensors library writes).
  std::vector<TensorToWrite> order(tensors);
  std::stable_sort(order.begin(), order.end(), [](const TensorToWrite& a, const TensorToWrite& b) { return dtype_size(a.dtype) > dtype_size(b.dtype); });
  uint64_t off = 0;
  for (const auto& t : order) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    const uint64_t nb = numel * dtype_size(t.dtype);
    h[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {off, off + nb}}};
    off += nb;
  }
  std::string hs = h.dump();
  while ((hs.size() + 8) % 8 != 0) hs.push_back(' ');  // align the data section to 8 bytes
  std::vector<uint8_t> buf(8 + hs.size() + off);
  const uint64_t hl = hs.size();
  std::memcpy(buf.data(), &hl, 8);
  std::memcpy(buf.data() + 8, hs.data(), hs.size());
  uint8_t* p = buf.data() + 8 + hs.size();
  for (const auto& t : order) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    const uint64_t nb = numel * dtype_size(t.dtype);
    if (nb) std::memcpy(p, t.data, nb);
    p += nb;
  }
  return write_file_atomic(path, buf.data(), buf.size());
}

}  // namespace ferry
