#include "offload/packed_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "models/weight_format.h"
#include "offload/layer_layout.h"
#include "offload/weight_store.h"

namespace ferry {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// The tensors of block `b` (0: globals, 1 + l: layer l) as the store lays them out.
std::vector<std::pair<int, const TensorView*>> block_tensors(const WeightStore& ws, int64_t b) {
  std::vector<std::pair<int, const TensorView*>> out;
  if (b == 0) {
    const GlobalWeights& g = ws.globals();
    for (int t = 0; t < kGlobalTensorCount; ++t) {
      if (t == kLmHead && ws.config().tie_word_embeddings) continue;
      out.emplace_back(t, &g.t[t]);
    }
  } else {
    const LayerWeights& l = ws.layer(b - 1);
    for (int t = 0; t < kLayerTensorCount; ++t)
      if (l.t[t].n_dims > 0) out.emplace_back(t, &l.t[t]);
  }
  return out;
}

// `fused`: the layer's weights are quantised, q/k/v and gate/up fused (architecture.h).
std::string hf_name(const ModelConfig& cfg, int64_t b, int slot, bool fused) {
  return b == 0 ? global_tensor_specs(cfg)[slot].name : layer_tensor_specs(cfg, b - 1, fused)[slot].name;
}

// Writes all of `data`, honouring the test hook; names the file and offset on failure.
Status write_all(int fd, const std::string& path, const void* data, size_t n, uint64_t offset, const PackOptions& opts,
                 uint64_t* written_total) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  size_t left = n;
  while (left > 0) {
    if (opts.fail_write_after_bytes >= 0 && *written_total >= static_cast<uint64_t>(opts.fail_write_after_bytes)) {
      errno = opts.fail_errno ? opts.fail_errno : EIO;
      return io_error(strprintf("%s: write failed at offset %llu: %s", path.c_str(), (unsigned long long)(offset + (n - left)), std::strerror(errno)));
    }
    ssize_t w = ::pwrite(fd, p, left, static_cast<off_t>(offset + (n - left)));
    if (w < 0) {
      if (errno == EINTR) continue;
      return io_error(strprintf("%s: write failed at offset %llu: %s", path.c_str(), (unsigned long long)(offset + (n - left)), std::strerror(errno)));
    }
    p += w;
    left -= static_cast<size_t>(w);
    *written_total += static_cast<uint64_t>(w);
  }
  return Status::Ok();
}

}  // namespace

Status pack_store(const WeightStore& ws, const std::string& out, const PackOptions& opts) {
  const ModelConfig& cfg = ws.config();
  std::error_code ec;
  if (fs::exists(out, ec)) return invalid_argument(strprintf("--out %s: already exists (remove it first)", out.c_str()));
  const std::string tmp = out + ".tmp." + std::to_string(getpid());
  fs::remove_all(tmp, ec);
  if (!fs::create_directories(tmp, ec))
    return io_error(strprintf("--out %s: cannot create %s: %s", out.c_str(), tmp.c_str(), ec.message().c_str()));
  auto fail = [&](Status st) {
    std::error_code e2;
    fs::remove_all(tmp, e2);  // nothing half-written stays behind
    return st;
  };
  const std::string wpath = tmp + "/weights.bin";
  int fd = ::open(wpath.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return fail(io_error(strprintf("%s: cannot create: %s", wpath.c_str(), std::strerror(errno))));

  json blocks = json::array();
  uint64_t offset = 0, written = 0;
  std::vector<uint8_t> buf;
  for (int64_t b = 0; b <= cfg.n_layers; ++b) {
    // Lay the block out (globals: 256-byte aligned tensors; layers: the LayerLayout, back to back),
    // copy its tensors (converted to BF16 with --dtype bf16), checksum, write.
    json tensors = json::array();
    uint64_t at = 0;
    struct Placed {
      uint64_t offset;
      const TensorView* v;
      DType dtype;
    };
    std::vector<Placed> placed;
    for (auto [slot, v] : block_tensors(ws, b)) {
      if (v->data == nullptr) {
        ::close(fd);
        return fail(unsupported("ferry pack: the weights are not in host memory (synthetic stores must be generated on the host)"));
      }
      const DType dt = opts.bf16 && v->dtype != DType::kBF16 && !is_quantized(v->dtype) ? DType::kBF16 : v->dtype;
      const uint64_t nbytes = static_cast<uint64_t>(tensor_bytes(dt, v->shape.data(), v->n_dims));
      const bool fused = b > 0 && is_quantized(linear_dtype(ws.layer(b - 1)));
      if (b == 0) at = round_up(at, kPackTensorAlign);
      placed.push_back({at, v, dt});
      std::vector<int64_t> shape(v->shape.begin(), v->shape.begin() + v->n_dims);
      tensors.push_back({{"name", hf_name(cfg, b, slot, fused)}, {"slot", slot}, {"dtype", std::string(dtype_name(dt))},
                         {"shape", shape}, {"offset", at}, {"bytes", nbytes}});
      at += nbytes;
    }
    const uint64_t bytes = at, padded = round_up(bytes, kPackAlign);
    buf.assign(padded, 0);
    for (const Placed& pl : placed) {
      uint8_t* dst = buf.data() + pl.offset;
      if (pl.dtype == pl.v->dtype) {
        std::memcpy(dst, pl.v->data, pl.v->nbytes());
      } else {
        uint16_t* o = reinterpret_cast<uint16_t*>(dst);
        std::vector<float> f(static_cast<size_t>(pl.v->numel()));
        convert_to_f32(pl.v->data, pl.v->dtype, f.data(), f.size());
        for (size_t i = 0; i < f.size(); ++i) o[i] = f32_to_bf16(f[i]);
      }
    }
    const uint64_t h = XXH3_64bits(buf.data(), bytes);
    if (Status st = write_all(fd, wpath, buf.data(), padded, offset, opts, &written); !st.ok()) {
      ::close(fd);
      return fail(st);
    }
    blocks.push_back({{"name", b == 0 ? std::string("globals") : "layer." + std::to_string(b - 1)},
                      {"offset", offset},
                      {"bytes", bytes},
                      {"padded_bytes", padded},
                      {"xxh3", strprintf("%016llx", (unsigned long long)h)},
                      {"tensors", tensors}});
    offset += padded;
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) return fail(io_error(strprintf("%s: flush failed: %s", wpath.c_str(), std::strerror(errno))));
  json manifest = {{"format", "ferry-pack"},
                   {"version", 2},
                   {"architecture", cfg.architecture},
                   {"n_layers", cfg.n_layers},
                   {"source", ws.source()},
                   {"weights_bytes", offset},
                   {"blocks", blocks}};
  const std::string m = manifest.dump(1);
  if (Status st = write_file_atomic(tmp + "/manifest.json", m.data(), m.size()); !st.ok()) return fail(st);
  if (std::rename(tmp.c_str(), out.c_str()) != 0)
    return fail(io_error(strprintf("--out %s: cannot rename %s into place: %s", out.c_str(), tmp.c_str(), std::strerror(errno))));
  return Status::Ok();
}

Expected<PackedManifest> open_store_unchecked(const std::string& dir) {
  const std::string mpath = dir + "/manifest.json";
  std::ifstream f(mpath, std::ios::binary);
  if (!f) return not_found(strprintf("--disk %s: no manifest.json (not a store written by 'ferry pack', or an interrupted one)", dir.c_str()));
  std::stringstream ss;
  ss << f.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("format", "") != "ferry-pack")
    return corrupt(strprintf("%s: not a ferry-pack manifest", mpath.c_str()));
  if (j.value("version", 0) != 2)
    return unsupported(strprintf("%s: manifest version %d is not supported (2; repack with this ferry)", mpath.c_str(), j.value("version", 0)));
  PackedManifest m;
  m.dir = dir;
  try {
    for (const auto& b : j.at("blocks")) {
      PackedBlock pb;
      pb.name = b.at("name");
      pb.offset = b.at("offset");
      pb.bytes = b.at("bytes");
      pb.padded_bytes = b.at("padded_bytes");
      pb.xxh3 = std::stoull(b.at("xxh3").get<std::string>(), nullptr, 16);
      for (const auto& t : b.at("tensors")) {
        PackedTensor pt;
        pt.name = t.at("name");
        pt.slot = t.at("slot");
        if (!dtype_from_name(t.at("dtype").get<std::string>(), &pt.dtype, true)) return corrupt(strprintf("%s: tensor '%s' has an unknown dtype", mpath.c_str(), pt.name.c_str()));
        pt.shape = t.at("shape").get<std::vector<int64_t>>();
        pt.offset = t.at("offset");
        pt.bytes = t.at("bytes");
        if (pt.offset + pt.bytes > pb.bytes) return corrupt(strprintf("%s: tensor '%s' runs past its block", mpath.c_str(), pt.name.c_str()));
        pb.tensors.push_back(std::move(pt));
      }
      if (pb.offset % kPackAlign || pb.padded_bytes % kPackAlign || pb.bytes > pb.padded_bytes)
        return corrupt(strprintf("%s: block '%s' is not 4 KiB aligned", mpath.c_str(), pb.name.c_str()));
      m.file_bytes = std::max(m.file_bytes, pb.offset + pb.padded_bytes);
      m.blocks.push_back(std::move(pb));
    }
  } catch (const std::exception& e) {
    return corrupt(strprintf("%s: malformed manifest: %s", mpath.c_str(), e.what()));
  }
  struct stat st {};
  if (::stat(m.weights_path().c_str(), &st) != 0) return not_found(strprintf("%s: missing", m.weights_path().c_str()));
  if (static_cast<uint64_t>(st.st_size) < m.file_bytes)
    return corrupt(strprintf("%s: truncated: %lld bytes, the manifest needs %llu", m.weights_path().c_str(), (long long)st.st_size,
                             (unsigned long long)m.file_bytes));
  return m;
}

Expected<PackedManifest> open_store(const std::string& dir, const ModelConfig& cfg) {
  const std::string mpath = dir + "/manifest.json";
  FERRY_ASSIGN_OR_RETURN(PackedManifest m, open_store_unchecked(dir));
  // The store must hold exactly what the config's recipe needs.
  if (static_cast<int64_t>(m.blocks.size()) != cfg.n_layers + 1)
    return corrupt(strprintf("%s: %zu blocks, but config.json has %lld layers (+ globals)", mpath.c_str(), m.blocks.size(), (long long)cfg.n_layers));
  for (int64_t b = 0; b <= cfg.n_layers; ++b) {
    // A quantised layer (its down projection in NF4 / Q8) holds the fused weights.
    bool fused = false;
    for (const auto& t : m.blocks[b].tensors) fused |= b > 0 && t.slot == kWDown && is_quantized(t.dtype);
    for (const auto& t : m.blocks[b].tensors) {
      if (t.slot < 0 || t.slot >= (b == 0 ? static_cast<int>(kGlobalTensorCount) : static_cast<int>(kLayerTensorCount)))
        return corrupt(strprintf("%s: tensor '%s' has an unknown slot %d", mpath.c_str(), t.name.c_str(), t.slot));
      const TensorSpec spec = b == 0 ? global_tensor_specs(cfg)[t.slot] : layer_tensor_specs(cfg, b - 1, fused)[t.slot];
      if (spec.name != t.name || spec.shape != t.shape)
        return corrupt(strprintf("%s: tensor '%s' does not match config.json (expected '%s')", mpath.c_str(), t.name.c_str(), spec.name.c_str()));
      if (is_quantized(t.dtype) && (b == 0 || t.shape.size() != 2 || t.shape[1] % quant_col_multiple(t.dtype) != 0))
        return corrupt(strprintf("%s: tensor '%s' cannot be %s", mpath.c_str(), t.name.c_str(), std::string(dtype_name(t.dtype)).c_str()));
      if (static_cast<uint64_t>(tensor_bytes(t.dtype, t.shape.data(), static_cast<int>(t.shape.size()))) != t.bytes)
        return corrupt(strprintf("%s: tensor '%s': dtype and shape disagree with its size", mpath.c_str(), t.name.c_str()));
    }
    if (b == 0) continue;
    // A layer block is its LayerLayout: executors take the views from the layout.
    LayerWeights dtypes;
    for (const auto& t : m.blocks[b].tensors) dtypes.t[t.slot] = TensorView::contiguous(nullptr, t.dtype, t.shape);
    const LayerLayout lay = layer_layout(cfg, b - 1, dtypes);
    size_t n_present = 0;
    for (int t = 0; t < kLayerTensorCount; ++t) n_present += lay.present[t];
    if (m.blocks[b].tensors.size() != n_present || m.blocks[b].bytes != lay.bytes)
      return corrupt(strprintf("%s: block '%s' does not hold the layer's tensors", mpath.c_str(), m.blocks[b].name.c_str()));
    for (const auto& t : m.blocks[b].tensors)
      if (t.offset != lay.offset[t.slot])
        return corrupt(strprintf("%s: tensor '%s' is not at its layout offset", mpath.c_str(), t.name.c_str()));
  }
  return m;
}

Expected<PackedManifest> write_scratch_store(const std::string& parent, int64_t bytes) {
  PackedManifest m;
  m.dir = parent + "/ferry-calibrate." + std::to_string(getpid());
  std::error_code ec;
  fs::remove_all(m.dir, ec);
  if (!fs::create_directories(m.dir, ec)) return io_error(strprintf("--dir %s: cannot create %s: %s", parent.c_str(), m.dir.c_str(), ec.message().c_str()));
  const std::string path = m.weights_path();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return io_error(strprintf("%s: cannot create: %s", path.c_str(), std::strerror(errno)));
  const uint64_t block = uint64_t{64} << 20;
  std::vector<uint64_t> buf(block / 8);
  uint64_t x = 0x9e3779b97f4a7c15ull, written = 0;
  PackOptions none;
  for (uint64_t off = 0; off < static_cast<uint64_t>(bytes); off += block) {
    for (auto& v : buf) v = (x = x * 6364136223846793005ull + 1442695040888963407ull);  // incompressible
    if (Status st = write_all(fd, path, buf.data(), block, off, none, &written); !st.ok()) {
      ::close(fd);
      fs::remove_all(m.dir, ec);
      return st;
    }
    m.blocks.push_back({"scratch." + std::to_string(off / block), off, block, block, XXH3_64bits(buf.data(), block), {}});
  }
  m.file_bytes = written;
  if (::fsync(fd) != 0 || ::close(fd) != 0) return io_error(strprintf("%s: flush failed: %s", path.c_str(), std::strerror(errno)));
  return m;
}

}  // namespace ferry
