// The model path against transformers: every golden model and sequence (logits, greedy ids where
// the reference margin is clear), decode-with-KV against prefill, batches of sequences of different
// lengths, chunked prefill, and the real stories260K model (llama2.c's story, token for token).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "cpu/cpu_executor.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"
#include "models/checkpoint.h"
#include "models/synthetic.h"
#include "models/weight_format.h"
#include "offload/layer_layout.h"
#include "offload/packed_store.h"
#include "runtime/budget.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/serve.h"
#include "test_util.h"

using namespace ferry;

namespace {

struct Loaded {
  Model model;
  std::unique_ptr<cpu::CpuExecutor> ex;
  std::unique_ptr<KvCache> kv;
  std::unique_ptr<Runner> runner;
};

Loaded load(const std::string& dir, int64_t kv_tokens = 4096, int64_t block_size = 16, DType kv_dtype = DType::kF32,
            DType quant = DType::kBF16, const std::string& disk = "", DType quant_head = DType::kBF16) {
  Loaded l;
  auto m = load_model(dir, LoadOptions{.synthetic_layers = 0, .need_tokenizer = false, .disk = disk, .quant = quant, .quant_head = quant_head});
  REQUIRE_MESSAGE(m.ok(), m.status().message());
  l.model = std::move(*m);
  l.ex = std::make_unique<cpu::CpuExecutor>(l.model.config);
  KvCacheShape s{l.model.config.n_layers, l.model.config.n_kv_heads, l.model.config.head_dim, block_size, kv_tokens / block_size, kv_dtype};
  auto kv = KvCache::create(s);
  REQUIRE(kv.ok());
  l.kv = std::make_unique<KvCache>(std::move(*kv));
  l.runner = std::make_unique<Runner>(*l.model.weights, *l.ex, *l.kv);
  return l;
}

// Writes `dir`'s checkpoint to `out` in float32 with every Linear weight inside the decoder layers
// passed through `round` (its shape given), and copies config.json: a reference for quantised formats.
// `head_too`: the lm_head as well.
template <typename Round>
void write_rounded(const std::string& dir, const test::TempDir& out, Round round, bool head_too = false) {
  auto ck = CheckpointReader::open(dir);
  REQUIRE(ck.ok());
  std::vector<std::vector<float>> data;
  std::vector<TensorToWrite> tensors;
  const std::vector<std::string> names = (*ck)->names();
  data.reserve(names.size());
  for (const std::string& name : names) {
    const auto f = (*ck)->find(name);
    TensorView v = f.file->view(*f.entry);
    std::vector<float> w(static_cast<size_t>(v.numel()));
    convert_to_f32(v.data, v.dtype, w.data(), w.size());
    if ((name.find("model.layers.") == 0 && name.find("_proj.weight") != std::string::npos) || (head_too && name == "lm_head.weight"))
      round(w, f.entry->shape);
    data.push_back(std::move(w));
    tensors.push_back({name, DType::kF32, f.entry->shape, data.back().data()});
  }
  REQUIRE(write_safetensors(out / "model.safetensors", tensors).ok());
  std::filesystem::copy_file(dir + "/config.json", out / "config.json");
}

// Rounds a [shape[0], shape[1]] float32 weight through the codec of `t` in place.
void round_through(DType t, std::vector<float>& w, const std::vector<int64_t>& shape) {
  std::vector<uint8_t> blob(quant_layout(t, shape[0], shape[1]).bytes);
  quantize_weight(t, w.data(), shape[0], shape[1], blob.data());
  dequantize_rows(t, blob.data(), shape[0], shape[1], 0, shape[0], w.data());
}

// max|a - b| / max|b|
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double d = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, static_cast<double>(std::fabs(a[i] - b[i])));
    m = std::max(m, static_cast<double>(std::fabs(b[i])));
  }
  return d / m;
}

const char* kGolden[] = {"llama-gqa", "llama3-tied", "qwen2-bias"};


// Packs `l`'s weights into a store and checks it: the fused tensor `fused` is stored as `dt`; read
// back, the store gives `want`'s logits for `ids`; asked for the `other` format, loading it is refused
// with a message containing `fix`.
void check_packed_store(const Loaded& l, const std::string& dir, const std::vector<int32_t>& ids, const std::vector<float>& want,
                        const std::string& fused, DType dt, DType other, const std::string& fix) {
  test::TempDir tmp;
  const std::string store = tmp / "store";
  REQUIRE(pack_store(*l.model.weights, store).ok());
  auto man = open_store(store, l.model.config);
  REQUIRE(man.ok());
  bool has_fused = false;
  for (const auto& t : man->blocks[1].tensors) has_fused |= t.name == fused && t.dtype == dt;
  CHECK(has_fused);
  Loaded ld = load(dir, 4096, 16, DType::kF32, DType::kBF16, store);
  auto from_disk = prompt_logits(*ld.runner, ids);
  REQUIRE(from_disk.ok());
  CHECK(*from_disk == want);
  auto mixed = load_model(dir, LoadOptions{.need_tokenizer = false, .disk = store, .quant = other});
  REQUIRE(!mixed.ok());
  CHECK(mixed.status().message().find(fix) != std::string::npos);
}

}  // namespace

TEST_SUITE("model") {
  TEST_CASE("golden logits and greedy ids on the CPU backend") {
    for (const char* name : kGolden) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      Loaded l = load(dir);
      auto g = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(g.ok());
      const int64_t V = l.model.config.n_vocab;
      for (int s = 0;; ++s) {
        const std::string seq = "seq" + std::to_string(s);
        const auto ids = test::read_i32(**g, seq + ".input_ids");
        if (ids.empty()) {
          CHECK(s >= 2);
          break;
        }
        CAPTURE(name);
        CAPTURE(seq);
        // Logits at every position.
        auto logits = prompt_logits(*l.runner, ids);
        REQUIRE(logits.ok());
        const double err = rel_err(*logits, test::read_f32(**g, seq + ".logits"));
        MESSAGE(name << " " << seq << " logits max|d|/max|ref| = " << err);
        CHECK(err <= 1e-3);

        const auto ref_ids = test::read_i32(**g, seq + ".greedy_ids");
        const auto margin = test::read_f32(**g, seq + ".greedy_margin");
        REQUIRE(ref_ids.size() == margin.size());
        // Teacher-forced: the argmax after prompt + reference prefix, wherever the margin is clear.
        std::vector<int32_t> full = ids;
        full.insert(full.end(), ref_ids.begin(), ref_ids.end() - 1);
        auto tf = prompt_logits(*l.runner, full);
        REQUIRE(tf.ok());
        for (size_t i = 0; i < ref_ids.size(); ++i) {
          if (margin[i] < 1e-2f) continue;
          const float* row = tf->data() + (ids.size() - 1 + i) * V;
          CHECK_MESSAGE(argmax(row, V) == ref_ids[i], "teacher-forced step " << i);
        }
        // Free-running greedy decode through the KV cache, until a step whose margin is unclear.
        GenerateOptions go;
        go.n_predict = static_cast<int64_t>(ref_ids.size());
        go.sampling.temperature = 0;
        go.stop_at_eos = false;
        auto res = generate(*l.runner, {ids}, go);
        REQUIRE(res.ok());
        REQUIRE(res->tokens[0].size() == ref_ids.size());
        for (size_t i = 0; i < ref_ids.size(); ++i) {
          if (res->tokens[0][i] == ref_ids[i]) continue;
          CHECK_MESSAGE(margin[i] < 1e-2f, "greedy step " << i << " differs where the margin is " << margin[i]);
          break;
        }
      }
    }
  }

  TEST_CASE("a batch of sequences of different lengths equals each alone; chunked prefill equals one step") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto g = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(g.ok());
    const auto a = test::read_i32(**g, "seq0.input_ids");
    const auto b = test::read_i32(**g, "seq1.input_ids");
    REQUIRE(a.size() != b.size());
    Loaded l = load(dir, 1024, 4);  // small blocks: sequences span many, partly filled
    GenerateOptions go;
    go.n_predict = 12;
    go.sampling.temperature = 0;
    go.stop_at_eos = false;
    auto alone_a = generate(*l.runner, {a}, go);
    auto alone_b = generate(*l.runner, {b}, go);
    go.max_step_tokens = 7;  // prefill cut across and inside prompts
    auto both = generate(*l.runner, {a, b}, go);
    REQUIRE(alone_a.ok());
    REQUIRE(alone_b.ok());
    REQUIRE(both.ok());
    CHECK(both->tokens[0] == alone_a->tokens[0]);
    CHECK(both->tokens[1] == alone_b->tokens[0]);
    CHECK(l.kv->n_free_blocks() == 1024 / 4);  // every block came back

    auto full = prompt_logits(*l.runner, b, 4096);
    auto chunked = prompt_logits(*l.runner, b, 5);
    REQUIRE(full.ok());
    REQUIRE(chunked.ok());
    CHECK(rel_err(*chunked, *full) < 1e-5);
  }

  TEST_CASE("K/V on disk: golden logits with the sequence spilled and read back between chunks; serve over a disk tier gives each request what it gets alone") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto g = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(g.ok());
    const auto ids = test::read_i32(**g, "seq1.input_ids");
    const auto ref = test::read_f32(**g, "seq1.logits");
    const int64_t n = static_cast<int64_t>(ids.size());
    test::TempDir tmp;
    // A host pool of exactly one sequence's blocks, and a second sequence that takes all of it
    // between the chunks of the first: every block of the first goes to disk and comes back.
    const int64_t blocks = (n + 3) / 4;
    Loaded l = load(dir, blocks * 4, 4);
    REQUIRE(l.kv->enable_disk(tmp.path.string(), 2 * blocks).ok());
    bool spilled = false;
    auto all = test::logits_with_spills(*l.runner, ids, 5, &spilled);
    REQUIRE_MESSAGE(all.ok(), all.status().message());
    CHECK(spilled);
    CHECK(l.kv->blocks_spilled() >= blocks);
    CHECK(l.kv->blocks_restored() >= blocks);
    const double err = rel_err(*all, ref);
    MESSAGE("K/V through disk: logits max|d|/max|ref| = " << err);
    CHECK(err <= 1e-3);
    // Bit for bit what the same chunks give without a disk tier.
    Loaded plain = load(dir, 1024, 4);
    auto want = prompt_logits(*plain.runner, ids, 5);
    REQUIRE(want.ok());
    CHECK(rel_err(*all, *want) == 0);

    // Throughput mode over a host pool that holds 2 of 6 requests at a time: admission counts the
    // disk's blocks, steps take the sequences that fit, and each request gets its tokens alone.
    std::vector<ServeRequest> reqs(6);
    std::vector<std::vector<int32_t>> alone;
    for (size_t i = 0; i < reqs.size(); ++i) {
      reqs[i].prompt.assign(ids.begin(), ids.begin() + 3 + static_cast<int64_t>(i) % 4);
      reqs[i].max_tokens = 9 + static_cast<int64_t>(i);
      GenerateOptions go;
      go.n_predict = reqs[i].max_tokens;
      go.sampling.temperature = 0;
      go.stop_at_eos = false;
      auto r = generate(*plain.runner, {reqs[i].prompt}, go);
      REQUIRE(r.ok());
      alone.push_back(r->tokens[0]);
    }
    Loaded s = load(dir, 2 * 5 * 4, 4);  // 10 blocks: each request needs 4 or 5
    REQUIRE(s.kv->enable_disk(tmp.path.string(), 40).ok());
    ServeOptions so;
    so.batch = 6;
    so.max_step_tokens = 16;
    so.sampling.temperature = 0;
    so.stop_at_eos = false;
    std::vector<ServeResult> got;
    auto st = serve(*s.runner, reqs, so, got);
    REQUIRE_MESSAGE(st.ok(), st.status().message());
    CHECK(st->peak_live == 6);
    CHECK(st->blocks_spilled > 0);
    CHECK(st->blocks_restored > 0);
    for (size_t i = 0; i < reqs.size(); ++i) {
      CAPTURE(i);
      CHECK(got[i].tokens == alone[i]);
    }
    CHECK(s.kv->n_free_blocks() == s.kv->capacity());
  }

  TEST_CASE("stories260K: llama2.c's reference story token for token, and prompt logits") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    Loaded l = load(dir, 1024);
    auto g = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(g.ok());
    const auto story = test::read_i32(**g, "bos.greedy_ids");
    REQUIRE(story.size() == 256);
    GenerateOptions go;
    go.n_predict = 256;
    go.sampling.temperature = 0;
    go.stop_at_eos = false;
    auto res = generate(*l.runner, {{1}}, go);
    REQUIRE(res.ok());
    CHECK(res->tokens[0] == story);

    const auto ids = test::read_i32(**g, "prompt.input_ids");
    auto logits = prompt_logits(*l.runner, ids);
    REQUIRE(logits.ok());
    CHECK(rel_err(*logits, test::read_f32(**g, "prompt.logits")) <= 1e-3);
    go.n_predict = 64;
    auto cont = generate(*l.runner, {ids}, go);
    REQUIRE(cont.ok());
    CHECK(cont->tokens[0] == test::read_i32(**g, "prompt.greedy_ids"));
  }

  TEST_CASE("throughput mode: continuous batching gives each request what it gets alone; BF16 host KV stays on the story") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    auto g = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(g.ok());
    const auto prompt = test::read_i32(**g, "prompt.input_ids");
    // Requests of different prompt lengths and budgets: more than the batch, so some are admitted
    // mid-run into steps that mix decode tokens with prompt chunks (step tokens 12 cut prompts).
    std::vector<ServeRequest> reqs;
    for (int i = 0; i < 7; ++i) {
      ServeRequest r;
      r.prompt.assign(prompt.begin(), prompt.begin() + std::min<size_t>(prompt.size(), 3 + 5 * i));
      r.max_tokens = 10 + 7 * (i % 3);
      reqs.push_back(r);
    }
    Loaded alone = load(dir, 1024);
    std::vector<std::vector<int32_t>> want;
    for (const auto& r : reqs) {
      GenerateOptions go;
      go.n_predict = r.max_tokens;
      go.sampling.temperature = 0;
      go.stop_at_eos = false;
      auto res = generate(*alone.runner, {r.prompt}, go);
      REQUIRE(res.ok());
      want.push_back(res->tokens[0]);
    }
    Loaded l = load(dir, 256);  // 16 blocks: admission waits for blocks as well as batch slots
    ServeOptions so;
    so.batch = 3;
    so.max_step_tokens = 12;
    so.sampling.temperature = 0;
    so.stop_at_eos = false;
    std::vector<ServeResult> got;
    int64_t done_calls = 0;
    auto st = serve(*l.runner, reqs, so, got, [&](int64_t, const ServeResult&) { ++done_calls; });
    REQUIRE_MESSAGE(st.ok(), st.status().message());
    CHECK(done_calls == 7);
    CHECK(st->generated_tokens == [&] { int64_t n = 0; for (auto& r : reqs) n += r.max_tokens; return n; }());
    CHECK(st->peak_live <= 3);
    for (size_t i = 0; i < reqs.size(); ++i) {
      CAPTURE(i);
      CHECK(got[i].tokens == want[i]);
      CHECK(got[i].ttft_ms <= got[i].latency_ms);
    }
    CHECK(l.kv->n_free_blocks() == l.kv->shape().n_blocks);
    // Whole prompts: 10-token prompts in 16-token steps are cut in two unless a prompt that does
    // not fit waits for the next step; either way each request gets the same tokens.
    {
      std::vector<ServeRequest> tens(5);
      for (auto& r : tens) {
        r.prompt.assign(prompt.begin(), prompt.begin() + 10);
        r.max_tokens = 6;
      }
      GenerateOptions go;
      go.n_predict = 6;
      go.sampling.temperature = 0;
      go.stop_at_eos = false;
      auto res = generate(*alone.runner, {tens[0].prompt}, go);
      REQUIRE(res.ok());
      ServeOptions wo = so;
      wo.max_step_tokens = 16;
      for (bool whole : {false, true}) {
        CAPTURE(whole);
        wo.whole_prompts = whole;
        std::vector<ServeResult> out;
        auto w = serve(*l.runner, tens, wo, out);
        REQUIRE_MESSAGE(w.ok(), w.status().message());
        CHECK((w->split_prompts == 0) == whole);
        for (const auto& o : out) CHECK(o.tokens == res->tokens[0]);
      }
    }
    // Refusals name the request.
    std::vector<ServeRequest> bad = {reqs[0]};
    bad[0].prompt.push_back(100000);
    auto e = serve(*l.runner, bad, so, got);
    REQUIRE(!e.ok());
    CHECK(e.status().message().find("request 0") != std::string::npos);
    bad[0] = reqs[0];
    bad[0].max_tokens = 10000;  // more blocks than the whole cache
    CHECK(!serve(*l.runner, bad, so, got).ok());

    // The CPU executor over a BF16 host cache (what the GPU's host-KV layers use): the reference
    // story's first 64 tokens still come out.
    auto m = load_model(dir, LoadOptions{.synthetic_layers = 0, .need_tokenizer = false});
    REQUIRE(m.ok());
    cpu::CpuExecutor ex(m->config);
    auto kv = KvCache::create({m->config.n_layers, m->config.n_kv_heads, m->config.head_dim, 16, 64, DType::kBF16});
    REQUIRE(kv.ok());
    Runner runner(*m->weights, ex, *kv);
    GenerateOptions go;
    go.n_predict = 64;
    go.sampling.temperature = 0;
    go.stop_at_eos = false;
    auto res = generate(runner, {{1}}, go);
    REQUIRE(res.ok());
    const auto story = test::read_i32(**g, "bos.greedy_ids");
    CHECK(res->tokens[0] == std::vector<int32_t>(story.begin(), story.begin() + 64));
  }

  TEST_CASE("synthetic presets have their architectures' shapes and run") {
    auto m = load_model("synthetic:llama-3-8b", LoadOptions{.synthetic_layers = 1});
    REQUIRE_MESSAGE(m.ok(), m.status().message());
    CHECK(m->config.n_embd == 4096);
    CHECK(m->config.n_kv_heads == 8);
    CHECK(m->config.n_vocab == 128256);
    auto full = load_model("synthetic:llama-2-7b", LoadOptions{.synthetic_layers = 1, .need_tokenizer = false});
    REQUIRE(full.ok());
    auto cfg7 = synthetic_config("llama-2-7b");
    REQUIRE(cfg7.ok());
    CHECK(cfg7->n_params() == 6738415616);  // Llama-2-7B's published parameter count
    auto cfg70 = synthetic_config("llama-3-70b");
    REQUIRE(cfg70.ok());
    CHECK(cfg70->n_params() == 70553706496);  // Llama-3-70B's

    auto small = load_model("synthetic:stories15m");
    REQUIRE(small.ok());
    cpu::CpuExecutor ex(small->config);
    auto kv = KvCache::create({small->config.n_layers, small->config.n_kv_heads, small->config.head_dim, 16, 8});
    REQUIRE(kv.ok());
    Runner r(*small->weights, ex, *kv);
    GenerateOptions go;
    go.n_predict = 8;
    go.sampling.seed = 3;
    auto a = generate(r, {small->tokenizer->encode("Hello", true)}, go);
    auto b = generate(r, {small->tokenizer->encode("Hello", true)}, go);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(a->tokens == b->tokens);  // deterministic weights, seeded sampling
    CHECK(!load_model("synthetic:nope").ok());
  }

  TEST_CASE("held-out shapes, 333-token prompt: BF16 K/V (host K/V, throughput mode) stays near float32 K/V") {
    // The rounding of K/V to BF16 alone, measured on the exact CPU path: the GPU backend stores BF16
    // K/V too, so this is the part of its error that K/V rounding explains (notes/h200.md).
    test::for_each_held_out([](const std::string& dir, const test::HeldOutShape& hs, const std::vector<int32_t>& ids) {
      Loaded f32 = load(dir, 512), b16 = load(dir, 512, 16, DType::kBF16);
      auto lf = prompt_logits(*f32.runner, ids, 128);
      auto lb = prompt_logits(*b16.runner, ids, 128);
      REQUIRE(lf.ok());
      REQUIRE(lb.ok());
      const double all = rel_err(*lb, *lf);
      MESSAGE("held-out " << hs.hidden << "/" << hs.heads << "/" << hs.kv_heads << ": BF16 K/V vs F32 K/V " << test::held_out_report(*lb, *lf, hs.vocab));
      CHECK(all < 2e-2);  // the BF16 bound the GPU backend is held to
    });
  }

  TEST_CASE("NF4 (QLoRA's codes, blocks of 64, fp32 absmax): the codec, and the golden NF4 logits") {
    // The codec: every code round-trips, the packing is bitsandbytes' (high nibble first), a zero
    // block stays zero, and each element lands on its nearest code.
    std::vector<float> x(130);
    for (int i = 0; i < 16; ++i) x[i] = kNf4Codes[i] * 3.0f;  // block 0: absmax 3
    for (int i = 16; i < 64; ++i) x[i] = 3.0f * std::sin(0.37f * static_cast<float>(i));
    // block 1 (64-127) all zero; block 2 (128-129) partial
    x[128] = -0.5f;
    x[129] = 0.25f;
    std::vector<uint8_t> packed((x.size() + 1) / 2);
    std::vector<float> absmax(3), y(x.size());
    quantize_nf4(x.data(), static_cast<int64_t>(x.size()), packed.data(), absmax.data());
    dequantize_nf4(packed.data(), absmax.data(), static_cast<int64_t>(x.size()), y.data());
    CHECK(absmax[0] == 3.0f);
    CHECK(absmax[1] == 0.0f);
    CHECK(absmax[2] == 0.5f);
    CHECK(packed[0] == 0x01);  // codes 0 and 1
    for (int i = 0; i < 16; ++i) CHECK(y[i] == x[i]);
    for (int i = 64; i < 128; ++i) CHECK(y[i] == 0.0f);
    CHECK(y[128] == -0.5f);
    for (size_t i = 0; i < x.size(); ++i) {
      const float m = absmax[i / 64];
      float best = 1e30f;
      for (float c : kNf4Codes) best = std::min(best, std::fabs(c * m - x[i]));
      CHECK(std::fabs(y[i] - x[i]) <= best + 1e-6f);
    }
    CHECK(weight_format_bytes(WeightFormat::kNF4, 4096, 4096) == 4096 * 4096 / 64 * 36);

    // The golden: every Linear weight inside the decoder layers rounded through NF4 and back
    // (transformers / peft), the float32 CPU path on the result.
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    test::TempDir tmp;
    write_rounded(dir, tmp, [](std::vector<float>& w, const std::vector<int64_t>&) {
      std::vector<uint8_t> q((w.size() + 1) / 2);
      std::vector<float> a((w.size() + 63) / 64);
      quantize_nf4(w.data(), static_cast<int64_t>(w.size()), q.data(), a.data());
      dequantize_nf4(q.data(), a.data(), static_cast<int64_t>(w.size()), w.data());
    });
    Loaded l = load(tmp.path.string());
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    auto logits = prompt_logits(*l.runner, test::read_i32(**gs, "seq0.input_ids"));
    REQUIRE(logits.ok());
    const double err = rel_err(*logits, test::read_f32(**gs, "nf4.seq0.logits"));
    const double vs_bf16 = rel_err(*logits, test::read_f32(**gs, "seq0.logits"));
    MESSAGE("NF4 golden logits max|d|/max|ref| = " << err << " (against the unquantised logits: " << vs_bf16 << ")");
    CHECK(err < 1e-3);
    CHECK(vs_bf16 > 1e-2);  // the rounding is real: the unquantised reference is far
  }

  TEST_CASE("--quant nf4 / int8 at load: fused quantised layers, the golden NF4 logits, a packed quantised store, shapes refused") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const std::vector<int32_t> ids = test::read_i32(**gs, "seq0.input_ids");
    // NF4 kept as 4-bit codes + fp32 absmax, dequantised row by row inside the CPU GEMMs.
    Loaded l = load(dir, 4096, 16, DType::kF32, DType::kNF4);
    const LayerWeights& w0 = l.model.weights->layer(0);
    CHECK(is_fused_qkv(w0));
    CHECK(is_fused_gate_up(w0));
    CHECK(w0[kWqkv].dtype == DType::kNF4);
    CHECK(w0[kAttnNorm].dtype == DType::kBF16);
    const ModelConfig& c = l.model.config;
    const int64_t bf16_bytes = gpu_layer_bytes(c), nf4_bytes = static_cast<int64_t>(layer_layout(c, 0, DType::kNF4).bytes);
    MESSAGE("llama-gqa layer: BF16 " << bf16_bytes << " bytes, NF4 " << nf4_bytes << " (" << 2.0 * nf4_bytes / bf16_bytes << " bytes a parameter)");
    CHECK(nf4_bytes == 2 * 2 * c.n_embd + weight_format_bytes(WeightFormat::kNF4, c.q_dim() + 2 * c.kv_dim(), c.n_embd) +
                           weight_format_bytes(WeightFormat::kNF4, c.n_embd, c.q_dim()) + weight_format_bytes(WeightFormat::kNF4, 2 * c.n_ff, c.n_embd) +
                           weight_format_bytes(WeightFormat::kNF4, c.n_embd, c.n_ff));
    auto nf4 = prompt_logits(*l.runner, ids);
    REQUIRE(nf4.ok());
    const double err = rel_err(*nf4, test::read_f32(**gs, "nf4.seq0.logits"));
    MESSAGE("--quant nf4: golden NF4 logits max|d|/max|ref| = " << err);
    CHECK(err < 1e-3);
    CHECK(rel_err(*nf4, test::read_f32(**gs, "seq0.logits")) > 1e-2);
    // Several rows at once take the oneDNN path over dequantised panels: the same logits.
    // int8 per output channel: close to the unquantised model, and not equal to it.
    // Its reference: the float32 model with the same weights rounded through int8 and back.
    Loaded l8 = load(dir, 4096, 16, DType::kF32, DType::kQ8);
    auto q8 = prompt_logits(*l8.runner, ids);
    REQUIRE(q8.ok());
    test::TempDir ref8;
    write_rounded(dir, ref8, [](std::vector<float>& w, const std::vector<int64_t>& shape) {
      std::vector<int8_t> q(w.size());
      std::vector<float> sc(static_cast<size_t>(shape[0]));
      quantize_int8_rows(w.data(), shape[0], shape[1], q.data(), sc.data());
      for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(q[i]) * sc[i / shape[1]];
    });
    Loaded lr = load(ref8.path.string());
    auto want8 = prompt_logits(*lr.runner, ids);
    REQUIRE(want8.ok());
    const double e8 = rel_err(*q8, *want8), e8_bf16 = rel_err(*q8, test::read_f32(**gs, "seq0.logits"));
    MESSAGE("--quant int8: against int8-rounded float32 weights " << e8 << ", against the unquantised golden " << e8_bf16);
    CHECK(e8 < 1e-4);
    CHECK(e8_bf16 > 1e-3);
    // A store packed with --quant nf4 holds the fused 4-bit blocks; read back, the same logits;
    // --quant int8 against it is refused, naming the fix.
    check_packed_store(l, dir, ids, *nf4, "model.layers.0.self_attn.qkv_proj.weight", DType::kNF4, DType::kQ8, "pack it with --quant int8");
    // A model whose Linear inputs are not a multiple of the format's block is refused, naming the tensor.
    for (DType q : {DType::kNF4, DType::kQ8}) {
      auto bad = load_model(test::shared_dir() + "/models/stories260K", LoadOptions{.need_tokenizer = false, .quant = q});
      REQUIRE(!bad.ok());
      MESSAGE(bad.status().message());
      CHECK(bad.status().message().find("model.layers.0.mlp.down_proj.weight") != std::string::npos);
    }
  }

  TEST_CASE("--quant-head int8 / nf4: the lm_head quantised too, the logits of it rounded through the codec; refusals name the flag") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const std::vector<int32_t> ids = test::read_i32(**gs, "seq0.input_ids");
    Loaded bf_head = load(dir, 4096, 16, DType::kF32, DType::kQ8);
    auto plain = prompt_logits(*bf_head.runner, ids);
    REQUIRE(plain.ok());
    for (DType h : {DType::kQ8, DType::kNF4}) {
      CAPTURE(dtype_name(h));
      Loaded l = load(dir, 4096, 16, DType::kF32, DType::kQ8, "", h);
      const TensorView& head = l.model.weights->globals().t[kLmHead];
      CHECK(head.dtype == h);
      CHECK(head.nbytes() == static_cast<size_t>(quant_layout(h, l.model.config.n_vocab, l.model.config.n_embd).bytes));
      auto got = prompt_logits(*l.runner, ids);
      REQUIRE(got.ok());
      // The reference: the int8-rounded layers and the lm_head rounded through its own codec, the
      // float32 model on the result.
      test::TempDir ref;
      write_rounded(
          dir, ref,
          [&](std::vector<float>& w, const std::vector<int64_t>& shape) { round_through(shape[0] == l.model.config.n_vocab ? h : DType::kQ8, w, shape); },
          /*head_too=*/true);
      Loaded lr = load(ref.path.string());
      auto want = prompt_logits(*lr.runner, ids);
      REQUIRE(want.ok());
      const double err = rel_err(*got, *want), vs_bf16_head = rel_err(*got, *plain);
      MESSAGE("--quant int8 --quant-head " << dtype_name(h) << ": against the rounded float32 weights " << err << ", against the BF16 lm_head " << vs_bf16_head);
      CHECK(err < 1e-4);
      CHECK(vs_bf16_head > 1e-6);  // the head's rounding is real
    }
    // Refused: without --quant, for a tied lm_head, and over a packed store.
    auto no_quant = load_model(dir, LoadOptions{.need_tokenizer = false, .quant_head = DType::kQ8});
    REQUIRE(!no_quant.ok());
    CHECK(no_quant.status().message().find("--quant-head needs --quant") != std::string::npos);
    auto tied = load_model(test::shared_dir() + "/golden/llama3-tied", LoadOptions{.need_tokenizer = false, .quant = DType::kQ8, .quant_head = DType::kQ8});
    REQUIRE(!tied.ok());
    CHECK(tied.status().message().find("tie_word_embeddings") != std::string::npos);
    test::TempDir tmp;
    REQUIRE(pack_store(*bf_head.model.weights, tmp / "store").ok());
    auto disk = load_model(dir, LoadOptions{.need_tokenizer = false, .disk = tmp / "store", .quant = DType::kQ8, .quant_head = DType::kQ8});
    REQUIRE(!disk.ok());
    CHECK(disk.status().message().find("--quant-head int8: the packed store") != std::string::npos);
  }

  TEST_CASE("--quant nf4-dq at load: each Linear double-quantised as bitsandbytes would, the logits of the weights rounded through it, a packed store") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const std::vector<int32_t> ids = test::read_i32(**gs, "seq0.input_ids");
    Loaded l = load(dir, 4096, 16, DType::kF32, DType::kNF4DQ);
    const LayerWeights& w0 = l.model.weights->layer(0);
    CHECK(w0[kWqkv].dtype == DType::kNF4DQ);
    CHECK(w0[kWGateUp].dtype == DType::kNF4DQ);
    const ModelConfig& c = l.model.config;
    const int64_t nf4 = static_cast<int64_t>(layer_layout(c, 0, DType::kNF4).bytes), dq = static_cast<int64_t>(layer_layout(c, 0, DType::kNF4DQ).bytes);
    MESSAGE("llama-gqa layer: NF4 " << nf4 << " bytes, NF4-DQ " << dq);
    CHECK(dq == 2 * 2 * c.n_embd + weight_format_bytes(WeightFormat::kNF4DQ, c.q_dim() + 2 * c.kv_dim(), c.n_embd) +
                    weight_format_bytes(WeightFormat::kNF4DQ, c.n_embd, c.q_dim()) + weight_format_bytes(WeightFormat::kNF4DQ, 2 * c.n_ff, c.n_embd) +
                    weight_format_bytes(WeightFormat::kNF4DQ, c.n_embd, c.n_ff));
    CHECK(dq < nf4);
    auto got = prompt_logits(*l.runner, ids);
    REQUIRE(got.ok());
    // The reference: each Linear (q, k, v, gate, up apart, as peft holds them) rounded through the
    // NF4-DQ codec on its own, the float32 model on the result.
    test::TempDir ref;
    write_rounded(dir, ref, [](std::vector<float>& w, const std::vector<int64_t>& shape) { round_through(DType::kNF4DQ, w, shape); });
    Loaded lr = load(ref.path.string());
    auto want = prompt_logits(*lr.runner, ids);
    REQUIRE(want.ok());
    const double err = rel_err(*got, *want), vs_nf4 = rel_err(*got, test::read_f32(**gs, "nf4.seq0.logits"));
    MESSAGE("--quant nf4-dq: against the NF4-DQ-rounded float32 weights " << err << ", against the golden NF4 (fp32 absmax) logits " << vs_nf4);
    CHECK(err < 1e-4);
    CHECK(vs_nf4 > 1e-5);  // the second rounding is real
    CHECK(vs_nf4 < 2e-2);
    // Packed with --quant nf4-dq and read back: the same logits; --quant nf4 against it is refused.
    check_packed_store(l, dir, ids, *got, "model.layers.0.mlp.gate_up_proj.weight", DType::kNF4DQ, DType::kNF4, "pack it with --quant nf4");
    // qwen2-bias (192 wide: 3 absmax a row, so q's 576 are not blocks of 256): each fused weight is
    // double-quantised as one part; its logits stay near the NF4 (fp32 absmax) ones.
    const std::string qdir = test::shared_dir() + "/golden/qwen2-bias";
    auto qgs = SafetensorsFile::open(qdir + "/golden.safetensors");
    REQUIRE(qgs.ok());
    const std::vector<int32_t> qids = test::read_i32(**qgs, "seq0.input_ids");
    Loaded q4 = load(qdir, 4096, 16, DType::kF32, DType::kNF4), qdq = load(qdir, 4096, 16, DType::kF32, DType::kNF4DQ);
    auto l4 = prompt_logits(*q4.runner, qids), ldq = prompt_logits(*qdq.runner, qids);
    REQUIRE(l4.ok());
    REQUIRE(ldq.ok());
    const double e_q = rel_err(*ldq, *l4);
    MESSAGE("qwen2-bias --quant nf4-dq (fused weights as one part) against --quant nf4: " << e_q);
    CHECK(e_q > 0);
    CHECK(e_q < 5e-2);
  }

  TEST_CASE("int8 per output channel and QLoRA's double quantisation of absmax: the codecs") {
    std::vector<float> x(3 * 32);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.7f * static_cast<float>(i)) * (1 + static_cast<float>(i / 32));
    std::fill(x.begin() + 32, x.begin() + 64, 0.0f);  // a zero row
    std::vector<int8_t> q(x.size());
    std::vector<float> sc(3);
    quantize_int8_rows(x.data(), 3, 32, q.data(), sc.data());
    CHECK(sc[1] == 0.0f);
    for (int r = 0; r < 3; ++r) {
      float m = 0;
      for (int c = 0; c < 32; ++c) m = std::max(m, std::fabs(x[r * 32 + c]));
      CHECK(sc[r] == doctest::Approx(m / 127).epsilon(1e-6));
      for (int c = 0; c < 32; ++c) CHECK(std::fabs(q[r * 32 + c] * sc[r] - x[r * 32 + c]) <= 0.5f * sc[r] + 1e-6f);
    }
    // Double quantisation: the dynamic map is bitsandbytes' (256 ascending values, 0 and 1 exact,
    // symmetric), each absmax within half a code step of its block's scale.
    const float* map = dynamic_map_signed();
    CHECK(map[0] == doctest::Approx(-0.9922).epsilon(1e-3));
    CHECK(map[255] == 1.0f);
    CHECK(std::count(map, map + 256, 0.0f) == 1);
    for (int i = 1; i < 256; ++i) CHECK(map[i] > map[i - 1]);
    std::vector<float> absmax(700);
    for (size_t i = 0; i < absmax.size(); ++i) absmax[i] = 0.05f + 0.02f * std::cos(0.3f * static_cast<float>(i));
    std::vector<uint8_t> codes(absmax.size());
    std::vector<float> a2(3), back(absmax.size());
    float off = 0;
    quantize_absmax_dq(absmax.data(), static_cast<int64_t>(absmax.size()), codes.data(), a2.data(), &off);
    dequantize_absmax_dq(codes.data(), a2.data(), off, static_cast<int64_t>(absmax.size()), back.data());
    double mean = 0;
    for (float a : absmax) mean += a;
    CHECK(off == doctest::Approx(mean / absmax.size()).epsilon(1e-5));
    double worst = 0;
    for (size_t i = 0; i < absmax.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(back[i] - absmax[i]) / a2[i / 256]));
    MESSAGE("double-quantised absmax: worst error " << worst << " of the block scale");
    CHECK(worst < 0.02);  // the dynamic map's steps near 1 are 1/64 wide
    CHECK(worst > 0);
  }

  TEST_CASE("NF4 and its double-quantised absmax byte for byte as bitsandbytes makes them (tests/data, bench/baselines/bnb_nf4_reference.py)") {
    auto f = SafetensorsFile::open(test::data_dir() + "/bnb_nf4_dq.safetensors");
    REQUIRE_MESSAGE(f.ok(), f.status().message());
    auto bytes = [&](const char* name) {
      const SafetensorsEntry* e = (*f)->find(name);
      REQUIRE_MESSAGE(e != nullptr, name);
      const TensorView v = (*f)->view(*e);
      const uint8_t* p = static_cast<const uint8_t*>(v.data);
      return std::vector<uint8_t>(p, p + (e->end - e->begin));
    };
    auto floats = [&](const char* name) {
      const std::vector<uint8_t> b = bytes(name);
      std::vector<float> out(b.size() / 4);
      std::memcpy(out.data(), b.data(), b.size());
      return out;
    };
    const auto& meta = (*f)->metadata();
    const int64_t rows = std::stoll(meta.at("rows")), cols = std::stoll(meta.at("cols")), n = rows * cols;
    MESSAGE("bitsandbytes " << meta.at("bitsandbytes") << ", " << rows << " x " << cols);
    // The weight, as the script computes it (exact in both).
    std::vector<float> w(n);
    for (int64_t i = 0; i < n; ++i) {
      const double u = static_cast<double>((i * 2654435761LL) % 1000003) / 1000003.0 - 0.5;
      w[i] = static_cast<float>(u * ((i / cols) % 9 == 4 ? 0.4 : 0.05));
    }
    std::fill(w.begin() + 7 * cols, w.begin() + 8 * cols, 0.0f);
    std::vector<uint8_t> codes((n + 1) / 2);
    std::vector<float> absmax((n + 63) / 64);
    quantize_nf4(w.data(), n, codes.data(), absmax.data());
    CHECK(codes == bytes("codes"));
    // The dynamic map, the mean, the second-level scales and the 8-bit codes.
    const std::vector<float> code2 = floats("code2");
    REQUIRE(code2.size() == 256);
    CHECK(std::equal(code2.begin(), code2.end(), dynamic_map_signed()));
    const int64_t nb = static_cast<int64_t>(absmax.size());
    std::vector<uint8_t> acodes(nb);
    std::vector<float> a2((nb + 255) / 256), back(nb);
    float off = 0;
    quantize_absmax_dq(absmax.data(), nb, acodes.data(), a2.data(), &off);
    CHECK(off == floats("offset")[0]);
    CHECK(a2 == floats("absmax2"));
    const std::vector<uint8_t> want_codes = bytes("absmax_codes");
    int64_t differ = 0;
    for (int64_t i = 0; i < nb; ++i) differ += acodes[i] != want_codes[i];
    CHECK(differ == 0);
    dequantize_absmax_dq(acodes.data(), a2.data(), off, nb, back.data());
    CHECK(back == floats("absmax"));
    // The stored NF4-DQ blob (--quant nf4-dq) holds the same parts, and dequantises to bitsandbytes'
    // weight: each code's value times its dequantised absmax.
    const QuantLayout ql = quant_layout(DType::kNF4DQ, rows, cols);
    std::vector<uint8_t> blob(static_cast<size_t>(ql.bytes));
    quantize_weight(DType::kNF4DQ, w.data(), rows, cols, blob.data());
    CHECK(std::vector<uint8_t>(blob.begin(), blob.begin() + (n + 1) / 2) == codes);
    CHECK(std::vector<uint8_t>(blob.begin() + ql.scales, blob.begin() + ql.scales + nb) == want_codes);
    std::vector<float> blob_a2(ql.n_scales2), blob_means(ql.n_scales2);
    std::memcpy(blob_a2.data(), blob.data() + ql.scales2, 4 * blob_a2.size());
    std::memcpy(blob_means.data(), blob.data() + ql.means, 4 * blob_means.size());
    CHECK(blob_a2 == floats("absmax2"));
    CHECK(std::count(blob_means.begin(), blob_means.end(), floats("offset")[0]) == ql.n_scales2);
    std::vector<float> wdq(n), want(n);
    dequantize_rows(DType::kNF4DQ, blob.data(), rows, cols, 0, rows, wdq.data());
    dequantize_nf4(codes.data(), floats("absmax").data(), n, want.data());
    CHECK(wdq == want);
    CHECK(ql.bytes < quant_layout(DType::kNF4, rows, cols).bytes);
  }

  TEST_CASE("NF4-DQ of a fused weight: each part's own statistics where its absmax fill blocks of 256, else one part") {
    // Three parts of 8, 4 and 4 rows of 2048 columns (32 absmax a row: 256, 128 and 128 absmax):
    // 128 is not a multiple of 256, so the fused weight is one part; with 8, 8, 16 rows, three.
    const int64_t K = 2048;
    CHECK(dq_parts(16, K, {8, 4, 4}) == std::vector<std::pair<int64_t, int64_t>>{{0, 512}});
    CHECK(dq_parts(32, K, {8, 8, 16}) == std::vector<std::pair<int64_t, int64_t>>{{0, 256}, {256, 512}, {512, 1024}});
    CHECK(dq_parts(32, K, {}) == std::vector<std::pair<int64_t, int64_t>>{{0, 1024}});
    // Each part of the fused blob is bit for bit the blob of that part quantised alone (what
    // bitsandbytes stores for each Linear), the parts at very different scales.
    const std::vector<int64_t> parts = {8, 8, 16};
    const int64_t R = 32;
    std::vector<float> w(R * K);
    for (int64_t i = 0; i < R * K; ++i) w[i] = std::sin(0.013f * static_cast<float>(i)) * (i < 8 * K ? 0.02f : i < 16 * K ? 0.5f : 3.0f);
    const QuantLayout fl = quant_layout(DType::kNF4DQ, R, K);
    std::vector<uint8_t> fused(fl.bytes);
    std::vector<float> stage(quant_stage_floats(DType::kNF4DQ, R, K));
    std::memset(fused.data(), 0, fused.size());
    quantize_rows(DType::kNF4DQ, w.data(), R, K, 0, R, fused.data(), stage.data());
    finish_quant(DType::kNF4DQ, R, K, stage.data(), fused.data(), parts);
    std::vector<float> all(R * K);
    dequantize_rows(DType::kNF4DQ, fused.data(), R, K, 0, R, all.data());
    int64_t r0 = 0;
    for (int64_t pr : parts) {
      const QuantLayout pl = quant_layout(DType::kNF4DQ, pr, K);
      std::vector<uint8_t> alone(pl.bytes);
      quantize_weight(DType::kNF4DQ, w.data() + r0 * K, pr, K, alone.data());
      const int64_t a0 = r0 * K / 64, na = pr * K / 64;
      CHECK(std::equal(alone.begin() + pl.scales, alone.begin() + pl.scales + na, fused.begin() + fl.scales + a0));
      CHECK(std::memcmp(alone.data() + pl.scales2, fused.data() + fl.scales2 + 4 * (a0 / 256), 4 * (na / 256)) == 0);
      CHECK(std::memcmp(alone.data() + pl.means, fused.data() + fl.means + 4 * (a0 / 256), 4 * (na / 256)) == 0);
      std::vector<float> back(pr * K);
      dequantize_rows(DType::kNF4DQ, alone.data(), pr, K, 0, pr, back.data());
      CHECK(std::equal(back.begin(), back.end(), all.begin() + r0 * K));
      r0 += pr;
    }
  }

  TEST_CASE("NF4-DQ's absmax expanded by the CPU kernel (byte permutes or gathers under AVX-512) equal the codec's bit for bit") {
    // 1000 absmax over four blocks of 256 at different scales; ranges that start and end inside a
    // block and inside a group of 16.
    std::vector<float> absmax(1000);
    for (size_t i = 0; i < absmax.size(); ++i) absmax[i] = (0.01f + 0.003f * std::sin(0.21f * static_cast<float>(i))) * (1 + static_cast<float>(i / 256));
    std::vector<uint8_t> codes(absmax.size());
    std::vector<float> a2(4), means(4);
    float mean = 0;
    quantize_absmax_dq(absmax.data(), static_cast<int64_t>(absmax.size()), codes.data(), a2.data(), &mean);
    std::fill(means.begin(), means.end(), mean);
    means[2] = mean * 1.5f;  // a block of another part
    std::vector<float> want(absmax.size());
    for (size_t i = 0; i < absmax.size(); ++i) want[i] = dynamic_map_signed()[codes[i]] * a2[i / 256] + means[i / 256];
    for (auto [i0, n] : std::vector<std::pair<int64_t, int64_t>>{{0, 1000}, {3, 17}, {250, 300}, {511, 489}}) {
      CAPTURE(i0);
      std::vector<float> got(static_cast<size_t>(n));
      cpu::nf4dq_absmax(codes.data(), a2.data(), means.data(), i0, n, got.data());
      CHECK(std::equal(got.begin(), got.end(), want.begin() + i0));
    }
  }

  TEST_CASE("the CPU's dynamic-map lookup (byte permutes, gathers, scalar) gives the map's values for every code") {
    // Every code, twice, in an order that mixes the top bit (the byte permutes' second table) and
    // lengths that end inside a 64-code step and inside one of its four 16-float stores.
    std::vector<uint8_t> codes(512);
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>((i * 167 + 31) % 256);
    std::vector<float> want(codes.size());
    for (size_t i = 0; i < codes.size(); ++i) want[i] = dynamic_map_signed()[codes[i]];
    for (cpu::MapLookup how : {cpu::MapLookup::kBest, cpu::MapLookup::kVbmi, cpu::MapLookup::kGather, cpu::MapLookup::kScalar}) {
      for (int64_t n : {int64_t{512}, int64_t{1}, int64_t{63}, int64_t{64}, int64_t{65}, int64_t{100}, int64_t{255}}) {
        for (int64_t i0 : {int64_t{0}, int64_t{5}}) {
          if (i0 + n > static_cast<int64_t>(codes.size())) continue;
          std::vector<float> got(static_cast<size_t>(n) + 16, -7.0f);  // the 16 past n stay untouched
          const cpu::MapLookup took = cpu::dynamic_map_values(codes.data() + i0, n, got.data(), how);
          CAPTURE(static_cast<int>(how));
          CAPTURE(static_cast<int>(took));
          CAPTURE(n);
          CAPTURE(i0);
          CHECK(std::equal(got.begin(), got.begin() + n, want.begin() + i0));
          CHECK(std::all_of(got.begin() + n, got.end(), [](float v) { return v == -7.0f; }));
        }
      }
      std::vector<float> one(1);
      MESSAGE("map lookup: asked path " << static_cast<int>(how) << ", took " << static_cast<int>(cpu::dynamic_map_values(codes.data(), 1, one.data(), how)));
    }
  }

  TEST_CASE("the CPU's quantised row kernels (AVX-512 or AVX2 + FMA, whichever the CPU has) against the codec: dots and dequantised rows") {
    MESSAGE("SIMD level: " << std::string(cpu::simd_level()));
    // K = 320: two full groups of 128 NF4 elements and half of one; int8 also at 336 (a last 16).
    const int64_t N = 5;
    for (auto [t, K] : std::vector<std::pair<DType, int64_t>>{{DType::kNF4, 320}, {DType::kNF4DQ, 320}, {DType::kQ8, 320}, {DType::kQ8, 336}}) {
      std::vector<float> w(N * K), x(3 * K);
      for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + static_cast<float>(i % 97) / 50.0f);
      for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.11f * static_cast<float>(i));
      CAPTURE(dtype_name(t));
      CAPTURE(K);
      std::vector<uint8_t> blob(quant_layout(t, N, K).bytes);
      quantize_weight(t, w.data(), N, K, blob.data());
      std::vector<float> wq(N * K);
      dequantize_rows(t, blob.data(), N, K, 0, N, wq.data());
      TensorView W = TensorView::contiguous(blob.data(), t, {N, K});
      for (int64_t M = 1; M <= 3; ++M) {
        std::vector<float> y(M * N);
        cpu::gemm_xwt(x.data(), M, W, y.data());
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double want = 0;
            for (int64_t k = 0; k < K; ++k) want += static_cast<double>(wq[n * K + k]) * x[m * K + k];
            CHECK(y[m * N + n] == doctest::Approx(want).epsilon(1e-5).scale(1.0));
          }
      }
      // Many rows: oneDNN over rows dequantised to float, the same values as the codec's.
      std::vector<float> y8(8 * N), x8(8 * K);
      for (size_t i = 0; i < x8.size(); ++i) x8[i] = std::cos(0.05f * static_cast<float>(i));
      cpu::gemm_xwt(x8.data(), 8, W, y8.data());
      // And at the precision CPU-computed layers run at beside the GPU: BF16 panels of the
      // dequantised rows through oneDNN's BF16 matmul (where this CPU has one), BF16 inputs.
      std::vector<float> yb(8 * N);
      cpu::gemm_xwt(x8.data(), 8, W, yb.data(), {}, cpu::GemmPrecision::kBf16Inputs);
      for (int64_t n = 0; n < N; ++n) {
        double want = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          want += static_cast<double>(wq[n * K + k]) * x8[7 * K + k];
          mag += std::fabs(static_cast<double>(wq[n * K + k]) * x8[7 * K + k]);
        }
        CHECK(y8[7 * N + n] == doctest::Approx(want).epsilon(1e-4).scale(1.0));
        CHECK(std::fabs(yb[7 * N + n] - want) <= 1e-2 * mag);  // BF16 rounding of both operands
      }
      if (t == DType::kNF4) {
        std::vector<uint8_t> codes(N * K / 2);
        std::vector<float> absmax(N * K / 64), a(N * K), b(N * K);
        quantize_nf4(w.data(), N * K, codes.data(), absmax.data());
        dequantize_nf4(codes.data(), absmax.data(), N * K, a.data());
        cpu::nf4_to_f32_row(codes.data(), absmax.data(), b.data(), N * K);
        CHECK(a == b);
      }
    }
  }

  TEST_CASE("NF4 decode products at BF16 inputs: the int16 vpdpwssd row kernel against its rounded operands, near the exact one") {
    MESSAGE("decode kernel at BF16 inputs here: " << std::string(cpu::nf4_dot_name(cpu::nf4_decode_dot())));
    // K = 2112: 16 full groups of 128 and half of one; N = 37 rows over several tasks.
    for (DType t : {DType::kNF4, DType::kNF4DQ}) {
      const int64_t N = 37, K = 2112, G = (K + 127) / 128;
      CAPTURE(dtype_name(t));
      std::vector<float> w(N * K), x(3 * K);
      for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.29f * static_cast<float>(i)) * (1.0f + static_cast<float>(i % 89) / 40.0f);
      for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.13f * static_cast<float>(i)) * (1.0f + static_cast<float>(i % 7));
      x[5] = 300.0f;  // an outlier: its group's other elements keep fewer bits as int16
      std::vector<uint8_t> blob(quant_layout(t, N, K).bytes);
      quantize_weight(t, w.data(), N, K, blob.data());
      std::vector<float> wq(N * K);
      dequantize_rows(t, blob.data(), N, K, 0, N, wq.data());
      // Each block's absmax is its largest |weight| (that element's code is +-1).
      std::vector<float> absmax(N * K / 64, 0.0f);
      for (int64_t i = 0; i < N * K; ++i) absmax[i / 64] = std::max(absmax[i / 64], std::fabs(wq[i]));
      const TensorView W = TensorView::contiguous(blob.data(), t, {N, K});
      // x as the kernel rounds it (element order).
      std::vector<double> xq_val(3 * K);
      for (int64_t m = 0; m < 3; ++m)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t g0 = g * 128, n = std::min<int64_t>(128, K - g0);
          float amax = 0;
          for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[m * K + g0 + i]));
          const float inv = cpu::kI16XMax / amax, scale = amax / cpu::kI16XMax / cpu::kI16CodeOne;
          for (int64_t i = 0; i < n; ++i) xq_val[m * K + g0 + i] = std::nearbyint(x[m * K + g0 + i] * inv) * static_cast<double>(scale);
        }
      std::vector<int16_t> xq(3 * K);
      std::vector<float> xsc(3 * G);
      for (int64_t M = 1; M <= 3; ++M) {
        CAPTURE(M);
        std::vector<float> yx(M * N), yb(M * N);
        cpu::gemm_xwt(x.data(), M, W, yx.data());
        cpu::gemm_xwt(x.data(), M, W, yb.data(), {}, cpu::GemmPrecision::kBf16Inputs);
        cpu::split_for_rows_i16(x.data(), M, K, xq.data(), xsc.data());
        double moved = 0;
        for (int64_t n = 0; n < N; ++n) {
          float oq[3];
          cpu::nf4_dot_rows_i16(blob.data() + n * K / 2, absmax.data() + n * (K / 64), xq.data(), xsc.data(), K, K, M, oq);
          for (int64_t m = 0; m < M; ++m) {
            double want = 0, mag = 0;
            for (int64_t k = 0; k < K; ++k) {
              const int64_t e = n * K + k;
              const uint8_t c = blob[e / 2];
              const int code = e % 2 == 0 ? c >> 4 : c & 0x0f;
              const double p = static_cast<double>(cpu::kNf4CodesI16[code]) * absmax[e / 64] * xq_val[m * K + k];
              want += p, mag += std::fabs(p);
            }
            CHECK(std::fabs(oq[m] - want) <= 1e-5 * mag);
            CHECK(yb[m * N + n] == (cpu::nf4_decode_dot() == cpu::Nf4Dot::kI16 ? oq[m] : yx[m * N + n]));
            moved = std::max(moved, std::fabs(want - yx[m * N + n]) / mag);
          }
        }
        // The rounded operands are not the exact ones (so the checks above can fail), and stay near:
        // int16 x keeps about 14 bits of its group's largest (BF16 code values and x moved these
        // products 2.4e-4).
        CHECK(moved > 1e-6);
        CHECK(moved < 1e-4);
      }
      // A NaN or an infinity in x gives a non-finite product, never a finite one.
      for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        std::vector<float> xn(x.begin(), x.begin() + K), yn(N);
        xn[K - 3] = bad;  // in the last, half group
        cpu::gemm_xwt(xn.data(), 1, W, yn.data(), {}, cpu::GemmPrecision::kBf16Inputs);
        for (int64_t n = 0; n < N; ++n) CHECK_FALSE(std::isfinite(yn[n]));
      }
    }
  }

  TEST_CASE("NF4 / NF4-DQ at BF16 inputs on the CPU (the GPU executor's CPU layers' precision), token by token: the golden NF4 logits with each decode kernel") {
    // Every layer on the CPU at the precision of the GPU executor's CPU layers, one token a step, so
    // each product but the QKV's runs the decode kernel chosen: within the GPU's bound for its NF4
    // logits. (An int8 kernel, int8 code values and x with a scale a block of 32, gave 4.3e-2 here for
    // NF4 and was not kept; notes/cpu.md.)
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const auto ids = test::read_i32(**gs, "seq0.input_ids");
    const auto ref = test::read_f32(**gs, "nf4.seq0.logits");
    const cpu::Nf4Dot was = cpu::nf4_decode_dot();
    for (DType q : {DType::kNF4, DType::kNF4DQ}) {
      Loaded l = load(dir, 4096, 16, DType::kF32, q);
      l.ex->set_precision(cpu::GemmPrecision::kBf16Inputs);
      double exact = -1;
      for (cpu::Nf4Dot kind : {cpu::Nf4Dot::kF32, cpu::Nf4Dot::kI16}) {
        const cpu::Nf4Dot got = cpu::set_nf4_decode_dot(kind);
        const std::string name = cpu::nf4_dot_name(got);
        auto logits = prompt_logits(*l.runner, ids, 1);
        REQUIRE(logits.ok());
        const double err = rel_err(*logits, ref);
        MESSAGE(dtype_name(q) << ", decode kernel " << name << ": golden nf4.seq0.logits max|d|/max|ref| = " << err);
        CHECK(err <= 2e-2);
        if (got == cpu::Nf4Dot::kF32) {
          exact = err;
          if (q == DType::kNF4) CHECK(err < 1e-3);  // the CPU backend's own bound: float32 code values and x
        } else {
          CHECK(err != exact);  // the int16 kernel ran: it rounds
        }
      }
    }
    cpu::set_nf4_decode_dot(was);
  }

  TEST_CASE("bitsandbytes 4-bit and 8-bit checkpoints (transformers' save_pretrained): read as stored, the logits of bitsandbytes' dequantised weights; refusals name the tensor or key") {
    // tests/data/bnb4-*, bnb8 (bench/baselines/bnb_checkpoints.py): tiny Llamas saved by transformers
    // after loading them in 4 or 8 bits with bitsandbytes, with the float32 logits of the weights
    // bitsandbytes dequantises. nf4-dq: every Linear's absmax count a multiple of 256 (kept
    // double-quantised); gqa-dq: k/v hold 128 (expanded to fp32 absmax, NF4); nf4: fp32 absmax; bnb8:
    // int8 rows and their absmax (ferry's int8, a scale SCB / 127 a row).
    struct Case {
      const char* dir;
      DType want;
    };
    for (const Case& k : {Case{"bnb4-nf4-dq", DType::kNF4DQ}, Case{"bnb4-nf4", DType::kNF4}, Case{"bnb4-gqa-dq", DType::kNF4}, Case{"bnb8", DType::kQ8}}) {
      const std::string name = k.dir;
      CAPTURE(name);
      const std::string dir = test::data_dir() + "/" + k.dir;
      auto ref = SafetensorsFile::open(dir + "/ref.safetensors");
      REQUIRE(ref.ok());
      const auto ids = test::read_i32(**ref, "input_ids");
      const auto want = test::read_f32(**ref, "logits");
      Loaded l = load(dir);
      std::vector<float> decoded;  // one token a step
      const LayerWeights& w0 = l.model.weights->layer(0);
      CHECK(linear_dtype(w0) == k.want);
      CHECK(is_fused_qkv(w0));
      CHECK(is_fused_gate_up(w0));
      CHECK(l.model.weights->source().find("bitsandbytes") != std::string::npos);
      for (int64_t chunk : {int64_t{512}, int64_t{1}}) {  // the prompt (dequantised panels), one token a step (the row kernels)
        auto logits = prompt_logits(*l.runner, ids, chunk);
        REQUIRE(logits.ok());
        const double err = rel_err(*logits, want);
        MESSAGE(std::string(k.dir) << ", " << chunk << "-token steps: max|d|/max|ref| = " << err << " (transformers' own CPU forward: "
                      << rel_err(test::read_f32(**ref, "logits_bnb"), want) << ")");
        CHECK(err < 1e-5);
        if (chunk == 1) decoded = *logits;
      }
      // The lm_head quantised too (--quant-head) needs no --quant here.
      auto head = load_model(dir, LoadOptions{.need_tokenizer = false, .quant_head = DType::kNF4});
      REQUIRE_MESSAGE(head.ok(), head.status().message());
      CHECK(head->weights->globals().t[kLmHead].dtype == DType::kNF4);
      // --quant of the format it holds changes nothing; another is refused, naming the flag.
      CHECK(load_model(dir, LoadOptions{.need_tokenizer = false, .quant = k.want}).ok());
      const DType o = k.want == DType::kQ8 ? DType::kNF4 : DType::kQ8;
      auto other = load_model(dir, LoadOptions{.need_tokenizer = false, .quant = o});
      REQUIRE(!other.ok());
      CHECK(other.status().message().find("--quant " + std::string(weight_format_info(weight_format_of(o)).name)) != std::string::npos);
      CHECK(other.status().message().find("bitsandbytes") != std::string::npos);
      // Linears the checkpoint keeps unquantised (llm_int8_skip_modules, as unsloth's "dynamic" 4-bit
      // files do): quantised at load to the checkpoint's format by ferry's codec. Here layer 1's down
      // projection stored as the BF16 of what the original dequantises to. NF4's fp32 absmax and int8's
      // SCB are maxima of BF16 weights, so the codec finds the same codes and scales: the same logits
      // bit for bit; double-quantised absmax are not, and come out near the original's. The same weight
      // times 2 gives other logits (the BF16 tensor is what runs), and without its entry in
      // llm_int8_skip_modules the file is refused naming the tensor.
      const TensorView wd = l.model.weights->layer(1).t[kWDown];
      const int64_t N = wd.shape[0], K = wd.shape[1];
      std::vector<float> wf(static_cast<size_t>(N * K));
      dequantize_rows(k.want, static_cast<const uint8_t*>(wd.data), N, K, 0, N, wf.data());
      std::vector<uint16_t> wb(wf.size()), wb2(wf.size());
      for (size_t i = 0; i < wf.size(); ++i) wb[i] = f32_to_bf16(wf[i]), wb2[i] = f32_to_bf16(2 * wf[i]);
      const std::string mod = "model.layers.1.mlp.down_proj";
      auto src = SafetensorsFile::open(dir + "/model.safetensors");
      REQUIRE(src.ok());
      std::vector<TensorToWrite> keep;
      for (const auto& [tn, e] : (*src)->entries())
        if (tn.rfind(mod + ".", 0) != 0) keep.push_back({tn, e.dtype, e.shape, (*src)->view(e).data});
      REQUIRE(keep.size() < (*src)->entries().size());
      keep.push_back({mod + ".weight", DType::kBF16, {N, K}, wb.data()});
      std::ifstream cf(dir + "/config.json");
      const std::string config(std::istreambuf_iterator<char>(cf), {});
      const size_t at = config.find("\"llm_int8_skip_modules\": null");
      REQUIRE(at != std::string::npos);
      for (int v : {0, 1, 2}) {  // as dequantised; times 2; not named in llm_int8_skip_modules
        CAPTURE(v);
        const bool named = v != 2;
        keep.back().data = v == 1 ? wb2.data() : wb.data();
        test::TempDir tmp;
        REQUIRE(write_safetensors((tmp.path / "model.safetensors").string(), keep).ok());
        std::string c = config;
        c.replace(at, 29, named ? "\"llm_int8_skip_modules\": [\"lm_head\", \"layers.1.mlp.down_proj\"]" : "\"llm_int8_skip_modules\": [\"lm_head\"]");
        REQUIRE(write_file_atomic((tmp.path / "config.json").string(), c.data(), c.size()).ok());
        if (!named) {
          auto m = load_model(tmp.path.string(), LoadOptions{.need_tokenizer = false});
          REQUIRE(!m.ok());
          CHECK(m.status().message().find(mod + ".weight") != std::string::npos);
          CHECK(m.status().message().find("llm_int8_skip_modules") != std::string::npos);
          continue;
        }
        Loaded kept = load(tmp.path.string());
        CHECK(linear_dtype(kept.model.weights->layer(1)) == k.want);
        CHECK(kept.model.weights->source().find("1 Linear it keeps unquantised (llm_int8_skip_modules)") != std::string::npos);
        auto got = prompt_logits(*kept.runner, ids, 1);
        REQUIRE(got.ok());
        const double err = rel_err(*got, decoded);
        MESSAGE(name << " with layer 1's down projection stored as BF16" << std::string(v == 1 ? " times 2" : "") << " and quantised at load: " << err
                     << " from the original");
        if (v == 1) {
          CHECK(err > 1e-3);
        } else if (l.model.config.checkpoint_quant == DType::kNF4DQ) {
          CHECK(err > 0);
          CHECK(err < 1e-3);
        } else {
          CHECK(err == 0);
        }
      }
    }
    // What is refused, and how.
    const std::string dq = test::data_dir() + "/bnb4-nf4-dq";
    auto text = [&] {
      std::ifstream f(dq + "/config.json");
      return std::string(std::istreambuf_iterator<char>(f), {});
    }();
    auto with = [&](const std::string& from, const std::string& to) {
      std::string t = text;
      const size_t at = t.find(from);
      REQUIRE(at != std::string::npos);
      return t.replace(at, from.size(), to);
    };
    struct Bad {
      std::string config, says;
    };
    for (const Bad& b : {Bad{with("\"bnb_4bit_quant_type\": \"nf4\"", "\"bnb_4bit_quant_type\": \"fp4\""), "bnb_4bit_quant_type 'fp4'"},
                         Bad{[&] {
                               std::string t = with("\"llm_int8_has_fp16_weight\": false", "\"llm_int8_has_fp16_weight\": true");
                               return t.replace(t.find("\"load_in_8bit\": false"), 21, "\"load_in_8bit\": true");
                             }(),
                             "llm_int8_has_fp16_weight"},
                         Bad{with("\"quant_method\": \"bitsandbytes\"", "\"quant_method\": \"gptq\""), "quant_method 'gptq'"},
                         Bad{with("\"bnb_4bit_quant_storage\": \"uint8\"", "\"bnb_4bit_quant_storage\": \"bfloat16\""), "bnb_4bit_quant_storage"},
                         Bad{with("\"llm_int8_skip_modules\": null", "\"llm_int8_skip_modules\": \"down_proj\""), "llm_int8_skip_modules"}}) {
      auto c = parse_config(b.config, "config.json");
      REQUIRE(!c.ok());
      CHECK(c.status().message().find(b.says) != std::string::npos);
    }
    // A checkpoint missing one of a weight's companions, or whose quant_state disagrees with config.json.
    auto src = SafetensorsFile::open(dq + "/model.safetensors");
    REQUIRE(src.ok());
    for (const std::string drop : {"model.layers.1.mlp.up_proj.weight.nested_absmax", "model.layers.0.self_attn.k_proj.weight.quant_map"}) {
      CAPTURE(drop);
      test::TempDir tmp;
      std::vector<TensorToWrite> keep;
      for (const auto& [name, e] : (*src)->entries())
        if (name != drop) keep.push_back({name, e.dtype, e.shape, (*src)->view(e).data});
      REQUIRE(write_safetensors((tmp.path / "model.safetensors").string(), keep).ok());
      std::filesystem::copy_file(dq + "/config.json", tmp.path / "config.json");
      auto m = load_model(tmp.path.string(), LoadOptions{.need_tokenizer = false});
      REQUIRE(!m.ok());
      CHECK(m.status().message().find(drop) != std::string::npos);
    }
    {  // k_proj's quant_state says another shape
      test::TempDir tmp;
      std::vector<TensorToWrite> keep;
      const std::string qs = "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4";
      std::string state;
      for (const auto& [name, e] : (*src)->entries()) {
        if (name == qs) {
          const TensorView v = (*src)->view(e);
          state.assign(static_cast<const char*>(v.data), static_cast<size_t>(v.numel()));
          const size_t at = state.find("[128, 128]");
          REQUIRE(at != std::string::npos);
          state.replace(at, 10, "[128, \"x\"]");  // a shape that is not even numbers
          keep.push_back({name, DType::kU8, {static_cast<int64_t>(state.size())}, state.data()});
        } else {
          keep.push_back({name, e.dtype, e.shape, (*src)->view(e).data});
        }
      }
      REQUIRE(write_safetensors((tmp.path / "model.safetensors").string(), keep).ok());
      std::filesystem::copy_file(dq + "/config.json", tmp.path / "config.json");
      auto m = load_model(tmp.path.string(), LoadOptions{.need_tokenizer = false});
      REQUIRE(!m.ok());
      CHECK(m.status().message().find(qs) != std::string::npos);
    }
  }

  TEST_CASE("a sequence past max_position_embeddings is refused, not computed") {
    Loaded l = load(test::shared_dir() + "/models/stories260K", 2048);
    std::vector<int32_t> ids(l.model.config.n_ctx_max + 1, 5);
    auto logits = prompt_logits(*l.runner, ids);
    REQUIRE(!logits.ok());
    CHECK(logits.status().message().find("max_position_embeddings") != std::string::npos);
    GenerateOptions go;
    go.n_predict = 4;
    auto res = generate(*l.runner, {ids}, go);
    CHECK(!res.ok());
  }
}
