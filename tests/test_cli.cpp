// The ferry binary end to end: the happy paths (run streams llama2.c's story, logits, inspect,
// tokenize) and one test per class of bad input, each of which must end in a message naming the
// file, tensor or flag and an exit code of 1 or 2, never a crash.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "gpu/device.h"
#include "models/safetensors.h"
#include "models/tokenizer.h"
#include "test_util.h"

using namespace ferry;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
void write_file(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

// A copy of a golden model directory that a test may damage.
struct ModelCopy {
  test::TempDir tmp;
  explicit ModelCopy(const std::string& src) {
    for (const auto& e : fs::directory_iterator(src))
      if (e.path().filename() != "golden.safetensors" && e.path().extension() != ".bin")
        fs::copy_file(e.path(), tmp.path / e.path().filename());
  }
  std::string dir() const { return tmp.path.string(); }
  // Overwrites element `i` of BF16 tensor `name` in model.safetensors with the bits `v`.
  void set_bf16(const std::string& name, int64_t i, uint16_t v) {
    std::string bytes = read_file(file("model.safetensors"));
    uint64_t hl;
    std::memcpy(&hl, bytes.data(), 8);
    const json h = json::parse(bytes.substr(8, hl));
    REQUIRE(h[name]["dtype"] == "BF16");
    const uint64_t off = 8 + hl + h[name]["data_offsets"][0].get<uint64_t>() + 2 * static_cast<uint64_t>(i);
    std::memcpy(bytes.data() + off, &v, 2);
    write_file(file("model.safetensors"), bytes);
  }
  std::string file(const std::string& n) const { return (tmp.path / n).string(); }
  // Rewrites model.safetensors' header with `edit` applied, keeping the data section.
  template <typename F>
  void edit_header(F edit) {
    const std::string bytes = read_file(file("model.safetensors"));
    uint64_t hl;
    std::memcpy(&hl, bytes.data(), 8);
    json h = json::parse(bytes.substr(8, hl));
    edit(h);
    std::string hs = h.dump();
    while (hs.size() % 8 != 0) hs.push_back(' ');  // as writers pad it: the tensors stay aligned
    uint64_t nl = hs.size();
    std::string out(reinterpret_cast<const char*>(&nl), 8);
    out += hs + bytes.substr(8 + hl);
    write_file(file("model.safetensors"), out);
  }
};

std::string q(const std::string& s) { return "'" + s + "'"; }

// Runs ferry, expects a clean failure (exit 1 or 2) whose output contains every string in `names`.
void expect_error(const std::string& args, std::initializer_list<std::string> names) {
  test::CmdResult r = test::run_ferry(args);
  CAPTURE(args);
  CAPTURE(r.output);
  CHECK((r.exit_code == 1 || r.exit_code == 2));
  CHECK(r.output.find("error") != std::string::npos);
  for (const auto& n : names) CHECK_MESSAGE(r.output.find(n) != std::string::npos, "message should name " << n);
}

const std::string kGqa = "/golden/llama-gqa";

}  // namespace

TEST_SUITE("cli") {
  TEST_CASE("run streams llama2.c's reference story for stories260K") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    test::CmdResult r = test::run_ferry("run -m " + q(dir) + " -p '' --temp 0 -n 256", true);
    REQUIRE(r.exit_code == 0);
    auto g = SafetensorsFile::open(dir + "/golden.safetensors");
    auto tok = Tokenizer::from_file(dir + "/tokenizer.json");
    REQUIRE(g.ok());
    REQUIRE(tok.ok());
    const std::string want = (*tok)->decode(test::read_i32(**g, "bos.greedy_ids"), true);
    CHECK(want.rfind("Once upon a time, there was a little girl named Lily.", 0) == 0);
    CHECK(r.output == want + "\n");
  }

  TEST_CASE("run prints a summary line; logits, inspect and tokenize work") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    test::CmdResult r = test::run_ferry("run -m " + q(dir) + " -p 'Once upon a time' -n 16 --seed 1 --temp 0.9");
    CHECK(r.exit_code == 0);
    CHECK(r.output.rfind("Once upon a time", 0) == 0);
    CHECK(r.output.find("prompt tokens") != std::string::npos);
    CHECK(r.output.find("tok/s") != std::string::npos);
    test::CmdResult r2 = test::run_ferry("run -m " + q(dir) + " -p 'Once upon a time' -n 16 --seed 1 --temp 0.9");
    CHECK(r2.output.substr(0, r2.output.find("ferry:")) == r.output.substr(0, r.output.find("ferry:")));  // same seed, same text
    test::CmdResult batch = test::run_ferry("run -m " + q(dir) + " -p 'Once upon a time' -p 'Tom had a dog' -n 8 --temp 0", true);
    CHECK(batch.exit_code == 0);
    CHECK(batch.output.find("[0] Once upon a time") != std::string::npos);
    CHECK(batch.output.find("[1] Tom had a dog") != std::string::npos);

    test::TempDir tmp;
    const std::string gq = test::shared_dir() + kGqa;
    auto g = SafetensorsFile::open(gq + "/golden.safetensors");
    REQUIRE(g.ok());
    const auto ids = test::read_i32(**g, "seq0.input_ids");
    std::string ids_s;
    for (int32_t id : ids) {
      if (!ids_s.empty()) ids_s += ',';
      ids_s += std::to_string(id);
    }
    test::CmdResult l = test::run_ferry("logits -m " + q(gq) + " --ids " + ids_s + " --out " + q(tmp / "l.safetensors") + " --device cpu");
    REQUIRE(l.exit_code == 0);
    auto out = SafetensorsFile::open(tmp / "l.safetensors");
    REQUIRE(out.ok());
    std::vector<int64_t> shape;
    const auto got = test::read_f32(**out, "logits", &shape);
    CHECK(shape == std::vector<int64_t>{static_cast<int64_t>(ids.size()), 2048});
    const auto ref = test::read_f32(**g, "seq0.logits");
    double d = 0, m = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      d = std::max(d, static_cast<double>(std::fabs(got[i] - ref[i])));
      m = std::max(m, static_cast<double>(std::fabs(ref[i])));
    }
    CHECK(d / m <= 1e-3);

    test::CmdResult in = test::run_ferry("inspect -m synthetic:llama-2-7b --layers 1");
    CHECK(in.exit_code == 0);
    CHECK(in.output.find("LlamaForCausalLM") != std::string::npos);
    test::CmdResult in2 = test::run_ferry("inspect -m " + q(gq));
    CHECK(in2.exit_code == 0);
    CHECK(in2.output.find("kv heads 2") != std::string::npos);

    test::CmdResult t = test::run_ferry("tokenize -m " + q(test::shared_dir() + "/tokenizers/llama2") + " --specials 'Hello world'");
    CHECK(t.output == "[1, 15043, 3186]\n");
    test::CmdResult t2 = test::run_ferry("tokenize -m " + q(test::shared_dir() + "/tokenizers/llama3/tokenizer.json") + " --decode 9906,1917");
    CHECK(t2.output == "Hello world\n");
    CHECK(test::run_ferry("--help").exit_code == 0);
    CHECK(test::run_ferry("run --help").output.find("Examples") != std::string::npos);
  }

  TEST_CASE("--device gpu without a usable GPU is a clear error; auto falls back to the CPU") {
    if (gpu::probe().n_devices > 0) return;  // a GPU host: the gpu suites cover --device gpu
    expect_error("run -m synthetic:stories15m --device gpu -p hi -n 2", {"--device gpu"});
    test::CmdResult r = test::run_ferry("run -m synthetic:stories15m --device auto -p hi -n 2");
    CHECK(r.exit_code == 0);
    CHECK(r.output.find("[cpu") != std::string::npos);
  }

  TEST_CASE("--quant: nf4 and nf4-dq run and logits work on the CLI, an nf4-dq store gives the same logits; a shape the format cannot hold and a bad name are refused") {
    const std::string gqa = test::shared_dir() + kGqa;
    test::TempDir tmp;
    test::CmdResult r = test::run_ferry("logits -m " + gqa + " --quant nf4 --device cpu --ids 1,5,9 --out " + (tmp / "l.st"));
    CAPTURE(r.output);
    CHECK(r.exit_code == 0);
    CHECK(fs::file_size(tmp / "l.st") > 3 * 2048 * 4);
    test::CmdResult ins = test::run_ferry("inspect -m " + gqa + " --quant nf4");
    CHECK(ins.exit_code == 0);
    CHECK(ins.output.find("quantised to nf4") != std::string::npos);
    expect_error("logits -m " + test::shared_dir() + "/models/stories260K --quant int8 --ids 1,2 --out " + (tmp / "x.st"),
                 {"model.layers.0.mlp.down_proj.weight", "multiple of 16"});
    test::CmdResult bad = test::run_ferry("logits -m " + gqa + " --quant nf5 --ids 1");
    CHECK(bad.exit_code == 2);
    CHECK(bad.output.find("--quant") != std::string::npos);
    // nf4-dq: quantised at load, and packed: the store's logits are the same bytes.
    test::CmdResult dq = test::run_ferry("logits -m " + gqa + " --quant nf4-dq --device cpu --ids 1,5,9 --out " + (tmp / "dq.st"));
    CAPTURE(dq.output);
    CHECK(dq.exit_code == 0);
    test::CmdResult pk = test::run_ferry("pack -m " + gqa + " --quant nf4-dq --out " + (tmp / "store"));
    CAPTURE(pk.output);
    CHECK(pk.exit_code == 0);
    test::CmdResult fd = test::run_ferry("logits -m " + gqa + " --disk " + (tmp / "store") + " --device cpu --ids 1,5,9 --out " + (tmp / "fd.st"));
    CAPTURE(fd.output);
    CHECK(fd.exit_code == 0);
    CHECK(read_file(tmp / "fd.st") == read_file(tmp / "dq.st"));
    CHECK(read_file(tmp / "dq.st") != read_file(tmp / "l.st"));  // not NF4's logits
    test::CmdResult ins_dq = test::run_ferry("inspect -m " + gqa + " --quant nf4-dq");
    CHECK(ins_dq.output.find("quantised to nf4-dq") != std::string::npos);
  }

  TEST_CASE("missing directory") { expect_error("run -m /nonexistent/llama -p hi", {"/nonexistent/llama"}); }

  TEST_CASE("config without required keys") {
    ModelCopy m(test::shared_dir() + kGqa);
    json c = json::parse(read_file(m.file("config.json")));
    c.erase("num_hidden_layers");
    write_file(m.file("config.json"), c.dump());
    expect_error("logits -m " + q(m.dir()) + " --ids 1,2 --out /tmp/x.st", {"config.json", "num_hidden_layers"});
  }

  TEST_CASE("unknown model_type") {
    ModelCopy m(test::shared_dir() + kGqa);
    json c = json::parse(read_file(m.file("config.json")));
    c["model_type"] = "mamba";
    write_file(m.file("config.json"), c.dump());
    expect_error("inspect -m " + q(m.dir()), {"config.json", "mamba"});
  }

  TEST_CASE("truncated safetensors") {
    ModelCopy m(test::shared_dir() + kGqa);
    const std::string b = read_file(m.file("model.safetensors"));
    write_file(m.file("model.safetensors"), b.substr(0, b.size() / 2));
    expect_error("logits -m " + q(m.dir()) + " --ids 1 --out /tmp/x.st", {"model.safetensors", "truncated"});
    write_file(m.file("model.safetensors"), b.substr(0, 5));
    expect_error("logits -m " + q(m.dir()) + " --ids 1 --out /tmp/x.st", {"model.safetensors", "truncated"});
  }

  TEST_CASE("header length past end of file") {
    ModelCopy m(test::shared_dir() + kGqa);
    std::string b = read_file(m.file("model.safetensors"));
    const uint64_t huge = uint64_t{1} << 40;
    std::memcpy(b.data(), &huge, 8);
    write_file(m.file("model.safetensors"), b);
    expect_error("logits -m " + q(m.dir()) + " --ids 1 --out /tmp/x.st", {"model.safetensors", "header length"});
  }

  TEST_CASE("offsets out of bounds") {
    ModelCopy m(test::shared_dir() + kGqa);
    m.edit_header([](json& h) { h["model.layers.1.mlp.up_proj.weight"]["data_offsets"][1] = 1ull << 40; });
    expect_error("logits -m " + q(m.dir()) + " --ids 1 --out /tmp/x.st", {"model.safetensors", "model.layers.1.mlp.up_proj.weight", "outside"});
  }

  TEST_CASE("dtype / shape disagreement, and shape against config") {
    ModelCopy m(test::shared_dir() + kGqa);
    m.edit_header([](json& h) { h["model.layers.0.self_attn.k_proj.weight"]["dtype"] = "F32"; });
    expect_error("logits -m " + q(m.dir()) + " --ids 1 --out /tmp/x.st", {"model.layers.0.self_attn.k_proj.weight", "bytes"});
    ModelCopy m2(test::shared_dir() + kGqa);
    json c = json::parse(read_file(m2.file("config.json")));
    c["intermediate_size"] = 512;
    write_file(m2.file("config.json"), c.dump());
    expect_error("logits -m " + q(m2.dir()) + " --ids 1 --out /tmp/x.st", {"mlp", "shape", "[704, 256]"});
  }

  TEST_CASE("a NaN or an infinity in the weights is refused naming the tensor and layer; non-finite logits stop the run") {
    ModelCopy nan(test::shared_dir() + kGqa);
    nan.set_bf16("model.layers.2.mlp.down_proj.weight", 1234, 0x7fc0);  // NaN
    expect_error("run -m " + q(nan.dir()) + " -p hi -n 2 --device cpu", {"model.layers.2.mlp.down_proj.weight", "(layer 2)", "NaN or an infinity", "element 1234"});
    ModelCopy inf(test::shared_dir() + kGqa);
    inf.set_bf16("model.embed_tokens.weight", 7, 0xff80);  // -inf
    expect_error("logits -m " + q(inf.dir()) + " --ids 1 --out /tmp/x.st --device cpu", {"model.embed_tokens.weight", "NaN or an infinity"});
    // Finite weights whose activations overflow: the final norm's weight at BF16's largest value
    // makes the logits infinite. The step is refused, not sampled from.
    ModelCopy big(test::shared_dir() + kGqa);
    for (int64_t i = 0; i < 256; ++i) big.set_bf16("model.norm.weight", i, 0x7f7f);
    write_file(big.file("req.jsonl"), "{\"ids\": [1, 2, 3]}\n");
    expect_error("run -m " + q(big.dir()) + " --prompts " + q(big.file("req.jsonl")) + " --out " + q(big.file("out.jsonl")) + " -n 2 --temp 0 --device cpu",
                 {"logits of output row", "NaN or an infinity"});
    CHECK(!fs::exists(big.file("out.jsonl")));
    expect_error("logits -m " + q(big.dir()) + " --ids 1,2 --out /tmp/x.st --device cpu", {"logits of output row"});
  }

  TEST_CASE("missing tensor and unexpected tensor") {
    ModelCopy m(test::shared_dir() + kGqa);
    m.edit_header([](json& h) { h.erase("model.layers.3.post_attention_layernorm.weight"); });
    expect_error("logits -m " + q(m.dir()) + " --ids 1 --out /tmp/x.st", {"model.layers.3.post_attention_layernorm.weight", "missing"});
    ModelCopy m2(test::shared_dir() + kGqa);
    json c = json::parse(read_file(m2.file("config.json")));
    c["num_hidden_layers"] = 3;
    write_file(m2.file("config.json"), c.dump());
    expect_error("logits -m " + q(m2.dir()) + " --ids 1 --out /tmp/x.st", {"unexpected tensor", "model.layers.3."});
  }

  TEST_CASE("malformed tokenizer.json") {
    ModelCopy m(test::shared_dir() + "/models/stories260K");
    write_file(m.file("tokenizer.json"), "{\"model\": {\"type\": \"BPE\", \"vocab\": [1, 2]}}");
    expect_error("run -m " + q(m.dir()) + " -p hi", {"tokenizer.json", "vocab"});
    write_file(m.file("tokenizer.json"), "{\"mod");
    expect_error("run -m " + q(m.dir()) + " -p hi", {"tokenizer.json", "JSON"});
  }

  TEST_CASE("prompt longer than max_position_embeddings") {
    std::string prompt;
    for (int i = 0; i < 600; ++i) prompt += "dog ";
    expect_error("run -m " + q(test::shared_dir() + "/models/stories260K") + " -p " + q(prompt), {"-p", "max_position_embeddings", "512"});
    std::string ids;
    for (int i = 0; i < 513; ++i) ids += "5,";
    expect_error("logits -m " + q(test::shared_dir() + "/models/stories260K") + " --ids " + ids + " --out /tmp/x.st", {"--ids", "max_position_embeddings"});
  }

  TEST_CASE("throughput mode: completions in input order, written atomically; bad request files named by line") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    test::TempDir tmp;
    const std::string in = (tmp.path / "req.jsonl").string(), out = (tmp.path / "out.jsonl").string();
    write_file(in, "{\"prompt\": \"Once upon a time\", \"id\": \"a\"}\n\n{\"ids\": [1, 200, 300], \"max_tokens\": 4}\n{\"prompt\": \"Lily\"}\n");
    test::CmdResult r = test::run_ferry("run -m " + q(dir) + " --prompts " + q(in) + " --out " + q(out) + " --batch 2 -n 8 --temp 0 --device cpu");
    CAPTURE(r.output);
    REQUIRE(r.exit_code == 0);
    CHECK(r.output.find("served 3 requests") != std::string::npos);
    CHECK(r.output.find("time to first token") != std::string::npos);
    std::vector<json> lines;
    std::istringstream ss(read_file(out));
    for (std::string l; std::getline(ss, l);) lines.push_back(json::parse(l));
    REQUIRE(lines.size() == 3);
    CHECK(lines[0]["id"] == "a");
    CHECK(lines[1]["index"] == 1);
    CHECK(lines[1]["completion_tokens"] == 4);
    CHECK(lines[2]["completion_tokens"] == 8);
    CHECK(lines[0]["finish_reason"] == "length");
    // The same prompt through -p gives the same text (greedy).
    test::CmdResult one = test::run_ferry("run -m " + q(dir) + " -p 'Once upon a time' -n 8 --temp 0 --device cpu", true);
    CHECK(one.output.find(lines[0]["completion"].get<std::string>()) != std::string::npos);

    // K/V beyond --kv-mem on --kv-disk: the same completions (greedy), blocks spilled and read back.
    {
      std::string many;
      for (int i = 0; i < 8; ++i) many += "{\"ids\": [1, " + std::to_string(200 + i) + ", 300, 301, 302], \"max_tokens\": 12}\n";
      const std::string in8 = (tmp.path / "req8.jsonl").string(), a = (tmp.path / "a.jsonl").string(), d = (tmp.path / "d.jsonl").string();
      write_file(in8, many);
      const std::string base = "run -m " + q(dir) + " --prompts " + q(in8) + " --batch 8 --temp 0 --device cpu --no-progress --out ";
      test::CmdResult plain = test::run_ferry(base + q(a));
      REQUIRE_MESSAGE(plain.exit_code == 0, plain.output);
      // stories260K: 5 layers x 2 x 4 KV heads x 8 dims x 16 tokens x 4 bytes = 20 KiB a block: 120K holds 6
      // blocks, 3 of the 8 requests (2 blocks each).
      test::CmdResult spill = test::run_ferry(base + q(d) + " --kv-mem 120K --kv-disk " + q(tmp.path.string()));
      REQUIRE_MESSAGE(spill.exit_code == 0, spill.output);
      CHECK(spill.output.find("more on disk") != std::string::npos);
      CHECK(spill.output.find("blocks spilled") != std::string::npos);
      std::istringstream pa(read_file(a)), pd(read_file(d));
      int rows = 0;
      for (std::string x, y; std::getline(pa, x) && std::getline(pd, y); ++rows) CHECK(json::parse(x)["ids"] == json::parse(y)["ids"]);
      CHECK(rows == 8);
      expect_error(base + q(d) + " --kv-mem 120K", {"--kv-mem", "--kv-disk"});
      expect_error(base + q(d) + " --kv-disk " + q(tmp.path.string()), {"--kv-disk needs --kv-mem"});
      expect_error(base + q(d) + " --kv-mem 1K --kv-disk " + q(tmp.path.string()), {"--kv-mem", "below one K/V block"});
      expect_error(base + q(d) + " --kv-mem 25K --kv-disk " + q(tmp.path.string()), {"--kv-mem", "a sequence of 17 tokens needs 2"});
      expect_error(base + q(d) + " --kv-mem 120K --kv-disk /nonexistent/kvdir", {"--kv-disk", "/nonexistent/kvdir"});
    }

    write_file(in, "{\"prompt\": \"ok\"}\nnot json\n");
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --out " + q(out) + " --device cpu", {in + ":2", "JSON"});
    write_file(in, "{\"text\": \"no prompt key\"}\n");
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --out " + q(out) + " --device cpu", {in + ":1", "\"prompt\""});
    write_file(in, "{\"ids\": [1, 999999]}\n");
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --out " + q(out) + " --device cpu", {in + ":1", "999999"});
    write_file(in, "{\"ids\": [1], \"max_tokens\": 0}\n");
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --out " + q(out) + " --device cpu", {"max_tokens"});
    expect_error("run -m " + q(dir) + " --prompts /nonexistent/req.jsonl --out " + q(out) + " --device cpu", {"/nonexistent/req.jsonl"});
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --device cpu", {"--out"});
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --out " + q(out) + " -p hi --device cpu", {"-p"});
  }

  TEST_CASE("output paths are checked before the work; never renamed over a non-regular file; SIGINT keeps the finished requests; a failed stdout write exits 1") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    test::TempDir tmp;
    const std::string in = tmp / "req.jsonl";
    write_file(in, "{\"ids\": [1, 200]}\n");
    // A missing folder, for every output flag: refused at once, naming the flag and the path.
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --out /nonexistent/dir/out.jsonl --device cpu", {"--out", "/nonexistent/dir/out.jsonl"});
    expect_error("run -m " + q(dir) + " -p hi -n 2 --trace /nonexistent/dir/t.json --device cpu", {"--trace", "/nonexistent/dir/t.json"});
    expect_error("logits -m " + q(dir) + " --ids 1,2 --out /nonexistent/dir/l.safetensors --device cpu", {"--out", "/nonexistent/dir/l.safetensors"});
    expect_error("bench -m " + q(dir) + " -n 2 --json /nonexistent/dir/b.json --device cpu", {"--json", "/nonexistent/dir/b.json"});
    expect_error("bench -m " + q(dir) + " -n 2 --trace /nonexistent/dir/b.trace.json --device cpu", {"--trace", "/nonexistent/dir/b.trace.json"});
    expect_error("sweep -m synthetic:llama-2-7b --layers 2 --gpu-mem 4G -n 2 --device cpu --out /nonexistent/dir/sw", {"--out", "/nonexistent/dir/sw.csv"});
    expect_error("calibrate --out /nonexistent/dir/profile.json", {"--out", "/nonexistent/dir/profile.json"});
    // A device node or a folder at the path: refused, and left as it was.
    expect_error("logits -m " + q(dir) + " --ids 1,2 --out /dev/null --device cpu", {"/dev/null", "not a regular file"});
    CHECK(fs::is_character_file("/dev/null"));
    fs::create_directory(tmp / "adir");
    expect_error("run -m " + q(dir) + " --prompts " + q(in) + " --out " + q(tmp / "adir") + " --device cpu", {"adir", "not a regular file"});
    CHECK(fs::is_directory(tmp / "adir"));
    // bench --trace writes the traced run's trace.
    test::CmdResult b = test::run_ferry("bench -m " + q(dir) + " -n 2 --device cpu --trace " + q(tmp / "b.json"));
    CHECK_MESSAGE(b.exit_code == 0, b.output);
    CHECK(fs::file_size(tmp / "b.json") > 100);
    // A failed write to standard output is an error, not a silent success.
    CHECK(test::run_ferry("tokenize -m " + q(dir) + " hello >/dev/full", true).exit_code == 1);
    CHECK(test::run_ferry("run -m " + q(dir) + " -p hi -n 4 --device cpu >/dev/full", true).exit_code == 1);
    // SIGINT in throughput mode: the requests finished before it are written (atomically, in input
    // order, with their index), the rest are not, and the exit code says so.
    std::string reqs;
    for (int i = 0; i < 8; ++i) reqs += "{\"ids\": [1, " + std::to_string(300 + i) + "], \"max_tokens\": 1, \"id\": \"short" + std::to_string(i) + "\"}\n";
    for (int i = 0; i < 64; ++i) reqs += "{\"ids\": [1, " + std::to_string(400 + i) + "], \"max_tokens\": 2000}\n";
    write_file(in, reqs);
    const std::string out = tmp / "out.jsonl", log = tmp / "log";
    // The progress line for a tenth of the requests (the 8 short ones) appears once they are done;
    // then SIGINT. The long ones (2000 tokens each) are far from done.
    test::CmdResult r = test::run_shell("bash -c " + q(std::string(FERRY_BIN) + " run -m synthetic:llama-2-7b --layers 1 --prompts " + in + " --out " + out +
                                                       " --batch 4 --ignore-eos --device cpu --threads 1 2>" + log + " & pid=$!; " +
                                                       "for i in $(seq 1200); do grep -q requests " + log + " && break; sleep 0.1; done; " +
                                                       "kill -INT $pid; wait $pid; echo exit=$?; cat " + log));
    CAPTURE(r.output);
    CHECK(r.output.find("exit=130") != std::string::npos);
    CHECK(r.output.find("interrupted by SIGINT: the 8 finished of 72 requests") != std::string::npos);
    std::istringstream ss(read_file(out));
    int n = 0;
    for (std::string l; std::getline(ss, l); ++n) {
      const json j = json::parse(l);
      CHECK(j["id"] == "short" + std::to_string(n));
      CHECK(j["index"] == n);
      CHECK(j["finish_reason"] == "length");
    }
    CHECK(n == 8);
  }

  TEST_CASE("nonsense flag values") {
    const std::string m = q(test::shared_dir() + "/models/stories260K");
    expect_error("run -m " + m + " -n abc", {"-n"});
    expect_error("run -m " + m + " -n -5", {"-n"});
    expect_error("run -m " + m + " --temp -1", {"--temp"});
    expect_error("run -m " + m + " --top-p 2", {"--top-p"});
    expect_error("run -m " + m + " --top-k -4", {"--top-k"});
    expect_error("run -m " + m + " --device tpu", {"--device"});
    expect_error("run -m " + m + " --bogus", {"--bogus"});
    expect_error("run -m " + m + " --layers 2", {"--layers"});
    expect_error("logits -m " + m + " --ids 1,x,3 --out /tmp/x.st", {"--ids", "'x'"});
    expect_error("logits -m " + m + " --ids 1,99999 --out /tmp/x.st", {"--ids", "99999"});
    expect_error("logits -m " + m + " --ids 1 --out /nonexistent/dir/x.st", {"--out", "/nonexistent/dir"});
    expect_error("run -m synthetic:llama-9b", {"llama-9b"});
    expect_error("tokenize -m " + m + " --decode 1,70000", {"--decode", "70000"});
    expect_error("", {"subcommand"});
  }

  TEST_CASE("serve: starts, says where, stops on SIGINT with a summary; a taken port, a bad --ctx and an unknown chat format are refused") {
    // A port this test holds open: ferry must say it cannot bind it.
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(fd, 1) == 0);
    socklen_t len = sizeof a;
    REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    const std::string taken = std::to_string(ntohs(a.sin_port));
    const std::string m = q(test::shared_dir() + "/models/stories260K");
    expect_error("serve -m " + m + " --port " + taken, {"--port " + taken, "cannot bind"});
    ::close(fd);
    expect_error("serve -m " + m + " --ctx 100000", {"--ctx", "max_position_embeddings"});
    expect_error("serve -m " + m + " --chat-template jinja", {"--chat-template"});
    expect_error("serve -m " + m + " --port 70000", {"--port"});
    // Started on a free port (the one just released), then SIGINT: exit 0 and the summary.
    test::TempDir tmp;
    const std::string log = tmp / "log";
    test::CmdResult r = test::run_shell("bash -c " + q(std::string(FERRY_BIN) + " serve -m " + test::shared_dir() + "/models/stories260K --chat-template zephyr --port " +
                                                       taken + " --threads 1 2>" + log + " & pid=$!; " + "for i in $(seq 300); do grep -q serving " + log +
                                                       " && break; sleep 0.1; done; kill -INT $pid; wait $pid; echo exit=$?; cat " + log));
    CAPTURE(r.output);
    CHECK(r.output.find("exit=0") != std::string::npos);
    CHECK(r.output.find("on http://127.0.0.1:" + taken + "/v1") != std::string::npos);
    CHECK(r.output.find("chat format zephyr") != std::string::npos);
    CHECK(r.output.find("served 0 requests") != std::string::npos);
  }

  TEST_CASE("chat: turns from standard input through the chat format; /reset starts over; a model without a template is refused naming the flag") {
    const std::string m = test::shared_dir() + "/models/stories260K";
    auto chat = [&](const std::string& input) {
      test::CmdResult r = test::run_shell("printf " + q(input) + " | " + std::string(FERRY_BIN) + " chat -m " + q(m) + " --chat-template zephyr --temp 0 -n 24 2>/dev/null");
      CAPTURE(r.output);
      CHECK(r.exit_code == 0);
      return r.output;
    };
    const std::string one = chat("Tell me a story.\\n");
    REQUIRE(one.size() > 10);
    // The second turn sees the first exchange; after /reset the same question gets the first reply again.
    const std::string three = chat("Tell me a story.\\nAnd then?\\n/reset\\nTell me a story.\\n");
    REQUIRE(three.size() > 2 * one.size());
    CHECK(three.substr(0, one.size()) == one);
    CHECK(three.substr(three.size() - one.size()) == one);
    CHECK(three.substr(one.size(), three.size() - 2 * one.size()) != one);
    expect_error("chat -m " + q(m), {"--chat-template"});
    expect_error("chat -m synthetic:llama-2-7b", {"synthetic"});
    expect_error("chat -m " + q(m) + " --chat-template zephyr --ctx 100000", {"--ctx", "max_position_embeddings"});
  }
}
