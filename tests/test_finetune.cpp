// LoRA training on the CPU against peft: ../shared/golden/llama-gqa/lora_{bf16,nf4}.safetensors hold
// peft's initial adapters, the gradient of Hugging Face's causal-LM loss at them, the weights after
// three AdamW steps and the losses along the way.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "cpu/cpu_executor.h"
#include "cpu/lora_train.h"
#include "runtime/finetune.h"
#include "runtime/generate.h"
#include "runtime/lora.h"
#include "runtime/model.h"
#include "test_util.h"

namespace ferry {
namespace {

// max |a - b| / max |b|.
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

// peft's in-memory name of a pair's tensor (with ".default").
std::string golden_name(int64_t il, LayerTensor t, bool a) {
  std::string n = LoraAdapter::tensor_name(il, t, a);
  return n.substr(0, n.size() - std::string(".weight").size()) + ".default.weight";
}

// The golden adapter (suffix "", ".grad" or ".after3") in ferry's layout.
LoraAdapter golden_adapter(const ModelConfig& c, const SafetensorsFile& f, const std::string& suffix) {
  LoraConfig lc;
  lc.rank = 8, lc.alpha = 16;
  lc.targets.assign(std::begin(kLoraTargets), std::end(kLoraTargets));
  LoraAdapter w = LoraAdapter::zeros(c, lc);
  for (int64_t il = 0; il < c.n_layers; ++il)
    for (LayerTensor t : lc.targets) {
      w.layers[il][t].a = test::read_f32(f, golden_name(il, t, true) + suffix);
      w.layers[il][t].b = test::read_f32(f, golden_name(il, t, false) + suffix);
      REQUIRE(w.layers[il][t].a.size() == static_cast<size_t>(8 * w.layers[il][t].in));
      REQUIRE(w.layers[il][t].b.size() == static_cast<size_t>(8 * w.layers[il][t].out));
    }
  return w;
}

// The worst relative error over every A and B of the adapter.
double worst(const LoraAdapter& got, const LoraAdapter& want, std::string* where) {
  double e = 0;
  for (size_t il = 0; il < got.layers.size(); ++il)
    for (LayerTensor t : got.cfg.targets)
      for (bool a : {true, false}) {
        const double x = rel_err(a ? got.layers[il][t].a : got.layers[il][t].b, a ? want.layers[il][t].a : want.layers[il][t].b);
        if (x > e) e = x, *where = LoraAdapter::tensor_name(static_cast<int64_t>(il), t, a);
      }
  return e;
}

cpu::TrainBatch golden_batch(const SafetensorsFile& f) {
  cpu::TrainBatch b;
  b.ids = test::read_i32(f, "input_ids");
  b.labels = test::read_i32(f, "labels");
  b.rows = f.find("input_ids")->shape[0];
  b.len = f.find("input_ids")->shape[1];
  return b;
}

// The golden llama-gqa model (its base BF16, or NF4 for "nf4") and peft's file for it.
struct GoldenLora {
  Model m;
  std::unique_ptr<SafetensorsFile> f;
};
GoldenLora golden_lora(const std::string& kind) {
  const std::string dir = test::shared_dir() + "/golden/llama-gqa";
  auto m = load_model(dir, LoadOptions{.need_tokenizer = false, .quant = kind == "nf4" ? DType::kNF4 : DType::kBF16});
  REQUIRE_MESSAGE(m.ok(), m.status().message());
  auto f = SafetensorsFile::open(dir + "/lora_" + kind + ".safetensors");
  REQUIRE(f.ok());
  return {std::move(*m), std::move(*f)};
}

}  // namespace

TEST_SUITE("finetune") {
  TEST_CASE("LoRA loss, gradients and three AdamW steps match peft (BF16 and NF4 base)") {
    for (const std::string kind_s : {"bf16", "nf4"}) {
      CAPTURE(kind_s);
      GoldenLora gl = golden_lora(kind_s);
      Model* m = &gl.m;
      auto* f = &gl.f;
      const ModelConfig& c = m->config;
      LoraAdapter w = golden_adapter(c, **f, "");
      const cpu::TrainBatch batch = golden_batch(**f);
      const std::vector<float> losses = test::read_f32(**f, "losses");
      REQUIRE(losses.size() == 4);

      LoraAdapter g;
      auto r = cpu::lora_loss(*m->weights, w, batch, &g);
      REQUIRE_MESSAGE(r.ok(), r.status().message());
      CHECK(r->n_tokens == 2 * (48 - 8));
      INFO("loss " << r->loss << " peft " << losses[0]);
      CHECK(std::fabs(r->loss - losses[0]) <= 1e-5 * std::fabs(losses[0]));
      std::string where;
      const double eg = worst(g, golden_adapter(c, **f, ".grad"), &where);
      INFO("gradient: worst " << eg << " at " << where);
      MESSAGE(kind_s << ": loss " << r->loss << " (peft " << losses[0] << ", relative " << std::fabs(r->loss - losses[0]) / losses[0] << "); gradient worst " << eg);
      CHECK(eg < 2e-4);

      // The forward alone gives the same loss; a B of all zeros gives the base model's loss, and
      // the gradient then reaches only the B matrices.
      auto r0 = cpu::lora_loss(*m->weights, w, batch, nullptr);
      REQUIRE(r0.ok());
      CHECK(r0->loss == r->loss);

      AdamW opt(w, AdamWParams{.lr = 1e-3});
      for (int step = 0; step < 3; ++step) {
        auto rs = cpu::lora_loss(*m->weights, w, batch, &g);
        REQUIRE(rs.ok());
        INFO("step " << step << ": " << rs->loss << " peft " << losses[step]);
        CHECK(std::fabs(rs->loss - losses[step]) <= 1e-5 * std::fabs(losses[step]));
        opt.step(w, g);
      }
      auto rl = cpu::lora_loss(*m->weights, w, batch, nullptr);
      REQUIRE(rl.ok());
      CHECK(std::fabs(rl->loss - losses[3]) <= 1e-5 * std::fabs(losses[3]));
      CHECK(losses[3] < losses[0]);
      // Adam divides by the gradient's own size, so an entry whose gradient is near zero at some step
      // (1e-7 of the largest) moves by up to a full step whichever way float32 rounding tips it, in
      // peft as here. So: the three steps' movement as a whole within 1% (L2) of peft's, and fewer than
      // 1 entry in 1000 more than 2% of a step (2e-5) from peft's.
      const LoraAdapter want = golden_adapter(c, **f, ".after3"), w0 = golden_adapter(c, **f, "");
      int64_t off = 0, total = 0;
      double diff2 = 0, move2 = 0;
      for (size_t il = 0; il < w.layers.size(); ++il)
        for (LayerTensor t : w.cfg.targets)
          for (bool a : {true, false}) {
            const auto& x = a ? w.layers[il][t].a : w.layers[il][t].b;
            const auto& y = a ? want.layers[il][t].a : want.layers[il][t].b;
            const auto& x0 = a ? w0.layers[il][t].a : w0.layers[il][t].b;
            for (size_t i = 0; i < x.size(); ++i, ++total) {
              const double e = static_cast<double>(x[i]) - y[i], mv = static_cast<double>(y[i]) - x0[i];
              diff2 += e * e, move2 += mv * mv;
              off += std::fabs(e) > 2e-5;
            }
          }
      MESSAGE(kind_s << ": after 3 AdamW steps the movement is off by " << std::sqrt(diff2 / move2) << " (L2), " << off << " of " << total << " entries by > 2e-5");
      INFO("after 3 AdamW steps: movement off by " << std::sqrt(diff2 / move2) << " (L2); " << off << " of " << total << " entries off by > 2e-5");
      CHECK(std::sqrt(diff2 / move2) < 1e-2);
      CHECK(off * 1000 < total);
    }
  }

  TEST_CASE("a zero B: the base model's loss, and gradients only for B") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto m = load_model(dir, LoadOptions{.need_tokenizer = false});
    REQUIRE(m.ok());
    auto f = SafetensorsFile::open(dir + "/lora_bf16.safetensors");
    REQUIRE(f.ok());
    auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gold.ok());
    LoraConfig lc;
    lc.targets = {kWq, kWv};
    LoraAdapter w = LoraAdapter::init(m->config, lc, 7);
    // seq0 alone as one row, every position trained: the loss from golden's logits.
    cpu::TrainBatch b;
    b.ids = test::read_i32(**gold, "seq0.input_ids");
    b.rows = 1, b.len = static_cast<int64_t>(b.ids.size());
    b.labels = b.ids;
    const std::vector<float> logits = test::read_f32(**gold, "seq0.logits");
    const int64_t V = m->config.n_vocab;
    double want = 0;
    for (int64_t t = 0; t + 1 < b.len; ++t) {
      const float* lg = logits.data() + t * V;
      double mx = lg[0], s = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(lg[v]));
      for (int64_t v = 0; v < V; ++v) s += std::exp(lg[v] - mx);
      want += std::log(s) + mx - lg[b.ids[t + 1]];
    }
    want /= static_cast<double>(b.len - 1);
    LoraAdapter g;
    auto r = cpu::lora_loss(*m->weights, w, b, &g);
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    CHECK(std::fabs(r->loss - want) <= 1e-5 * want);
    for (const auto& layer : g.layers) {
      for (int t = 0; t < kLayerTensorCount; ++t) {
        if (!lc.targets_has(static_cast<LayerTensor>(t))) {
          CHECK(layer[t].empty());
          continue;
        }
        double na = 0, nb = 0;
        for (float x : layer[t].a) na += std::fabs(x);
        for (float x : layer[t].b) nb += std::fabs(x);
        CHECK(na == 0);
        CHECK(nb > 0);
      }
    }
  }

  TEST_CASE("the gradient against finite differences (Qwen2 biases, tied embedding)") {
    // A model the golden LoRA files do not cover: central differences of the loss in float64
    // would need a float64 forward, so this checks the directional derivative along the gradient
    // itself, which a sign or a missing term would break by far more than float32 noise.
    const std::string dir = test::shared_dir() + "/golden/qwen2-bias";
    auto m = load_model(dir, LoadOptions{.need_tokenizer = false});
    REQUIRE(m.ok());
    LoraConfig lc;
    lc.targets.assign(std::begin(kLoraTargets), std::end(kLoraTargets));
    LoraAdapter w = LoraAdapter::init(m->config, lc, 11);
    for (auto& layer : w.layers)  // a non-zero B so every path carries gradient
      for (LayerTensor t : lc.targets)
        for (size_t i = 0; i < layer[t].b.size(); ++i) layer[t].b[i] = 0.02f * std::sin(static_cast<float>(i) * 0.7f + 0.3f);
    cpu::TrainBatch b;
    b.rows = 2, b.len = 20;
    for (int64_t i = 0; i < b.rows * b.len; ++i) b.ids.push_back(static_cast<int32_t>((i * 37 + 5) % m->config.n_vocab));
    b.labels = b.ids;
    for (int64_t i = 0; i < 4; ++i) b.labels[i] = cpu::kIgnoreLabel;
    LoraAdapter g;
    auto r = cpu::lora_loss(*m->weights, w, b, &g);
    REQUIRE(r.ok());
    double gg = 0;
    for (const auto& layer : g.layers)
      for (LayerTensor t : lc.targets) {
        for (float x : layer[t].a) gg += static_cast<double>(x) * x;
        for (float x : layer[t].b) gg += static_cast<double>(x) * x;
      }
    REQUIRE(gg > 0);
    const double eps = 1e-2 / std::sqrt(gg);
    auto shifted = [&](double sgn) {
      LoraAdapter v = w;
      for (size_t il = 0; il < v.layers.size(); ++il)
        for (LayerTensor t : lc.targets) {
          for (size_t i = 0; i < v.layers[il][t].a.size(); ++i) v.layers[il][t].a[i] += static_cast<float>(sgn * eps * g.layers[il][t].a[i]);
          for (size_t i = 0; i < v.layers[il][t].b.size(); ++i) v.layers[il][t].b[i] += static_cast<float>(sgn * eps * g.layers[il][t].b[i]);
        }
      auto rr = cpu::lora_loss(*m->weights, v, b, nullptr);
      REQUIRE(rr.ok());
      return rr->loss;
    };
    const double fd = (shifted(1) - shifted(-1)) / (2 * eps);
    INFO("directional derivative " << fd << " against |g|^2 " << gg);
    CHECK(std::fabs(fd - gg) < 2e-2 * gg);
  }

  TEST_CASE("adapters: peft's files written atomically, read back; bad ones refused by name") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto m = load_model(dir, LoadOptions{.need_tokenizer = false});
    REQUIRE(m.ok());
    test::TempDir tmp;
    LoraConfig lc;
    lc.rank = 4, lc.alpha = 8;
    lc.targets = {kWq, kWk, kWDown};
    LoraAdapter w = LoraAdapter::init(m->config, lc, 3);
    for (auto& layer : w.layers)
      for (float& x : layer[kWDown].b) x = 0.25f;
    const std::string out = tmp / "adapter";
    REQUIRE(save_lora(w, out, "golden/llama-gqa").ok());
    CHECK(std::filesystem::exists(out + "/adapter_model.safetensors"));
    auto back = load_lora(m->config, out);
    REQUIRE_MESSAGE(back.ok(), back.status().message());
    CHECK(back->cfg.rank == 4);
    CHECK(back->cfg.alpha == 8);
    CHECK(back->cfg.targets == lc.targets);
    for (size_t il = 0; il < w.layers.size(); ++il)
      for (LayerTensor t : lc.targets) {
        CHECK(back->layers[il][t].a == w.layers[il][t].a);
        CHECK(back->layers[il][t].b == w.layers[il][t].b);
      }
    // No temporary files are left beside them.
    int n = 0;
    for (const auto& e : std::filesystem::directory_iterator(out)) n += 1 + 0 * static_cast<int>(e.path().empty());
    CHECK(n == 2);

    auto write = [&](const std::string& text) {
      std::ofstream(out + "/adapter_config.json") << text;
      auto r = load_lora(m->config, out);
      CHECK(!r.ok());
      return r.ok() ? std::string() : r.status().message();
    };
    CHECK(write("{").find("adapter_config.json") != std::string::npos);
    CHECK(write(R"({"peft_type": "IA3", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})").find("IA3") != std::string::npos);
    CHECK(write(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true})").find("use_dora") != std::string::npos);
    CHECK(write(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]})").find("lm_head") != std::string::npos);
    // A rank that disagrees with the tensors: the tensor is named.
    CHECK(write(R"({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"]})").find("lora_A") != std::string::npos);
    // Targets the file lacks tensors for; then tensors the config does not name.
    CHECK(write(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})").find("v_proj") != std::string::npos);
    CHECK(write(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"]})").find("down_proj") != std::string::npos);
    CHECK(!parse_lora_targets("q,banana").ok());
    CHECK(parse_lora_targets("all")->size() == 7);
  }

  TEST_CASE("inference with an adapter (CpuExecutor, --lora) gives peft's loss") {
    // peft's loss at the initial adapter (B not zero) from the inference path's logits: the adapter
    // goes through peft's files (save_lora, load_lora) and the executor's unmerged products.
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    for (const std::string kind_s : {"bf16", "nf4"}) {
      CAPTURE(kind_s);
      GoldenLora gl = golden_lora(kind_s);
      Model* m = &gl.m;
      auto* f = &gl.f;
      test::TempDir tmp;
      REQUIRE(save_lora(golden_adapter(m->config, **f, ""), tmp / "a", dir).ok());
      auto lora = load_lora(m->config, tmp / "a");
      REQUIRE(lora.ok());
      const cpu::TrainBatch b = golden_batch(**f);
      const int64_t V = m->config.n_vocab;
      double total = 0;
      int64_t n = 0;
      for (int64_t row = 0; row < b.rows; ++row) {
        KvCacheShape shape;
        shape.n_layers = m->config.n_layers, shape.n_kv_heads = m->config.n_kv_heads, shape.head_dim = m->config.head_dim;
        shape.block_size = 16, shape.n_blocks = 8, shape.dtype = DType::kF32;
        auto kv = KvCache::create(shape);
        REQUIRE(kv.ok());
        cpu::CpuExecutor ex(m->config);
        ex.set_lora(std::make_shared<const LoraAdapter>(*lora));
        Runner r(*m->weights, ex, *kv);
        const std::vector<int32_t> ids(b.ids.begin() + row * b.len, b.ids.begin() + (row + 1) * b.len);
        auto logits = prompt_logits(r, ids);
        REQUIRE(logits.ok());
        for (int64_t t = 0; t + 1 < b.len; ++t) {
          const int32_t y = b.labels[row * b.len + t + 1];
          if (y == cpu::kIgnoreLabel) continue;
          const float* lg = logits->data() + t * V;
          double mx = lg[0], sum = 0;
          for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(lg[v]));
          for (int64_t v = 0; v < V; ++v) sum += std::exp(lg[v] - mx);
          total += std::log(sum) + mx - lg[y];
          ++n;
        }
      }
      const double loss = total / static_cast<double>(n), want = test::read_f32(**f, "losses")[0];
      MESSAGE(kind_s << ": inference loss with the adapter " << loss << ", peft " << want << " (relative " << std::fabs(loss - want) / want << ")");
      CHECK(std::fabs(loss - want) <= 1e-5 * want);
    }
  }

  TEST_CASE("ferry finetune: trains a real model, writes peft files, run --lora uses them; bad input refused by name") {
    const std::string model = test::shared_dir() + "/models/stories260K";
    test::TempDir tmp;
    {
      std::ofstream d(tmp / "data.jsonl");
      d << R"({"text": "Once upon a time there was a little dog named Max. Max liked to run in the park."})" << "\n\n";
      d << R"({"prompt": "Tom had a red ball.", "completion": " He gave it to his friend Sue."})" << "\n";
    }
    const std::string out = tmp / "adapter";
    auto r = test::run_ferry("finetune -m " + model + " --quant bf16 --data " + (tmp / "data.jsonl") + " --out " + out +
                             " --steps 12 --batch 2 --lr 1e-2 -r 8 --alpha 16 --log " + (tmp / "log.json"));
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    CHECK(std::filesystem::exists(out + "/adapter_model.safetensors"));
    CHECK(std::filesystem::exists(out + "/adapter_config.json"));
    // The loss falls: the last step's below half the first's (the same two examples every step).
    std::ifstream lf(tmp / "log.json");
    const nlohmann::json log = nlohmann::json::parse(lf);
    REQUIRE(log.size() == 12);
    CHECK(log[11]["loss"].get<double>() < 0.5 * log[0]["loss"].get<double>());
    // Greedy text with the adapter continues the trained story; without it the model's own.
    auto with = test::run_ferry("run -m " + model + " --lora " + out + " -p \"Once upon a time\" -n 16 --temp 0", true);
    auto without = test::run_ferry("run -m " + model + " -p \"Once upon a time\" -n 16 --temp 0", true);
    REQUIRE(with.exit_code == 0);
    REQUIRE(without.exit_code == 0);
    INFO("with: " << with.output << " without: " << without.output);
    CHECK(with.output.find("dog named Max") != std::string::npos);
    CHECK(without.output.find("dog named Max") == std::string::npos);
    // Throughput mode too.
    std::ofstream(tmp / "p.jsonl") << R"({"prompt": "Once upon a time", "max_tokens": 12})" << "\n";
    auto served = test::run_ferry("run -m " + model + " --lora " + out + " --prompts " + (tmp / "p.jsonl") + " --out " + (tmp / "o.jsonl") +
                                  " --temp 0 --no-progress");
    CHECK(served.exit_code == 0);
    std::ifstream of(tmp / "o.jsonl");
    std::string line;
    std::getline(of, line);
    CHECK(line.find("dog named Max") != std::string::npos);
    // --init-adapter continues from it (its rank); the loss starts where training left off.
    auto cont = test::run_ferry("finetune -m " + model + " --quant bf16 --data " + (tmp / "data.jsonl") + " --out " + (tmp / "b") +
                                " --steps 1 --batch 2 --init-adapter " + out);
    CHECK(cont.exit_code == 0);
    CHECK(cont.output.find("r=8") != std::string::npos);
    auto cut = test::run_ferry("finetune -m " + model + " --quant bf16 --data " + (tmp / "data.jsonl") + " --out " + (tmp / "b") + " --steps 1 --seq-len 12");
    CHECK(cut.exit_code == 0);
    CHECK(cut.output.find("2 of 2 examples are longer than --seq-len 12") != std::string::npos);

    auto bad = [&](const std::string& line, const std::string& extra = "") {
      std::ofstream(tmp / "bad.jsonl") << line << "\n";
      auto b = test::run_ferry("finetune -m " + model + " --quant bf16 --data " + (tmp / "bad.jsonl") + " --out " + (tmp / "c") + " --steps 1 " + extra);
      CHECK(b.exit_code != 0);
      return b.output;
    };
    CHECK(bad("{\"text\": 5}").find("bad.jsonl:1") != std::string::npos);
    CHECK(bad("[1, 2]").find("not a JSON object") != std::string::npos);
    CHECK(bad(R"({"ids": [1, 99999]})").find("99999") != std::string::npos);
    CHECK(bad(R"({"ids": [1, 2, 3], "labels": [-100, -100, -100]})").find("nothing to train on") != std::string::npos);
    CHECK(bad(R"({"text": "a b c"})", "--device gpu").find("--device gpu") != std::string::npos);
    CHECK(bad(R"({"text": "a b c"})", "--gpu-mem 1G").find("--gpu-mem") != std::string::npos);
    CHECK(bad(R"({"text": "a b c"})", "--targets q,zz").find("zz") != std::string::npos);
    // NF4 (the default) refuses a model whose rows are not whole blocks of 64, naming the tensor.
    auto nf4 = test::run_ferry("finetune -m " + model + " --data " + (tmp / "data.jsonl") + " --out " + (tmp / "d") + " --steps 1");
    CHECK(nf4.exit_code != 0);
    CHECK(nf4.output.find("multiple of 64") != std::string::npos);
    // The frozen base read from a packed store (--disk: two layers in memory at a time, the backward
    // reading down the layers) trains the same adapter bit for bit.
    REQUIRE(test::run_ferry("pack -m " + model + " --out " + (tmp / "store")).exit_code == 0);
    const std::string same = " --data " + (tmp / "data.jsonl") + " --steps 3 --batch 2 --lr 1e-2 -r 8 --alpha 16 --seed 4 --out ";
    auto from_disk = test::run_ferry("finetune -m " + model + " --disk " + (tmp / "store") + same + (tmp / "fd"));
    auto from_host = test::run_ferry("finetune -m " + model + " --quant bf16" + same + (tmp / "fh"));
    INFO(from_disk.output);
    REQUIRE((from_disk.exit_code == 0 && from_host.exit_code == 0));
    CHECK(from_disk.output.find("packed store") != std::string::npos);
    auto fd = SafetensorsFile::open(tmp / "fd/adapter_model.safetensors");
    auto fh = SafetensorsFile::open(tmp / "fh/adapter_model.safetensors");
    REQUIRE((fd.ok() && fh.ok()));
    for (const auto& [name, e] : (*fh)->entries()) CHECK(test::read_f32(**fd, name) == test::read_f32(**fh, name));
    // An adapter that overflows the forward: refused at the step, nothing saved over the output.
    {
      auto cfg = load_model(model, LoadOptions{.need_tokenizer = false});
      REQUIRE(cfg.ok());
      LoraConfig lc;
      lc.rank = 2, lc.targets = {kWDown};
      LoraAdapter huge = LoraAdapter::init(cfg->config, lc, 1);
      for (auto& layer : huge.layers) std::fill(layer[kWDown].b.begin(), layer[kWDown].b.end(), 3e38f);
      REQUIRE(save_lora(huge, tmp / "huge", model).ok());
      auto nan = test::run_ferry("finetune -m " + model + " --quant bf16 --data " + (tmp / "data.jsonl") + " --out " + (tmp / "g") + " --steps 2 --init-adapter " + (tmp / "huge"));
      CHECK(nan.exit_code != 0);
      CHECK(nan.output.find("not finite") != std::string::npos);
      CHECK(!std::filesystem::exists(tmp / "g/adapter_model.safetensors"));
    }
    // A bitsandbytes checkpoint trains as stored without --quant (QLoRA's usual start).
    std::ofstream(tmp / "ids.jsonl") << R"({"ids": [1, 5, 9, 22, 40, 41, 42, 3, 7, 11]})" << "\n";
    auto bnb = test::run_ferry("finetune -m " + test::data_dir() + "/bnb4-nf4-dq --data " + (tmp / "ids.jsonl") + " --out " + (tmp / "e") + " --steps 2");
    CHECK(bnb.exit_code == 0);
    CHECK(bnb.output.find("double-quantised absmax as stored") != std::string::npos);
    // An adapter for another model is refused by tensor.
    auto other = test::run_ferry("run -m " + test::shared_dir() + "/golden/llama-gqa --lora " + out + " -p hi -n 1 --device cpu");
    other = test::run_ferry("logits -m " + test::shared_dir() + "/golden/llama-gqa --lora " + out + " --ids 1,2,3 --out " + (tmp / "l.safetensors"));
    CHECK(other.exit_code != 0);
    CHECK(other.output.find("--lora") != std::string::npos);
  }

  TEST_CASE("rows of different lengths: a padded batch's gradient is the token-weighted mean of each row's") {
    auto m = load_model(test::shared_dir() + "/golden/llama-gqa", LoadOptions{.need_tokenizer = false, .quant = DType::kNF4});
    REQUIRE(m.ok());
    LoraConfig lc;
    lc.targets.assign(std::begin(kLoraTargets), std::end(kLoraTargets));
    LoraAdapter w = LoraAdapter::init(m->config, lc, 5);
    for (auto& layer : w.layers)
      for (LayerTensor t : lc.targets)
        for (size_t i = 0; i < layer[t].b.size(); ++i) layer[t].b[i] = 0.03f * std::cos(static_cast<float>(i));
    std::vector<FinetuneExample> ex(2);
    for (int i = 0; i < 30; ++i) ex[0].ids.push_back((i * 53 + 7) % 2048);
    for (int i = 0; i < 17; ++i) ex[1].ids.push_back((i * 31 + 3) % 2048);
    ex[0].labels = ex[0].ids, ex[1].labels = ex[1].ids;
    ex[1].labels[0] = ex[1].labels[1] = ex[1].labels[2] = cpu::kIgnoreLabel;
    cpu::LoraTrainer tr(*m->weights);
    LoraAdapter g_both, g0, g1;
    const cpu::TrainBatch both = make_train_batch(ex, 0, 2, 2);
    CHECK(both.len == 30);
    auto rb = tr.loss(w, both, &g_both);
    auto r0 = tr.loss(w, make_train_batch(ex, 0, 1, 2), &g0);
    auto r1 = tr.loss(w, make_train_batch(ex, 1, 1, 2), &g1);
    REQUIRE((rb.ok() && r0.ok() && r1.ok()));
    CHECK(rb->n_tokens == r0->n_tokens + r1->n_tokens);
    CHECK(r1->n_tokens == 14);
    const double mean = (r0->loss * r0->n_tokens + r1->loss * r1->n_tokens) / static_cast<double>(rb->n_tokens);
    CHECK(std::fabs(rb->loss - mean) <= 1e-5 * mean);
    LoraAdapter acc = LoraAdapter::zeros(m->config, lc);
    lora_axpy(acc, static_cast<float>(r0->n_tokens) / static_cast<float>(rb->n_tokens), g0);
    lora_axpy(acc, static_cast<float>(r1->n_tokens) / static_cast<float>(rb->n_tokens), g1);
    std::string where;
    const double e = worst(g_both, acc, &where);
    INFO("worst " << e << " at " << where);
    CHECK(e < 1e-4);
    // Clipping arithmetic: the norm scales.
    const double n = lora_norm(acc);
    lora_scale(acc, 0.5f);
    CHECK(std::fabs(lora_norm(acc) - 0.5 * n) <= 1e-6 * n);
  }

  TEST_CASE("ferry finetune: --resume continues bit for bit; SIGINT saves a resumable state; mismatched states refused") {
    const std::string model = test::shared_dir() + "/models/stories260K";
    test::TempDir tmp;
    {
      std::ofstream d(tmp / "data.jsonl");
      for (int i = 0; i < 5; ++i) d << "{\"text\": \"Once upon a time there was a cat number " << i << ". It liked milk and naps in the sun.\"}\n";
      std::ofstream e(tmp / "eval.jsonl");
      e << R"({"text": "One day a cat saw a bird."})" << "\n";
    }
    const std::string common = "finetune -m " + model + " --quant bf16 --data " + (tmp / "data.jsonl") + " --batch 2 --grad-accum 2 --lr 5e-3 -r 4 --alpha 8 --seed 9 ";
    auto full = test::run_ferry(common + "--steps 6 --out " + (tmp / "full") + " --eval-data " + (tmp / "eval.jsonl") + " --log " + (tmp / "full.json"));
    INFO(full.output);
    REQUIRE(full.exit_code == 0);
    CHECK(full.output.find("eval loss") != std::string::npos);
    auto half = test::run_ferry(common + "--steps 3 --out " + (tmp / "part"));
    REQUIRE(half.exit_code == 0);
    CHECK(std::filesystem::exists(tmp / "part/training_state.safetensors"));
    auto rest = test::run_ferry(common + "--steps 6 --out " + (tmp / "part") + " --resume " + (tmp / "part"));
    INFO(rest.output);
    REQUIRE(rest.exit_code == 0);
    CHECK(rest.output.find("steps 4..6") != std::string::npos);
    auto a = load_lora(load_model(model, LoadOptions{.need_tokenizer = false})->config, tmp / "full");
    auto b = load_lora(load_model(model, LoadOptions{.need_tokenizer = false})->config, tmp / "part");
    REQUIRE((a.ok() && b.ok()));
    bool same = true;
    for (size_t il = 0; il < a->layers.size(); ++il)
      for (LayerTensor t : a->cfg.targets) same &= a->layers[il][t].a == b->layers[il][t].a && a->layers[il][t].b == b->layers[il][t].b;
    CHECK(same);
    // Already done: refused.
    CHECK(test::run_ferry(common + "--steps 6 --out " + (tmp / "part") + " --resume " + (tmp / "part")).exit_code != 0);
    // An adapter from another step than the optimizer state (an interrupted save): refused by name.
    std::filesystem::copy_file(tmp / "full/adapter_model.safetensors", tmp / "part/adapter_model.safetensors", std::filesystem::copy_options::overwrite_existing);
    std::filesystem::copy_file(tmp / "full/training_state.safetensors", tmp / "mixed_state", std::filesystem::copy_options::overwrite_existing);
    auto half2 = test::run_ferry(common + "--steps 2 --out " + (tmp / "two"));
    REQUIRE(half2.exit_code == 0);
    std::filesystem::copy_file(tmp / "full/adapter_model.safetensors", tmp / "two/adapter_model.safetensors", std::filesystem::copy_options::overwrite_existing);
    auto mixed = test::run_ferry(common + "--steps 8 --out " + (tmp / "two") + " --resume " + (tmp / "two"));
    CHECK(mixed.exit_code != 0);
    CHECK(mixed.output.find("interrupted") != std::string::npos);
    // SIGINT: the step in flight finishes, adapter and state are written, exit 130; --resume goes on.
    const std::string log = tmp / "sig.log";
    auto sig = test::run_shell("bash -c '" + std::string(FERRY_BIN) + " " + common + "--steps 100000 --out " + (tmp / "sig") + " 2>" + log +
                               " & pid=$!; for i in $(seq 600); do grep -q \"^step 3/\" " + log + " && break; sleep 0.1; done; kill -INT $pid; wait $pid; echo exit=$?; cat " +
                               log + "'");
    INFO(sig.output);
    CHECK(sig.output.find("exit=130") != std::string::npos);
    CHECK(sig.output.find("continue with --resume") != std::string::npos);
    const size_t at = sig.output.find("after step ");
    REQUIRE(at != std::string::npos);
    const long done = std::stol(sig.output.substr(at + 11));
    CHECK(done >= 3);
    auto more = test::run_ferry(common + "--steps " + std::to_string(done + 1) + " --out " + (tmp / "sig") + " --resume " + (tmp / "sig"));
    INFO(more.output);
    CHECK(more.exit_code == 0);
    CHECK(more.output.find("steps " + std::to_string(done + 1) + ".." + std::to_string(done + 1)) != std::string::npos);
  }

  TEST_CASE("bad training batches are refused with what is wrong") {
    auto m = load_model(test::shared_dir() + "/golden/llama-gqa", LoadOptions{.need_tokenizer = false});
    REQUIRE(m.ok());
    LoraConfig lc;
    lc.targets = {kWq};
    const LoraAdapter w = LoraAdapter::init(m->config, lc, 1);
    cpu::TrainBatch b;
    b.rows = 1, b.len = 4, b.ids = {1, 2, 3, 4}, b.labels = {1, 2, 3, 4};
    CHECK(cpu::lora_loss(*m->weights, w, b, nullptr).ok());
    b.ids[2] = 99999;
    auto r = cpu::lora_loss(*m->weights, w, b, nullptr);
    REQUIRE(!r.ok());
    CHECK(r.status().message().find("99999") != std::string::npos);
    b.ids[2] = 3, b.labels = {-100, -100, -100, -100};
    r = cpu::lora_loss(*m->weights, w, b, nullptr);
    REQUIRE(!r.ok());
    CHECK(r.status().message().find("no position") != std::string::npos);
    b.labels = {1, 2, 5000, 4};
    CHECK(!cpu::lora_loss(*m->weights, w, b, nullptr).ok());
    b.labels = {1, 2};
    CHECK(!cpu::lora_loss(*m->weights, w, b, nullptr).ok());
  }
}

}  // namespace ferry
