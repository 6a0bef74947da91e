// The disk tier: `ferry pack` stores, layers streamed from them (io_uring, checksummed) giving the
// same logits and tokens as resident weights, and one test per fault: checksum mismatch, truncated
// store, short read, I/O error, ENOSPC while packing, existing output, a store for another config.
#include <doctest/doctest.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "cpu/cpu_executor.h"
#include "models/checkpoint.h"
#include "models/synthetic.h"
#include "offload/disk_reader.h"
#include "offload/packed_store.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "test_util.h"

using namespace ferry;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<WeightStore> resident(const std::string& dir, ModelConfig* cfg) {
  auto c = load_config(dir);
  REQUIRE(c.ok());
  *cfg = *c;
  auto ck = CheckpointReader::open(dir);
  REQUIRE(ck.ok());
  auto ws = WeightStore::from_checkpoint(*c, std::move(*ck));
  REQUIRE(ws.ok());
  return std::move(*ws);
}

std::vector<float> logits_of(WeightStore& ws, const std::vector<int32_t>& ids) {
  const ModelConfig& c = ws.config();
  cpu::CpuExecutor ex(c);
  auto kv = KvCache::create({c.n_layers, c.n_kv_heads, c.head_dim, 16, 64});
  REQUIRE(kv.ok());
  Runner r(ws, ex, *kv);
  auto l = prompt_logits(r, ids, 7);  // several steps: every layer read several times
  REQUIRE_MESSAGE(l.ok(), l.status().message());
  return *l;
}

Status logits_status(WeightStore& ws, const std::vector<int32_t>& ids) {
  const ModelConfig& c = ws.config();
  cpu::CpuExecutor ex(c);
  auto kv = KvCache::create({c.n_layers, c.n_kv_heads, c.head_dim, 16, 64});
  REQUIRE(kv.ok());
  Runner r(ws, ex, *kv);
  return prompt_logits(r, ids).status();
}

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c;
  f.read(&c, 1);
  c ^= 0x5a;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

}  // namespace

TEST_SUITE("offload") {
  TEST_CASE("layers streamed from a packed store give exactly the resident logits and tokens") {
    for (const char* name : {"llama-gqa", "llama3-tied", "qwen2-bias"}) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      ModelConfig cfg;
      auto ws = resident(dir, &cfg);
      test::TempDir tmp;
      const std::string store = tmp / "store";
      REQUIRE(pack_store(*ws, store).ok());
      auto disk = WeightStore::from_packed(cfg, store);
      REQUIRE_MESSAGE(disk.ok(), disk.status().message());
      CHECK((*disk)->layer_tier(0) == Tier::kDisk);
      auto g = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(g.ok());
      const auto ids = test::read_i32(**g, "seq1.input_ids");
      CHECK(logits_of(**disk, ids) == logits_of(*ws, ids));  // bit for bit: same bytes, same math
    }
    // Generation (prefill + decode steps, the layer ring wrapping across steps) on stories260K.
    const std::string dir = test::shared_dir() + "/models/stories260K";
    ModelConfig cfg;
    auto ws = resident(dir, &cfg);
    test::TempDir tmp;
    REQUIRE(pack_store(*ws, tmp / "s").ok());
    auto disk = WeightStore::from_packed(cfg, tmp / "s");
    REQUIRE(disk.ok());
    cpu::CpuExecutor ex(cfg);
    auto kv = KvCache::create({cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 16, 32});
    REQUIRE(kv.ok());
    Runner r(**disk, ex, *kv);
    GenerateOptions go;
    go.n_predict = 256;
    go.sampling.temperature = 0;
    go.stop_at_eos = false;
    auto res = generate(r, {{1}}, go);
    REQUIRE(res.ok());
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    CHECK(res->tokens[0] == test::read_i32(**gs, "bos.greedy_ids"));
  }

  TEST_CASE("faults: checksum mismatch, truncation, short read, EIO — each names the block and offset") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    ModelConfig cfg;
    auto ws = resident(dir, &cfg);
    test::TempDir tmp;
    const std::string store = tmp / "store";
    REQUIRE(pack_store(*ws, store).ok());
    auto m = open_store(store, cfg);
    REQUIRE(m.ok());
    const std::vector<int32_t> ids = {1, 2, 3};

    SUBCASE("checksum mismatch") {
      flip_byte(store + "/weights.bin", m->blocks[3].offset + 1000);  // layer 2
      auto disk = WeightStore::from_packed(cfg, store);
      REQUIRE(disk.ok());
      Status st = logits_status(**disk, ids);
      REQUIRE(!st.ok());
      CAPTURE(st.message());
      CHECK(st.message().find("layer.2") != std::string::npos);
      CHECK(st.message().find("checksum mismatch") != std::string::npos);
      CHECK(st.message().find(std::to_string(m->blocks[3].offset)) != std::string::npos);
    }
    SUBCASE("truncated store") {
      fs::resize_file(store + "/weights.bin", m->file_bytes - 5000);
      auto disk = WeightStore::from_packed(cfg, store);
      REQUIRE(!disk.ok());
      CHECK(disk.status().message().find("truncated") != std::string::npos);
    }
    SUBCASE("short read and I/O error (injected)") {
      for (int mode = 0; mode < 2; ++mode) {
        DiskReaderOptions o;
        o.fail_block = 2;  // layer 1
        if (mode == 0) o.fail_short = true;
        else o.fail_errno = EIO;
        auto disk = WeightStore::from_packed(cfg, store, o);
        REQUIRE(disk.ok());
        Status st = logits_status(**disk, ids);
        REQUIRE(!st.ok());
        CAPTURE(st.message());
        CHECK(st.message().find("layer.1") != std::string::npos);
        CHECK(st.message().find(mode == 0 ? "short read" : "Input/output error") != std::string::npos);
        CHECK(st.message().find("offset") != std::string::npos);
      }
    }
    SUBCASE("a store packed for another config") {
      ModelConfig other = cfg;
      other.n_layers = 3;
      auto bad = open_store(store, other);
      REQUIRE(!bad.ok());
      CHECK(bad.status().message().find("layers") != std::string::npos);
      ModelConfig wider = cfg;
      wider.n_ff = 512;
      auto bad2 = open_store(store, wider);
      REQUIRE(!bad2.ok());
      CHECK(bad2.status().message().find("mlp") != std::string::npos);
    }
  }

  TEST_CASE("packing: ENOSPC leaves nothing behind; existing output refused; O_DIRECT where possible") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    ModelConfig cfg;
    auto ws = resident(dir, &cfg);
    test::TempDir tmp;
    const std::string store = tmp / "store";
    PackOptions po;
    po.fail_write_after_bytes = 3 << 20;
    po.fail_errno = ENOSPC;
    Status st = pack_store(*ws, store, po);
    REQUIRE(!st.ok());
    CHECK(st.message().find("No space left on device") != std::string::npos);
    CHECK(st.message().find("offset") != std::string::npos);
    int entries = 0;
    for ([[maybe_unused]] auto& e : fs::directory_iterator(tmp.path)) ++entries;
    CHECK(entries == 0);  // neither the store nor its temporary directory
    REQUIRE(pack_store(*ws, store).ok());
    Status again = pack_store(*ws, store);
    REQUIRE(!again.ok());
    CHECK(again.message().find("already exists") != std::string::npos);
    auto m = open_store(store, cfg);
    REQUIRE(m.ok());
    auto rd = DiskReader::open(*m);
    REQUIRE(rd.ok());
    MESSAGE("O_DIRECT on " << tmp.path.string() << ": " << std::string((*rd)->direct_io() ? "yes" : "no (buffered fallback)"));
    auto missing = open_store(tmp / "nope", cfg);
    REQUIRE(!missing.ok());
    CHECK(missing.status().message().find("manifest.json") != std::string::npos);
  }

  TEST_CASE("CLI: ferry pack, then logits and run with --disk") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    test::TempDir tmp;
    const std::string store = tmp / "st";
    test::CmdResult p = test::run_ferry("pack -m '" + dir + "' --out '" + store + "'");
    REQUIRE_MESSAGE(p.exit_code == 0, p.output);
    test::CmdResult r = test::run_ferry("run -m '" + dir + "' --disk '" + store + "' -p '' --temp 0 -n 32 --device cpu", true);
    test::CmdResult r0 = test::run_ferry("run -m '" + dir + "' -p '' --temp 0 -n 32 --device cpu", true);
    CHECK(r.exit_code == 0);
    CHECK(r.output == r0.output);
    test::CmdResult bad = test::run_ferry("logits -m '" + dir + "' --disk '" + (tmp / "missing") + "' --ids 1 --out /tmp/x.st");
    CHECK(bad.exit_code == 1);
    CHECK(bad.output.find("manifest.json") != std::string::npos);
    test::CmdResult dup = test::run_ferry("pack -m '" + dir + "' --out '" + store + "'");
    CHECK(dup.exit_code != 0);
    CHECK(dup.output.find("already exists") != std::string::npos);
  }
}

#include "runtime/budget.h"

TEST_SUITE("offload") {
  TEST_CASE("sizes and the GPU plan: resident layers under --gpu-mem, the minimum working set named") {
    CHECK(*parse_size("8G", "--gpu-mem") == (int64_t{8} << 30));
    CHECK(*parse_size("512M", "--gpu-mem") == (int64_t{512} << 20));
    CHECK(*parse_size("24GiB", "--gpu-mem") == (int64_t{24} << 30));
    CHECK(*parse_size("1.5g", "--gpu-mem") == (int64_t{3} << 29));
    CHECK(*parse_size("4096", "--gpu-mem") == 4096);
    for (const char* bad : {"", "G", "8X", "-1G", "eight"}) {
      auto r = parse_size(bad, "--gpu-mem");
      CHECK(!r.ok());
      if (!r.ok()) CHECK(r.status().message().find("--gpu-mem") != std::string::npos);
    }
    auto c = synthetic_config("llama-2-7b");
    REQUIRE(c.ok());
    CHECK(gpu_layer_bytes(*c) == 2 * 202383360);  // Llama-2-7B's layer: 202.4 M parameters
    GpuPlanInput in;
    in.kv_bytes = int64_t{1} << 30;
    auto all = plan_gpu(*c, in);  // no budget: all resident
    REQUIRE(all.ok());
    CHECK(all->n_resident == 32);
    in.budget_bytes = int64_t{8} << 30;
    auto p8 = plan_gpu(*c, in);
    REQUIRE(p8.ok());
    CHECK(p8->n_resident > 0);
    CHECK(p8->n_resident < 32);
    CHECK(p8->n_streamed == 32 - p8->n_resident);
    CHECK(p8->total_bytes <= in.budget_bytes);
    CHECK(p8->total_bytes + p8->layer_bytes > in.budget_bytes);  // one more layer would not fit
    in.budget_bytes = int64_t{1} << 30;
    auto tiny = plan_gpu(*c, in);
    REQUIRE(!tiny.ok());
    CHECK(tiny.status().message().find("--gpu-mem") != std::string::npos);
    CHECK(tiny.status().message().find("minimum working set") != std::string::npos);
  }
}

#include <nlohmann/json.hpp>

#include "runtime/trace.h"

TEST_SUITE("offload") {
  TEST_CASE("trace: overlap of copies under compute; the CLI writes a Chrome trace with cpu and disk tracks") {
    Tracer& t = Tracer::get();  // process-wide: enabling it here affects only this suite's process
    t.enable();
    const int64_t base = t.now_ns() + (int64_t{1} << 40);  // far from anything else recorded
    t.complete("test.compute", "c1", base + 0, 100);
    t.complete("test.compute", "c2", base + 150, 100);   // compute busy [0,100) and [150,250)
    t.complete("test.copy", "x1", base + 50, 100);       // [50,150): 50 hidden
    t.complete("test.copy", "x2", base + 200, 100);      // [200,300): 50 hidden
    const auto o = t.overlap("test.copy", "test.compute");
    CHECK(o.hidden_fraction == doctest::Approx(0.5));
    CHECK(o.copy_ms == doctest::Approx(200e-6));
    CHECK(o.compute_ms == doctest::Approx(200e-6));
    const std::string dir = test::shared_dir() + "/models/stories260K";
    test::TempDir tmp;
    REQUIRE(test::run_ferry("pack -m '" + dir + "' --out '" + (tmp / "st") + "'").exit_code == 0);
    test::CmdResult r = test::run_ferry("run -m '" + dir + "' --disk '" + (tmp / "st") + "' -p Once -n 4 --temp 0 --device cpu --trace '" +
                                        (tmp / "t.json") + "'");
    REQUIRE_MESSAGE(r.exit_code == 0, r.output);
    std::ifstream f(tmp / "t.json");
    std::stringstream ss;
    ss << f.rdbuf();
    auto j = nlohmann::json::parse(ss.str(), nullptr, false);
    REQUIRE(!j.is_discarded());
    std::map<int, std::string> names;
    int layers = 0, reads = 0;
    for (const auto& e : j["traceEvents"]) {
      if (e["ph"] == "M" && e["name"] == "thread_name") names[e["tid"].get<int>()] = e["args"]["name"];
    }
    for (const auto& e : j["traceEvents"]) {
      if (e["ph"] != "X") continue;
      const std::string track = names[e["tid"].get<int>()];
      const std::string name = e["name"];
      if (track == "cpu" && name.rfind("layer ", 0) == 0) ++layers;
      if (track == "disk") {
        ++reads;
        CHECK(e["args"]["bytes"].get<int64_t>() > 0);
      }
    }
    CHECK(layers >= 5 * 4);  // 5 layers, at least 4 steps
    CHECK(reads >= 5 * 4);
  }
}

TEST_SUITE("offload") {
  TEST_CASE("ferry plan: placement, bytes per tier and the floor; a budget below the minimum is refused with the minimum") {
    test::CmdResult r = test::run_ferry("plan -m synthetic:llama-2-7b --gpu-mem 8G --batch 1 --context 64");
    REQUIRE_MESSAGE(r.exit_code == 0, r.output);
    CHECK(r.output.find("layers 0-14 resident") != std::string::npos);
    CHECK(r.output.find("layers 15-31 streamed") != std::string::npos);
    CHECK(r.output.find("bound by PCIe") != std::string::npos);
    test::CmdResult all = test::run_ferry("plan -m synthetic:llama-2-7b --gpu-mem 40G");
    CHECK(all.exit_code == 0);
    CHECK(all.output.find("layers 0-31 resident") != std::string::npos);
    CHECK(all.output.find("GPU memory bandwidth") != std::string::npos);
    test::CmdResult small = test::run_ferry("plan -m synthetic:llama-2-13b --gpu-mem 2G");
    CHECK(small.exit_code == 1);
    CHECK(small.output.find("--gpu-mem") != std::string::npos);
    CHECK(small.output.find("minimum working set") != std::string::npos);
    test::CmdResult bad = test::run_ferry("plan -m synthetic:llama-2-7b --gpu-mem 8Q");
    CHECK(bad.exit_code == 2);
    CHECK(bad.output.find("--gpu-mem") != std::string::npos);
  }
}
