// The disk tier: `ferry pack` stores, layers streamed from them (io_uring, checksummed) giving the
// same logits and tokens as resident weights, and one test per fault: checksum mismatch, truncated
// store, short read, I/O error, ENOSPC while packing, existing output, a store for another config.
#include <doctest/doctest.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <unistd.h>

#include "cpu/cpu_executor.h"
#include "models/checkpoint.h"
#include "models/synthetic.h"
#include "offload/disk_reader.h"
#include "offload/emulated_device.h"
#include "offload/kv_cache.h"
#include "models/weight_format.h"
#include "offload/layer_layout.h"
#include "offload/packed_store.h"
#include "offload/staging_ring.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/topology.h"
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
    CHECK(p8->n_streamed + p8->n_cpu == 32 - p8->n_resident);
    CHECK(p8->total_bytes <= in.budget_bytes);
    CHECK(p8->total_bytes + p8->layer_bytes > in.budget_bytes);  // one more layer would not fit
    // At batch 1 the cost model puts layers on the CPU (host DRAM and PCIe at once) and predicts a
    // shorter step than streaming alone; CPU layers sit between streamed ones, never at the front.
    CHECK(p8->n_cpu > 0);
    GpuPlanInput only_stream = in;
    only_stream.budget_bytes = int64_t{8} << 30;
    only_stream.cpu_layers = 0;
    auto s8 = plan_gpu(*c, only_stream);
    REQUIRE(s8.ok());
    CHECK(s8->n_cpu == 0);
    CHECK(s8->n_streamed == 32 - s8->n_resident);
    CHECK(p8->predicted_ms < s8->predicted_ms);
    CHECK(p8->place[p8->n_resident] == Place::kStreamed);
    for (int64_t il = 0; il < 32; ++il) CHECK((p8->place[il] == Place::kResident) == (il < p8->n_resident));
    // With K/V on the host, resident layers spread evenly among the others: the first k layers hold
    // floor(k R / 32) of the R others, so the copy stream never waits out a run of resident layers.
    auto check_spread = [](const GpuPlan& p) {
      const int64_t R = 32 - p.n_resident;
      REQUIRE(R > 0);
      REQUIRE(p.n_resident > 0);
      for (int64_t k = 1, others = 0; k <= 32; ++k) {
        others += p.place[k - 1] != Place::kResident;
        CHECK(others == k * R / 32);
      }
    };
    GpuPlanInput host_kv = in;
    host_kv.kv = KvPlace::kHost;
    auto ph = plan_gpu(*c, host_kv);
    REQUIRE(ph.ok());
    check_spread(*ph);
    CHECK(ph->place[31] != Place::kResident);
    CHECK(ph->place[0] == Place::kResident);
    const PlanFloor f8 = plan_floor(*c, *p8, 1, in.hw), fs8 = plan_floor(*c, *s8, 1, in.hw);
    CHECK(f8.step_ms < fs8.step_ms);
    CHECK(p8->predicted_ms >= f8.step_ms * 0.99);  // the prediction is never better than the floor
    // The CPU layer's rate beside the copies, where calibrate measured it, prices the CPU layers of
    // a plan that streams too: that slow beside them, streaming and CPU layers together lose to
    // CPU layers alone.
    GpuPlanInput slow_beside = in;
    slow_beside.hw.cpu_layer_shared_gbs = 0.3 * slow_beside.hw.cpu_layer_gbs;
    auto ps = plan_gpu(*c, slow_beside);
    REQUIRE(ps.ok());
    CHECK(p8->n_streamed > 0);
    CHECK(ps->n_streamed == 0);
    CHECK(ps->predicted_ms > p8->predicted_ms);
    // At batch 64 the CPU's GEMM rate makes CPU layers a loss.
    GpuPlanInput big = only_stream;
    big.cpu_layers = -1;
    big.max_batch = 64;
    auto b64 = plan_gpu(*c, big);
    REQUIRE(b64.ok());
    CHECK(b64->n_cpu < p8->n_cpu);
    // At more than one row a step the resident layers are spread among the others with GPU K/V
    // too (the batch-1 plans above keep them first).
    big.kv = KvPlace::kGpu;
    auto g64 = plan_gpu(*c, big);
    REQUIRE(g64.ok());
    check_spread(*g64);
    // --host-mem: layers beyond it come from disk, or the error names the flag and --disk.
    GpuPlanInput host = only_stream;
    host.host_budget_bytes = 4 * p8->layer_bytes;
    auto no_disk = plan_gpu(*c, host);
    REQUIRE(!no_disk.ok());
    CHECK(no_disk.status().message().find("--host-mem") != std::string::npos);
    CHECK(no_disk.status().message().find("--disk") != std::string::npos);
    host.have_disk = true;
    auto with_disk = plan_gpu(*c, host);
    REQUIRE(with_disk.ok());
    // The budget holds the token embedding (moved off the GPU: one more layer resident there, as many
    // left to the disk) and as many layers as fit beside it.
    CHECK(with_disk->embedding_on_host);
    CHECK(with_disk->host_bytes == (host.host_budget_bytes - with_disk->embedding_host_bytes) / p8->layer_bytes * p8->layer_bytes);
    CHECK(with_disk->n_disk == 32 - with_disk->n_resident - with_disk->host_bytes / p8->layer_bytes);
    GpuPlanInput host_small = host;  // too small for the embedding: it stays on the GPU
    host_small.host_budget_bytes = 2 * c->n_vocab * c->n_embd - 1;
    auto emb_gpu = plan_gpu(*c, host_small);
    REQUIRE(emb_gpu.ok());
    CHECK(!emb_gpu->embedding_on_host);
    CHECK(emb_gpu->n_resident == with_disk->n_resident - 1);
    host.cpu_layers = 5;  // CPU layers need host memory
    auto too_many = plan_gpu(*c, host);
    REQUIRE(!too_many.ok());
    CHECK(too_many.status().message().find("--cpu-layers") != std::string::npos);
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
  TEST_CASE("the plan's predicted step is never faster than its own floor: every preset, weight format, budget, batch and K/V placement, two profiles") {
    HardwareProfile fast_cpu;  // a profile whose CPU-layer rate exceeds its DRAM read, and a slow disk
    fast_cpu.cpu_layer_gbs = 2 * fast_cpu.host_dram_gbs;
    fast_cpu.disk_gbs = 0.5;
    int64_t checked = 0;
    for (const std::string& name : synthetic_preset_names()) {
      auto c = synthetic_config(name);
      REQUIRE(c.ok());
      for (const HardwareProfile& hw : {HardwareProfile{}, fast_cpu})
        for (WeightFormat wf : kWeightFormats)
        for (int64_t budget_g : {0, 4, 8, 16, 24, 40, 80})
          for (int64_t batch : {1, 8, 64})
            for (KvPlace kv : {KvPlace::kAuto, KvPlace::kGpu, KvPlace::kHost}) {
              const int64_t ctx = 1024;
              GpuPlanInput in;
              in.hw = hw;
              in.weights = weight_format_info(wf).dtype;
              in.layer_bytes = gpu_layer_bytes(*c, in.weights);
              in.budget_bytes = budget_g << 30;
              in.max_batch = batch;
              in.kv = kv;
              in.kv_bytes = 2 * c->n_layers * batch * ctx * c->kv_dim() * 2;
              auto p = plan_gpu(*c, in);
              if (!p.ok()) continue;  // below the minimum working set
              const PlanFloor f = plan_floor(*c, *p, batch, hw, static_cast<double>(ctx));
              CAPTURE(name);
              CAPTURE(weight_format_info(wf).name);
              CAPTURE(budget_g);
              CAPTURE(batch);
              CAPTURE(static_cast<int>(kv));
              CHECK(p->predicted_ms >= f.step_ms * (1 - 1e-9));
              ++checked;
            }
    }
    MESSAGE(checked << " plans checked");
    CHECK(checked > 800);
  }

  TEST_CASE("the decode GEMV's measured rate prices GPU layers at one or two rows; the floor keeps the HBM rate") {
    auto c = synthetic_config("llama-2-7b");
    REQUIRE(c.ok());
    GpuPlanInput in;
    in.weights = DType::kNF4;
    in.kv_bytes = int64_t{1} << 30;
    auto fast = plan_gpu(*c, in);  // all resident: the step is the layers' bytes over the HBM rate (+ the head)
    REQUIRE(fast.ok());
    GpuPlanInput slow = in;
    slow.hw.gpu_gemv_nf4_gbs = slow.hw.hbm_gbs / 3;
    slow.hw.gpu_gemv_gbs = slow.hw.hbm_gbs * 2;  // a rate above the HBM rate is capped at it (BF16: the head)
    auto p = plan_gpu(*c, slow);
    REQUIRE(p.ok());
    const double layers_ms = 32.0 * static_cast<double>(p->layer_bytes) / (slow.hw.hbm_gbs * 1e9) * 1e3;
    CHECK(p->predicted_ms - fast->predicted_ms == doctest::Approx(2 * layers_ms).epsilon(1e-6));
    const PlanFloor f = plan_floor(*c, *p, 1, slow.hw), f0 = plan_floor(*c, *fast, 1, in.hw);
    CHECK(f.step_ms == doctest::Approx(f0.step_ms));
    // A decode layer's fixed time (calibrate's gpu_layer_fixed_*) adds to each GPU layer at one or
    // two rows, in its format only; the floor does not count it.
    GpuPlanInput fixed = in;
    fixed.hw.gpu_layer_fixed_nf4_us = 50;
    fixed.hw.gpu_layer_fixed_us = 1000;  // BF16's: not this plan's
    auto pf = plan_gpu(*c, fixed);
    REQUIRE(pf.ok());
    CHECK(pf->predicted_ms - fast->predicted_ms == doctest::Approx(32 * 0.05).epsilon(1e-6));
    CHECK(plan_floor(*c, *pf, 1, fixed.hw).step_ms == doctest::Approx(f0.step_ms));
    fixed.max_batch = 8;  // not measured above two rows
    GpuPlanInput at8 = in;
    at8.max_batch = 8;
    auto p8f = plan_gpu(*c, fixed), p8 = plan_gpu(*c, at8);
    REQUIRE(p8f.ok());
    REQUIRE(p8.ok());
    CHECK(p8f->predicted_ms == doctest::Approx(p8->predicted_ms));
    CHECK(gpu_layer_rate(slow.hw, DType::kNF4, 1) == doctest::Approx(slow.hw.hbm_gbs / 3));
    CHECK(gpu_layer_rate(slow.hw, DType::kNF4, 2) == doctest::Approx(slow.hw.hbm_gbs / 3));
    CHECK(gpu_layer_rate(slow.hw, DType::kNF4, 16) == slow.hw.hbm_gbs);  // the dequantised tile + cuBLAS above
    CHECK(gpu_layer_rate(slow.hw, DType::kBF16, 1) == slow.hw.hbm_gbs);
    CHECK(gpu_layer_rate(slow.hw, DType::kQ8, 1) == slow.hw.hbm_gbs);  // not measured
    // NF4-DQ at NF4's rate per parameter: its bytes' share of NF4's.
    const double dq_share = static_cast<double>(weight_format_bytes(WeightFormat::kNF4DQ, 8192, 8192)) / weight_format_bytes(WeightFormat::kNF4, 8192, 8192);
    CHECK(dq_share == doctest::Approx(0.917).epsilon(1e-3));
    CHECK(gpu_layer_rate(slow.hw, DType::kNF4DQ, 1) == doctest::Approx(slow.hw.hbm_gbs / 3 * dq_share));
    HardwareProfile cpu_nf4 = slow.hw;
    cpu_nf4.cpu_layer_nf4_gbs = 30;
    CHECK(cpu_layer_rate(cpu_nf4, DType::kNF4DQ) == doctest::Approx(30 * dq_share));
    // Measured (calibrate), its own rates.
    cpu_nf4.cpu_layer_nf4dq_gbs = 20;
    cpu_nf4.gpu_gemv_nf4dq_gbs = slow.hw.hbm_gbs / 4;
    CHECK(cpu_layer_rate(cpu_nf4, DType::kNF4DQ) == 20);
    CHECK(gpu_layer_rate(cpu_nf4, DType::kNF4DQ, 1) == doctest::Approx(slow.hw.hbm_gbs / 4));
    slow.hw.gpu_gemv_nf4dq_gbs = 1234;
    // Beside the copy engine a CPU layer keeps its format's measured share, else BF16's.
    HardwareProfile sh = slow.hw;
    sh.cpu_layer_gbs = 100;
    sh.cpu_layer_shared_gbs = 80;
    sh.cpu_layer_nf4dq_gbs = 90;
    CHECK(cpu_layer_shared_share(sh, DType::kNF4DQ) == doctest::Approx(0.8));
    sh.cpu_layer_nf4dq_shared_gbs = 54;
    CHECK(cpu_layer_shared_share(sh, DType::kNF4DQ) == doctest::Approx(0.6));
    CHECK(cpu_layer_shared_share(sh, DType::kBF16) == doctest::Approx(0.8));
    slow.hw.cpu_layer_nf4dq_shared_gbs = 54;
    slow.hw.gpu_layer_fixed_nf4dq_us = 77;
    // The profile keeps them.
    test::TempDir tmp;
    const std::string prof = tmp / "p.json";
    REQUIRE(save_profile(slow.hw, prof).ok());
    ::setenv("FERRY_PROFILE", prof.c_str(), 1);
    const HardwareProfile back = load_profile();
    ::setenv("FERRY_PROFILE", "/nonexistent/ferry-profile.json", 1);
    CHECK(back.gpu_gemv_nf4_gbs == doctest::Approx(slow.hw.gpu_gemv_nf4_gbs));
    CHECK(back.gpu_gemv_nf4dq_gbs == doctest::Approx(1234));
    CHECK(back.cpu_layer_nf4dq_shared_gbs == doctest::Approx(54));
    CHECK(back.gpu_gemv_gbs == doctest::Approx(slow.hw.gpu_gemv_gbs));
    CHECK(back.gpu_gemv_q8_gbs == 0);
    CHECK(back.gpu_layer_fixed_nf4dq_us == doctest::Approx(77));
    CHECK(back.gpu_layer_fixed_us == 0);
  }

  TEST_CASE("the token embedding goes to pinned host memory when the layers do not all fit beside it") {
    auto c = synthetic_config("llama-3-8b");  // untied: 128256 x 4096, 1 GiB in BF16
    REQUIRE(c.ok());
    const int64_t emb = 2 * c->n_vocab * c->n_embd;
    GpuPlanInput in;
    in.kv_bytes = int64_t{256} << 20;
    in.kv = KvPlace::kGpu;
    auto all = plan_gpu(*c, in);  // no budget: everything resident, the embedding too
    REQUIRE(all.ok());
    CHECK(!all->embedding_on_host);
    CHECK(all->globals_bytes == 2 * (2 * c->n_vocab * c->n_embd + c->n_embd));
    in.budget_bytes = int64_t{8} << 30;
    auto p = plan_gpu(*c, in);
    REQUIRE(p.ok());
    CHECK(p->embedding_on_host);
    CHECK(p->embedding_host_bytes == emb);
    CHECK(p->globals_bytes == 2 * (c->n_vocab * c->n_embd + c->n_embd));  // the lm_head and the final norm
    CHECK(p->total_bytes <= in.budget_bytes);
    CHECK(p->total_bytes + p->layer_bytes > in.budget_bytes);
    CHECK(p->describe().find("token embedding in pinned host memory") != std::string::npos);
    // --disk without --host-mem (no pinned memory) keeps it on the GPU: two layers fewer resident.
    GpuPlanInput disk = in;
    disk.have_disk = true;
    auto d = plan_gpu(*c, disk);
    REQUIRE(d.ok());
    CHECK(!d->embedding_on_host);
    CHECK(p->n_resident - d->n_resident >= emb / p->layer_bytes);
    CHECK(p->n_resident - d->n_resident <= emb / p->layer_bytes + 1);
    // A budget that fits everything: it stays. A model whose lm_head is the embedding: it stays.
    in.budget_bytes = all->total_bytes + in.runtime_reserve_bytes + 16 * (int64_t{1} << 20);
    auto roomy = plan_gpu(*c, in);
    REQUIRE(roomy.ok());
    CHECK(roomy->n_resident == c->n_layers);
    CHECK(!roomy->embedding_on_host);
    ModelConfig tied = *c;
    tied.tie_word_embeddings = true;
    in.budget_bytes = int64_t{8} << 30;
    auto t = plan_gpu(tied, in);
    REQUIRE(t.ok());
    CHECK(!t->embedding_on_host);
    // A budget below the minimum working set only with the embedding on the GPU: planned.
    GpuPlanInput tight = in;
    tight.budget_bytes = p->total_bytes - p->n_resident * p->layer_bytes;  // globals without the embedding + slots + the rest
    auto tp = plan_gpu(*c, tight);
    REQUIRE(tp.ok());
    CHECK(tp->embedding_on_host);
    CHECK(tp->n_resident == 0);
    tight.have_disk = true;  // no pinned memory: the error names the minimum
    auto te = plan_gpu(*c, tight);
    REQUIRE(!te.ok());
    CHECK(te.status().message().find("minimum working set") != std::string::npos);
  }

  TEST_CASE("--quant-head: the plan counts the lm_head in its format; the room goes to layers, the floor reads fewer bytes") {
    auto c = synthetic_config("llama-3-70b");
    REQUIRE(c.ok());
    const int64_t V = c->n_vocab, E = c->n_embd;
    GpuPlanInput in;
    in.budget_bytes = int64_t{24} << 30;
    in.kv_bytes = int64_t{64} << 20;
    in.kv = KvPlace::kGpu;
    in.weights = DType::kNF4DQ;
    in.layer_bytes = gpu_layer_bytes(*c, DType::kNF4DQ);
    auto bf = plan_gpu(*c, in);
    REQUIRE(bf.ok());
    CHECK(bf->head_bytes == head_bytes(*c));
    GpuPlanInput q = in;
    q.head_bytes = quant_layout(DType::kQ8, V, E).bytes + 2 * E;
    q.globals_bytes = 2 * V * E + q.head_bytes;
    auto p = plan_gpu(*c, q);
    REQUIRE(p.ok());
    CHECK(p->head_bytes == q.head_bytes);
    CHECK(p->globals_bytes == q.head_bytes);  // the embedding in host memory, the int8 lm_head on the GPU
    CHECK(p->n_resident == bf->n_resident + (head_bytes(*c) - q.head_bytes + (in.budget_bytes - bf->total_bytes)) / in.layer_bytes);
    CHECK(p->n_resident >= bf->n_resident + 2);
    const PlanFloor fb = plan_floor(*c, *bf, 1, in.hw), fq = plan_floor(*c, *p, 1, in.hw);
    CHECK(fq.step_ms < fb.step_ms);
  }

  TEST_CASE("K/V placement: --kv gpu keeps K/V on the GPU or names the budget; host moves them all; auto when needed; split per layer by cost") {
    auto c = synthetic_config("llama-3-8b");
    REQUIRE(c.ok());
    const int64_t L = c->n_layers;
    GpuPlanInput in;
    in.budget_bytes = int64_t{8} << 30;
    in.cpu_layers = 0;
    in.max_batch = 32;
    in.kv_bytes = int64_t{2} << 30;
    in.kv = KvPlace::kGpu;
    auto g = plan_gpu(*c, in);
    REQUIRE(g.ok());
    CHECK(g->n_kv_host == 0);
    CHECK(g->kv_gpu_bytes == in.kv_bytes);
    in.kv = KvPlace::kHost;
    auto h = plan_gpu(*c, in);
    REQUIRE(h.ok());
    CHECK(h->n_kv_host == L);
    CHECK(h->kv_gpu_bytes == 0);
    CHECK(h->n_resident > g->n_resident);  // the K/V's share of the budget went to weights
    // auto: 2 GiB fit beside the working set; they move to the host only where the cost model
    // predicts a step at least 10% shorter than with all of them on the GPU.
    in.kv = KvPlace::kAuto;
    auto fits = plan_gpu(*c, in);
    REQUIRE(fits.ok());
    CHECK((fits->n_kv_host == 0 || fits->predicted_ms <= 0.9 * g->predicted_ms));
    in.kv = KvPlace::kSplit;
    auto fits_split = plan_gpu(*c, in);
    REQUIRE(fits_split.ok());
    CHECK((fits->n_kv_host == 0 || fits->n_kv_host == fits_split->n_kv_host));
    // split: some number of layers in between, streamed layers first, the GPU pool sized to the rest.
    in.kv = KvPlace::kSplit;
    auto a = plan_gpu(*c, in);
    REQUIRE(a.ok());
    CHECK(a->n_kv_host >= 0);
    CHECK(a->kv_gpu_bytes == in.kv_bytes * (L - a->n_kv_host) / L);
    CHECK(a->n_resident >= g->n_resident);
    CHECK(a->total_bytes <= in.budget_bytes);
    for (int64_t il = 0; il < L; ++il)
      if (a->kv_host[il] && a->place[il] == Place::kResident)  // resident layers only once every streamed one is on the host
        for (int64_t j = 0; j < L; ++j) CHECK((a->place[j] != Place::kStreamed || a->kv_host[j]));
    // K/V that cannot fit on the GPU: gpu names the budget; auto puts enough layers on the host.
    in.kv_bytes = int64_t{10} << 30;
    in.kv = KvPlace::kGpu;
    auto big = plan_gpu(*c, in);
    REQUIRE(!big.ok());
    CHECK(big.status().message().find("--gpu-mem") != std::string::npos);
    in.kv = KvPlace::kAuto;
    auto fit = plan_gpu(*c, in);
    REQUIRE(fit.ok());
    CHECK(fit->n_kv_host > 0);
    CHECK(fit->total_bytes <= in.budget_bytes);
    in.kv = KvPlace::kSplit;
    auto fit_split = plan_gpu(*c, in);
    REQUIRE(fit_split.ok());
    CHECK(fit_split->n_kv_host > 0);
    CHECK(fit_split->total_bytes <= in.budget_bytes);
    // Batch 1 with a short context: nothing to gain by splitting, K/V stay on the GPU.
    in.kv_bytes = int64_t{64} << 20;
    in.max_batch = 1;
    auto small = plan_gpu(*c, in);
    REQUIRE(small.ok());
    CHECK(small->n_kv_host == 0);
    // CPU-computed layers always keep their K/V on the host.
    in.kv = KvPlace::kGpu;
    in.cpu_layers = 2;
    auto cpu = plan_gpu(*c, in);
    REQUIRE(cpu.ok());
    CHECK(cpu->n_kv_host == 2);
    // Split at a large batch (llama-3-8b, 16 GiB, 256 sequences x 640 tokens: 20 GiB of K/V).
    {
      GpuPlanInput b;
      b.budget_bytes = int64_t{16} << 30;
      b.cpu_layers = 0;
      b.max_batch = 256;
      b.max_step_tokens = 2048;
      b.kv_bytes = int64_t{20} << 30;
      b.kv = KvPlace::kSplit;
      auto pick = plan_gpu(*c, b);
      REQUIRE(pick.ok());
      const int64_t k = pick->n_kv_host;
      CHECK(k > 0);
      CHECK(k < L);
      // The GPU-K/V layers are resident and spread evenly: one in the middle of each stretch of
      // L / (L - k) layers, so the first layer and no two of them in a row when k >= L / 2.
      const int64_t g = L - k;
      for (int64_t il = 0, j = 0; il < L; ++il) {
        const bool gpu_kv = j < g && il == (2 * j + 1) * L / (2 * g);
        if (gpu_kv) ++j;
        CHECK(pick->kv_host[il] == !gpu_kv);
        if (!pick->kv_host[il]) CHECK(pick->place[il] == Place::kResident);
        if (k >= L / 2 && il > 0 && !pick->kv_host[il]) CHECK(pick->kv_host[il - 1]);
      }
      CHECK(pick->kv_host[0]);
      // Forced counts: exactly k host layers, or an error naming the flag.
      double best = std::numeric_limits<double>::infinity();
      std::vector<std::pair<int64_t, GpuPlan>> all;
      for (int64_t n = 0; n <= L; ++n) {
        b.kv_host_layers = n;
        auto f = plan_gpu(*c, b);
        if (!f.ok()) {
          CHECK(f.status().message().find("--kv-host-layers") != std::string::npos);
          continue;
        }
        CHECK(f->n_kv_host == n);
        CHECK(f->total_bytes <= b.budget_bytes);
        // Every host byte a step reads, over the shared DRAM rate, bounds the prediction.
        const double host_read = static_cast<double>(f->n_streamed * f->layer_bytes) + static_cast<double>(b.kv_bytes) * n / L;
        CHECK(f->predicted_ms >= host_read / (b.hw.dram_shared_gbs * 1e9) * 1e3);
        best = std::min(best, f->predicted_ms);
        all.emplace_back(n, std::move(*f));
      }
      REQUIRE(!all.empty());
      // The choice: within 3% of the best prediction, the fewest streamed layers.
      CHECK(pick->predicted_ms <= best * 1.03 + 1e-9);
      for (const auto& [n, f] : all)
        if (f.predicted_ms <= best * 1.03 + 1e-9) CHECK(pick->n_streamed <= f.n_streamed);
      b.kv_host_layers = L + 1;
      auto over = plan_gpu(*c, b);
      REQUIRE(!over.ok());
      CHECK(over.status().message().find("--kv-host-layers") != std::string::npos);
      // When the shared DRAM rate bounds every plan, trading a layer's K/V for its weights moves
      // about as many host bytes: nothing is gained by streaming more.
      b.kv_host_layers = -1;
      b.hw.dram_shared_gbs /= 4;
      auto slow = plan_gpu(*c, b);
      REQUIRE(slow.ok());
      CHECK(slow->n_streamed <= pick->n_streamed);
    }
    // The floor's host-K/V term: bytes read per step over host DRAM, and none when K/V are on the GPU.
    const PlanFloor fh = plan_floor(*c, *h, 64, in.hw, 1000), fg = plan_floor(*c, *g, 64, in.hw, 1000);
    CHECK(fg.kv_ms == 0);
    CHECK(fh.kv_ms == doctest::Approx(32.0 * 2 * 1024 * 2 * 64 * 1000 / (in.hw.host_dram_gbs * 1e9) * 1e3));
    CHECK(fh.step_ms >= fh.kv_ms);
    CHECK(parse_kv_place("host").ok());
    CHECK(!parse_kv_place("ssd").ok());
  }

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
    ::setenv("FERRY_PROFILE", "/nonexistent/ferry-profile.json", 1);  // the built-in profile, whatever this machine cached
    test::CmdResult r = test::run_ferry("plan --device gpu -m synthetic:llama-2-7b --gpu-mem 8G --batch 1 --context 64 --cpu-layers 0");
    REQUIRE_MESSAGE(r.exit_code == 0, r.output);
    CHECK(r.output.find("placement:  0-14 resident, 15-31 streamed from host") != std::string::npos);
    CHECK(r.output.find("bound by PCIe") != std::string::npos);
    test::CmdResult mixed = test::run_ferry("plan --device gpu -m synthetic:llama-2-7b --gpu-mem 8G --batch 1 --context 64");
    REQUIRE_MESSAGE(mixed.exit_code == 0, mixed.output);
    CHECK(mixed.output.find("0-14 resident, 15 streamed from host, 16 cpu") != std::string::npos);
    CHECK(mixed.output.find("predicted:") != std::string::npos);
    // A forced count of host-K/V layers: printed per layer, and refused without --kv split or
    // beyond the model.
    test::CmdResult forced = test::run_ferry("plan --device gpu -m synthetic:llama-3-8b --gpu-mem 16G --batch 64 --context 640 --cpu-layers 0 --kv split --kv-host-layers 20");
    REQUIRE_MESSAGE(forced.exit_code == 0, forced.output);
    CHECK(forced.output.find("kv:         20 of 32 layers in host memory") != std::string::npos);
    CHECK(forced.output.find("resident (GPU K/V)") != std::string::npos);
    test::CmdResult no_split = test::run_ferry("plan --device gpu -m synthetic:llama-3-8b --gpu-mem 16G --kv-host-layers 20");
    CHECK(no_split.exit_code != 0);
    CHECK(no_split.output.find("--kv-host-layers needs --kv split") != std::string::npos);
    test::CmdResult too_many = test::run_ferry("plan --device gpu -m synthetic:llama-3-8b --gpu-mem 16G --kv split --kv-host-layers 33");
    CHECK(too_many.exit_code != 0);
    CHECK(too_many.output.find("--kv-host-layers 33: the model has 32 layers") != std::string::npos);
    test::CmdResult disk = test::run_ferry("plan --device gpu -m synthetic:llama-2-7b --gpu-mem 8G --host-mem 2G --cpu-layers 0");
    CHECK(disk.exit_code == 1);
    CHECK(disk.output.find("--host-mem") != std::string::npos);
    test::CmdResult all = test::run_ferry("plan --device gpu -m synthetic:llama-2-7b --gpu-mem 40G");
    CHECK(all.exit_code == 0);
    CHECK(all.output.find("placement:  0-31 resident") != std::string::npos);
    CHECK(all.output.find("GPU memory bandwidth") != std::string::npos);
    test::CmdResult small = test::run_ferry("plan --device gpu -m synthetic:llama-2-13b --gpu-mem 2G");
    CHECK(small.exit_code == 1);
    CHECK(small.output.find("--gpu-mem") != std::string::npos);
    CHECK(small.output.find("minimum working set") != std::string::npos);
    test::CmdResult bad = test::run_ferry("plan --device gpu -m synthetic:llama-2-7b --gpu-mem 8Q");
    CHECK(bad.exit_code == 2);
    CHECK(bad.output.find("--gpu-mem") != std::string::npos);
    // --gpu-mem, one rule everywhere: 0 is refused (not "no cap"), a budget below the minimum is
    // refused with the minimum, whatever the command; plan --device cpu plans the emulated device
    // exactly as run does.
    for (const char* cmd : {"plan --device cpu", "plan --device gpu", "run --device cpu -p hi -n 1", "bench --device cpu -n 1 --no-overlap",
                            "logits --device cpu --ids 1,2 --out /tmp/ferry-logits-budget.safetensors"}) {
      const std::string command = cmd;
      CAPTURE(command);
      test::CmdResult zero = test::run_ferry(std::string(cmd) + " -m synthetic:llama-2-7b --layers 2 --gpu-mem 0");
      CHECK(zero.exit_code != 0);
      CHECK(zero.output.find("--gpu-mem 0: a budget must be a positive size") != std::string::npos);
      test::CmdResult tiny = test::run_ferry(std::string(cmd) + " -m synthetic:llama-2-7b --layers 2 --gpu-mem 1M");
      CHECK(tiny.exit_code == 1);
      CHECK(tiny.output.find("--gpu-mem 1.00 MiB is below the minimum working set") != std::string::npos);
    }
    test::CmdResult sweep0 = test::run_ferry("sweep --device cpu -m synthetic:llama-2-7b --layers 2 --gpu-mem 4G,0 -n 1 --out /tmp/ferry-sweep-zero");
    CHECK(sweep0.exit_code != 0);
    CHECK(sweep0.output.find("--gpu-mem 0: a budget must be a positive size") != std::string::npos);
    test::CmdResult emu = test::run_ferry("plan --device cpu -m synthetic:llama-2-7b --gpu-mem 4G");
    CHECK(emu.exit_code == 0);
    CHECK(emu.output.find("device:     cpu (the emulated device") != std::string::npos);
    CHECK(emu.output.find("runtime reserve 0 B") != std::string::npos);
  }
}

#include "cpu/offload_executor.h"

namespace {

// Logits of `ids` through the offload engine on the emulated device: `places` (a letter per layer,
// repeated: R resident, S streamed from host, D streamed from disk, C computed "on the CPU") over a
// budget that fits exactly what the placement needs on the device.
// `embedding_on_host`: the plan's token embedding in host memory (not on the device, not counted).
Expected<std::vector<float>> emulated_logits(WeightStore& ws, const std::string& places, const std::vector<int32_t>& ids, int64_t* peak = nullptr,
                                             bool embedding_on_host = false) {
  const ModelConfig& c = ws.config();
  GpuPlan plan;
  plan.embedding_on_host = embedding_on_host;
  for (int64_t il = 0; il < c.n_layers; ++il) {
    const char p = places[il % places.size()];
    plan.place.push_back(p == 'R' ? Place::kResident : p == 'C' ? Place::kCpu : Place::kStreamed);
    plan.source.push_back(p == 'R' ? Tier::kDevice : p == 'D' ? Tier::kDisk : Tier::kPinnedHost);
  }
  const int64_t lb = cpu::stored_layer_bytes(ws);
  const int64_t emb = embedding_on_host ? static_cast<int64_t>(ws.globals().t[kTokEmbd].nbytes()) : 0;
  const int64_t need = cpu::stored_globals_bytes(ws) - emb + 3 * lb + std::count(plan.place.begin(), plan.place.end(), Place::kResident) * lb;
  FERRY_ASSIGN_OR_RETURN(auto ex, cpu::OffloadCpuExecutor::create(ws, plan, need));
  FERRY_ASSIGN_OR_RETURN(KvCache kv, KvCache::create({c.n_layers, c.n_kv_heads, c.head_dim, 16, 64}));
  Runner r(ws, *ex, kv);
  auto l = prompt_logits(r, ids, 7);  // several steps (as logits_of): the ring wraps across them
  if (peak) *peak = ex->device().peak_bytes();
  if (l.ok()) CHECK(ex->device().peak_bytes() <= need);
  return l;
}

}  // namespace

TEST_SUITE("offload") {
  TEST_CASE("emulated device: resident, streamed from host, streamed from disk and CPU-computed layers give the resident logits bit for bit") {
    for (const char* name : {"llama-gqa", "llama3-tied", "qwen2-bias"}) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      ModelConfig cfg;
      auto ws = resident(dir, &cfg);
      auto g = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(g.ok());
      const auto ids = test::read_i32(**g, "seq1.input_ids");
      const std::vector<float> ref = logits_of(*ws, ids);
      test::TempDir tmp;
      REQUIRE(pack_store(*ws, tmp / "store").ok());
      for (const char* places : {"RRRR", "SSSS", "RSCS", "CCCC", "SCSR"}) {
        const std::string p = places;
        CAPTURE(p);
        auto fresh = resident(dir, &cfg);
        auto l = emulated_logits(*fresh, places, ids);
        REQUIRE_MESSAGE(l.ok(), l.status().message());
        CHECK(*l == ref);
        if (!cfg.tie_word_embeddings) {  // the token embedding left in host memory: the device holds less
          auto moved = resident(dir, &cfg);
          auto le = emulated_logits(*moved, places, ids, nullptr, /*embedding_on_host=*/true);
          REQUIRE_MESSAGE(le.ok(), le.status().message());
          CHECK(*le == ref);
        }
      }
      for (const char* places : {"DDDD", "RDSD", "DCDS", "CDDR"}) {
        const std::string p = places;
        CAPTURE(p);
        auto disk = WeightStore::from_packed(cfg, tmp / "store");
        REQUIRE(disk.ok());
        auto l = emulated_logits(**disk, places, ids);
        REQUIRE_MESSAGE(l.ok(), l.status().message());
        CHECK(*l == ref);
      }
    }
  }

  TEST_CASE("emulated device with --quant nf4 / nf4-dq / int8: streamed, disk and CPU-computed quantised layers give the resident quantised logits bit for bit") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto g = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(g.ok());
    const auto ids = test::read_i32(**g, "seq1.input_ids");
    for (DType q : {DType::kNF4, DType::kNF4DQ, DType::kQ8}) {
      CAPTURE(dtype_name(q));
      ModelConfig cfg;
      auto ws = resident(dir, &cfg);
      REQUIRE(ws->quantize(q).ok());
      CHECK(cpu::stored_layer_bytes(*ws) < layer_layout(cfg, 0, DType::kBF16).bytes);  // the device holds the quantised blocks
      const std::vector<float> ref = logits_of(*ws, ids);
      test::TempDir tmp;
      REQUIRE(pack_store(*ws, tmp / "store").ok());
      for (const char* places : {"SSSS", "RSCS", "CCCC"}) {
        CAPTURE(std::string(places));
        auto fresh = resident(dir, &cfg);
        REQUIRE(fresh->quantize(q).ok());
        auto l = emulated_logits(*fresh, places, ids);
        REQUIRE_MESSAGE(l.ok(), l.status().message());
        CHECK(*l == ref);
        if (!cfg.tie_word_embeddings) {  // the token embedding left in host memory: the device holds less
          auto moved = resident(dir, &cfg);
          REQUIRE(moved->quantize(q).ok());
          auto le = emulated_logits(*moved, places, ids, nullptr, /*embedding_on_host=*/true);
          REQUIRE_MESSAGE(le.ok(), le.status().message());
          CHECK(*le == ref);
        }
      }
      for (const char* places : {"DDDD", "DCDS"}) {
        CAPTURE(std::string(places));
        auto disk = WeightStore::from_packed(cfg, tmp / "store");
        REQUIRE(disk.ok());
        auto l = emulated_logits(**disk, places, ids);
        REQUIRE_MESSAGE(l.ok(), l.status().message());
        CHECK(*l == ref);
      }
    }
  }

  TEST_CASE("emulated device: the budget is enforced; a bad block read by the ring fails the step, naming it") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    ModelConfig cfg;
    auto ws = resident(dir, &cfg);
    GpuPlan plan;
    plan.place.assign(cfg.n_layers, Place::kResident);
    plan.source.assign(cfg.n_layers, Tier::kDevice);
    auto over = cpu::OffloadCpuExecutor::create(*ws, plan, 3 << 20);  // less than the resident weights
    REQUIRE(!over.ok());
    CHECK(over.status().message().find("--gpu-mem") != std::string::npos);
    test::TempDir tmp;
    const std::string store = tmp / "store";
    REQUIRE(pack_store(*ws, store).ok());
    auto m = open_store(store, cfg);
    REQUIRE(m.ok());
    flip_byte(store + "/weights.bin", m->blocks[4].offset + 77);  // layer 3
    auto disk = WeightStore::from_packed(cfg, store);
    REQUIRE(disk.ok());
    auto l = emulated_logits(**disk, "RRDD", {1, 2, 3});
    REQUIRE(!l.ok());
    CHECK(l.status().message().find("layer.3") != std::string::npos);
    CHECK(l.status().message().find("checksum mismatch") != std::string::npos);
  }

  TEST_CASE("CLI: ferry logits --device cpu --gpu-mem/--host-mem/--disk/--cpu-layers equal the plain CPU logits; bench and sweep write their files") {
    ::setenv("FERRY_PROFILE", "/nonexistent/ferry-profile.json", 1);
    const std::string dir = test::shared_dir() + "/models/stories260K";
    test::TempDir tmp;
    const std::string ids = "1,403,407,261,378,182,2,100,300";
    auto logits = [&](const std::string& extra, const std::string& out) {
      test::CmdResult r = test::run_ferry("logits -m " + dir + " --device cpu --ids " + ids + " --out " + out + " " + extra);
      REQUIRE_MESSAGE(r.exit_code == 0, r.output);
      auto f = SafetensorsFile::open(out);
      REQUIRE(f.ok());
      return test::read_f32(**f, "logits");
    };
    const auto ref = logits("", tmp / "ref.st");
    REQUIRE(test::run_ferry("pack -m " + dir + " --out " + (tmp / "store")).exit_code == 0);
    int i = 0;
    const std::string store = tmp / "store";
    for (const std::string& extra : std::vector<std::string>{"--gpu-mem 1M", "--gpu-mem 1M --cpu-layers 2", "--cpu-layers 5", "--disk " + store + " --gpu-mem 1M",
                                                             "--disk " + store + " --gpu-mem 1M --host-mem 200K --cpu-layers 1"}) {
      CAPTURE(extra);
      std::string name = "e";
      name += std::to_string(i++);
      name += ".st";
      CHECK(logits(extra, tmp / name) == ref);
    }
    test::CmdResult tiny = test::run_ferry("logits -m " + dir + " --device cpu --ids 1,2 --out " + (tmp / "x.st") + " --gpu-mem 10K");
    CHECK(tiny.exit_code == 1);
    CHECK(tiny.output.find("minimum working set") != std::string::npos);
    // bench and sweep on the emulated device.
    test::CmdResult b = test::run_ferry("bench -m " + dir + " --device cpu --gpu-mem 1M --batch 1,2 -n 4 --json " + (tmp / "b.json"));
    REQUIRE_MESSAGE(b.exit_code == 0, b.output);
    CHECK(b.output.find("overlap") != std::string::npos);
    test::CmdResult sw = test::run_ferry("sweep -m " + dir + " --device cpu --gpu-mem 10K,1M,4M --batch 1 -n 4 --no-overlap --out " + (tmp / "sw"));
    REQUIRE_MESSAGE(sw.exit_code == 0, sw.output);
    for (const char* ext : {".csv", ".json", ".svg"}) CHECK(fs::file_size(tmp / (std::string("sw") + ext)) > 100);
    std::ifstream csv(tmp / "sw.csv");
    std::string header, line;
    std::getline(csv, header);
    CHECK(header.find("decode_tok_s") != std::string::npos);
    int rows = 0;
    while (std::getline(csv, line)) ++rows;
    CHECK(rows == 3);  // 10K is recorded as not run, with its error
  }

  TEST_CASE("ferry calibrate measures and caches a profile that plan then reads") {
    test::TempDir tmp;
    const std::string prof = tmp / "profile.json";
    ::setenv("FERRY_PROFILE", prof.c_str(), 1);
    test::CmdResult r = test::run_ferry("calibrate --dir " + std::string(tmp.path) + " --threads 2");
    REQUIRE_MESSAGE(r.exit_code == 0, r.output);
    CHECK(r.output.find("host DRAM:") != std::string::npos);
    CHECK(r.output.find("shared:") != std::string::npos);
    auto j = nlohmann::json::parse(std::ifstream(prof));
    CHECK(j["host_dram_gbs"].get<double>() > 0);
    CHECK(j["dram_shared_gbs"].get<double>() > 0);
    CHECK(j["disk_gbs"].get<double>() > 0);
    CHECK(j["cpu_layer_nf4_gbs"].get<double>() > 0);
    CHECK(j["cpu_layer_q8_gbs"].get<double>() > 0);
    test::CmdResult p = test::run_ferry("plan -m synthetic:llama-2-7b --gpu-mem 8G");
    CAPTURE(p.output);
    CAPTURE(r.output);
    CHECK(p.output.find(prof) != std::string::npos);  // the profile named as the source of the rates
    ::setenv("FERRY_PROFILE", "/nonexistent/ferry-profile.json", 1);
  }
}

TEST_SUITE("offload") {
  TEST_CASE("K/V disk tier: spilled blocks come back bit for bit, coldest first; a changed record is an error naming the file") {
    test::TempDir tmp;
    const std::string dir = tmp.path.string();
    // A file of 3 records: write, read back, and a flipped byte fails the checksum.
    {
      auto f = KvDiskFile::create(dir, 5000, 3);  // rounded up to 8 KiB records
      REQUIRE_MESSAGE(f.ok(), f.status().message());
      CHECK((*f)->record_bytes() == 8192);
      HostBuffer a(8192, 4096), b(8192, 4096), c(8192, 4096);
      for (int i = 0; i < 8192; ++i) a.as<uint8_t>()[i] = static_cast<uint8_t>(i * 7 + 1), b.as<uint8_t>()[i] = static_cast<uint8_t>(i * 13 + 5);
      REQUIRE((*f)->write({2, 0}, {a.data(), b.data()}).ok());
      HostBuffer x(8192, 4096), y(8192, 4096);
      REQUIRE((*f)->read({0, 2}, {x.data(), y.data()}).ok());
      CHECK(std::memcmp(x.data(), b.data(), 8192) == 0);
      CHECK(std::memcmp(y.data(), a.data(), 8192) == 0);
      CHECK(!(*f)->read({1}, {c.data()}).ok());  // never written
      // One byte of record 2 changed behind ferry's back (aligned: the file may be O_DIRECT).
      HostBuffer page(4096, 4096);
      REQUIRE(::pread((*f)->fd(), page.data(), 4096, 2 * 8192) == 4096);
      page.as<uint8_t>()[100] ^= 0x5a;
      REQUIRE(::pwrite((*f)->fd(), page.data(), 4096, 2 * 8192) == 4096);
      Status bad = (*f)->read({2}, {c.data()});
      CHECK(bad.code() == ErrorCode::kCorrupt);
      CHECK(bad.message().find(dir) != std::string::npos);
      CHECK(bad.message().find("record 2") != std::string::npos);
    }
    CHECK(!KvDiskFile::create(dir + "/missing", 4096, 1).ok());
    CHECK(std::filesystem::is_empty(tmp.path));  // an anonymous file: nothing left behind

    // A cache of 4 host blocks of 4 tokens and 8 disk records: three sequences of 8 tokens (2
    // blocks each) cannot all be resident; making one resident spills the coldest.
    KvCacheShape shape{2, 2, 4, 4, 4, DType::kBF16};
    auto kv = KvCache::create(shape);
    REQUIRE(kv.ok());
    REQUIRE(kv->enable_disk(dir, 8).ok());
    CHECK(kv->n_free_blocks() == 12);
    auto value = [](int s, int64_t il, int64_t pos, int64_t h, int64_t i, int kv_) {
      return static_cast<float>(s * 1000 + il * 100 + pos * 10 + h * 4 + i) * (kv_ ? -0.5f : 0.25f);
    };
    std::vector<int32_t> seqs;
    for (int s = 0; s < 3; ++s) {
      const int32_t q = kv->add_sequence();
      seqs.push_back(q);
      REQUIRE(kv->reserve(q, 8).ok());
      kv->begin_step();
      auto ok = kv->make_resident(q, 8);
      REQUIRE(ok.ok());
      REQUIRE(*ok);
      for (int64_t il = 0; il < 2; ++il)
        for (int64_t pos = 0; pos < 8; ++pos) {
          float k[8], v[8];
          for (int h = 0; h < 2; ++h)
            for (int i = 0; i < 4; ++i) k[h * 4 + i] = value(s, il, pos, h, i, 0), v[h * 4 + i] = value(s, il, pos, h, i, 1);
          kv->append(il, q, pos, k, v);
        }
      kv->set_length(q, 8);
    }
    CHECK(kv->n_free_blocks() == 6);
    CHECK(kv->blocks_spilled() == 2);  // sequence 0 (the coldest) went to disk for sequence 2
    CHECK(!kv->resident(seqs[0], 8));
    CHECK(kv->resident(seqs[1], 8));
    CHECK(kv->resident(seqs[2], 8));
    // Two sequences pinned in one step leave no room for the third.
    kv->begin_step();
    REQUIRE(*kv->make_resident(seqs[1], 8));
    REQUIRE(*kv->make_resident(seqs[2], 8));
    auto no = kv->make_resident(seqs[0], 8);
    REQUIRE(no.ok());
    CHECK(!*no);
    CHECK(!kv->resident(seqs[0], 8));
    // Next step: sequence 0 comes back (sequence 1, now the coldest, goes out), bit for bit.
    kv->begin_step();
    REQUIRE(*kv->make_resident(seqs[2], 8));
    REQUIRE(*kv->make_resident(seqs[0], 8));
    CHECK(kv->blocks_restored() == 2);
    CHECK(!kv->resident(seqs[1], 8));
    for (int s : {0, 2})
      for (int64_t il = 0; il < 2; ++il)
        for (int64_t pos = 0; pos < 8; ++pos) {
          float k[8], v[8];
          kv->read(il, seqs[s], pos, k, v);
          for (int h = 0; h < 2; ++h)
            for (int i = 0; i < 4; ++i) {
              CHECK(k[h * 4 + i] == bf16_to_f32(f32_to_bf16(value(s, il, pos, h, i, 0))));
              CHECK(v[h * 4 + i] == bf16_to_f32(f32_to_bf16(value(s, il, pos, h, i, 1))));
            }
        }
    // Freeing returns host blocks and records; the cache holds only what it has room for.
    for (int32_t q : seqs) kv->free_sequence(q);
    CHECK(kv->n_free_blocks() == 12);
    const int32_t big = kv->add_sequence();
    CHECK(kv->reserve(big, 48).ok());
    CHECK(!kv->reserve(big, 49).ok());
    kv->free_sequence(big);
    // The disk tier takes every layer's K/V: a cache with GPU-held layers refuses it.
    auto part = KvCache::create(shape, std::vector<bool>{true, false});
    REQUIRE(part.ok());
    Status refused = part->enable_disk(dir, 8);
    CHECK(!refused.ok());
    CHECK(refused.message().find("--kv host") != std::string::npos);
  }

  TEST_CASE("staging ring: a layer may end after the next one begins; no slot is refilled before its layer ends") {
    // The GPU executor ends a host-K/V layer's slot only once the next layer's first part is issued.
    for (int n_slots : {2, 3}) {
      EmulatedDevice dev(0);
      const int64_t bytes = 4096;
      std::vector<std::vector<uint8_t>> host(4, std::vector<uint8_t>(bytes));
      std::vector<RingLayer> order;
      for (int l = 0; l < 4; ++l) {
        std::fill(host[l].begin(), host[l].end(), static_cast<uint8_t>(l + 1));
        order.push_back(RingLayer{l, host[l].data(), -1});
      }
      RingOptions opts;
      opts.n_slots = n_slots;
      auto ring = StagingRing::create(dev, order, bytes, nullptr, opts);
      REQUIRE_MESSAGE(ring.ok(), ring.status().message());
      auto holds = [&](const void* slot, int l) {
        const uint8_t* p = static_cast<const uint8_t*>(slot);
        return std::all_of(p, p + bytes, [&](uint8_t x) { return x == l + 1; });
      };
      const void* prev = (*ring)->begin(0);
      CHECK(holds(prev, 0));
      for (int u = 1; u < 10; ++u) {  // wraps twice
        const void* cur = (*ring)->begin(u % 4);
        CHECK(holds(cur, u % 4));
        CHECK(holds(prev, (u - 1) % 4));  // the earlier layer, still not ended, is intact
        (*ring)->end();
        prev = cur;
      }
      (*ring)->end();
      dev.synchronize();
      CHECK((*ring)->bytes_copied() >= 10 * bytes);
    }
  }

  TEST_CASE("K/V bulk append: a prompt's rows spread over threads land exactly where one-at-a-time appends put them") {
    // Two prompts (300 and 37 tokens, the first starting mid-block) and three decode tokens, in one
    // call (over the 16-token threshold: the parallel path), then three decode tokens alone (the
    // calling thread).
    KvCacheShape shape{2, 4, 32, 16, 128, DType::kBF16};
    auto a = KvCache::create(shape), b = KvCache::create(shape);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    std::vector<int32_t> seqs, pos;
    for (int s = 0; s < 5; ++s) {
      CHECK(a->add_sequence() == s);
      CHECK(b->add_sequence() == s);
      REQUIRE(a->reserve(s, 320).ok());
      REQUIRE(b->reserve(s, 320).ok());
    }
    for (int s : {2, 3, 4}) seqs.push_back(s), pos.push_back(40 + s);
    for (int p = 5; p < 305; ++p) seqs.push_back(0), pos.push_back(p);
    for (int p = 0; p < 37; ++p) seqs.push_back(1), pos.push_back(p);
    const int64_t n = static_cast<int64_t>(seqs.size()), W = 3 * shape.n_kv_heads * shape.head_dim;
    std::vector<uint16_t> rows(n * W);
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = f32_to_bf16(static_cast<float>((i * 2654435761u) % 2000) / 1000.0f - 1.0f);
    const int64_t k_off = shape.n_kv_heads * shape.head_dim, v_off = 2 * k_off;
    for (int64_t il = 0; il < 2; ++il) {
      for (int64_t t = 0; t < n; ++t) a->append_bf16(il, seqs[t], pos[t], rows.data() + t * W + k_off, rows.data() + t * W + v_off);
      b->append_rows_bf16(il, n, seqs.data(), pos.data(), rows.data() + k_off, rows.data() + v_off, W);
      const KvLayerView x = a->layer_view(il), y = b->layer_view(il);
      const size_t bytes = static_cast<size_t>(shape.n_blocks * x.block_elems() * 2);
      CHECK(std::memcmp(x.k, y.k, bytes) == 0);
      CHECK(std::memcmp(x.v, y.v, bytes) == 0);
      const int32_t dseq[3] = {2, 3, 4}, dpos[3] = {43, 44, 45};
      for (int t = 0; t < 3; ++t) a->append_bf16(il, dseq[t], dpos[t], rows.data() + t * W + v_off, rows.data() + t * W + k_off);
      b->append_rows_bf16(il, 3, dseq, dpos, rows.data() + v_off, rows.data() + k_off, W);
      CHECK(std::memcmp(x.k, y.k, bytes) == 0);
      CHECK(std::memcmp(x.v, y.v, bytes) == 0);
    }
    // And the values are where read() finds them.
    float k[4 * 32], v[4 * 32];
    b->read(1, 0, 200, k, v);
    const int64_t t = 3 + 195;
    CHECK(k[37] == bf16_to_f32(rows[t * W + k_off + 37]));
    CHECK(v[100] == bf16_to_f32(rows[t * W + v_off + 100]));
  }

  TEST_CASE("K/V huge pages: the pools are zeroed and counted; a collapse the kernel grants is seen in smaps") {
    // 2 layers of 4 MiB pools (K and V each): huge pages advised, zeroed, counted from /proc/self/smaps.
    KvCacheShape shape{2, 4, 64, 16, 256, DType::kBF16};
    auto kv = KvCache::create(shape);
    REQUIRE(kv.ok());
    CHECK(kv->host_bytes() == shape.bytes());
    CHECK(kv->huge_page_bytes() >= 0);
    CHECK(kv->huge_page_bytes() <= kv->host_bytes());
    const KvLayerView x = kv->layer_view(1);
    const size_t pool = static_cast<size_t>(shape.n_blocks * x.block_elems() * 2);
    const auto* k16 = static_cast<const uint16_t*>(x.k);
    CHECK(std::all_of(k16, k16 + pool / 2, [](uint16_t h) { return h == 0; }));
    // The parser against the kernel: where MADV_COLLAPSE succeeds on a touched 4 MiB range, smaps must
    // show huge pages over it; a range outside every mapping counts nothing.
    HostBuffer b(size_t{4} << 20, HostBuffer::kHugePage);
    REQUIRE(b.data() != nullptr);
    b.advise_huge_pages();
    b.zero();
    if (collapse_huge_pages(b.data(), b.size()))
      CHECK(huge_page_bytes({{b.data(), b.size()}}) == static_cast<int64_t>(b.size()));
    else
      MESSAGE("MADV_COLLAPSE refused here (", std::strerror(errno), "): only the bounds are checked");
    CHECK(huge_page_bytes({{b.data(), b.size()}}) <= static_cast<int64_t>(b.size()));
    CHECK(huge_page_bytes({{reinterpret_cast<const void*>(uintptr_t{4096}), 4096}}) == 0);
  }
}
