// Safetensors validation (every header field against the file), the atomic writer, and sharded
// checkpoints through model.safetensors.index.json.
#include <doctest/doctest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "models/checkpoint.h"
#include "models/safetensors.h"
#include "test_util.h"

using namespace ferry;
using json = nlohmann::json;

namespace {

// Writes a file of an 8-byte header length, the header text and `data_bytes` zero bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes, int64_t header_len_override = -1) {
  std::ofstream f(path, std::ios::binary);
  uint64_t hl = header_len_override >= 0 ? static_cast<uint64_t>(header_len_override) : header.size();
  f.write(reinterpret_cast<const char*>(&hl), 8);
  f << header;
  std::string zeros(data_bytes, '\0');
  f << zeros;
}

std::string open_error(const std::string& path) {
  auto r = SafetensorsFile::open(path);
  REQUIRE(!r.ok());
  return r.status().message();
}

}  // namespace

TEST_SUITE("safetensors") {
  TEST_CASE("every malformed file is refused with a message naming the file and tensor") {
    test::TempDir tmp;
    const std::string p = tmp / "m.safetensors";
    auto expect = [&](const char* what) {
      const std::string msg = open_error(p);
      CAPTURE(msg);
      CHECK(msg.find(p) != std::string::npos);
      CHECK(msg.find(what) != std::string::npos);
    };
    std::ofstream(p) << "abc";
    expect("truncated");
    write_raw(p, "{}", 0, 1 << 20);
    expect("past the end of the file");
    write_raw(p, "{not json", 0);
    expect("not a valid JSON");
    write_raw(p, R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})", 8);
    expect("outside the data section");
    write_raw(p, R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 16]}})", 16);
    expect("need 12 bytes");
    write_raw(p, R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", 16);
    expect("reversed");
    write_raw(p, R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}})", 16);
    expect("unknown dtype");
    write_raw(p, R"({"w": {"dtype": "F32", "shape": [2199023255552], "data_offsets": [0, 8]}})", 16);
    expect("too large");
    write_raw(p, R"({"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 8]}})", 16);
    expect("overflows");
    write_raw(p, R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 16);
    expect("overlap");
    write_raw(p, R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 16);
    expect("negative");
    // Tensors are read in place: an F32 whose data would start at byte 133 of the file (8 + a 122-byte
    // header + a 3-byte U8 before it) is refused.
    const std::string mis = R"({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}})";
    write_raw(p, mis, 11);
    expect("not a multiple of its dtype");
    {  // write_safetensors puts larger dtypes first: the same tensors come back aligned and equal
      const uint8_t a[3] = {1, 2, 3};
      const float w[2] = {1.5f, -2.0f};
      REQUIRE(write_safetensors(p, {{"a", DType::kU8, {3}, a}, {"w", DType::kF32, {2}, w}}).ok());
      auto f = SafetensorsFile::open(p);
      REQUIRE(f.ok());
      const TensorView v = (*f)->view(*(*f)->find("w"));
      CHECK(reinterpret_cast<uintptr_t>(v.data) % 4 == 0);
      CHECK(static_cast<const float*>(v.data)[1] == -2.0f);
      CHECK(static_cast<const uint8_t*>((*f)->view(*(*f)->find("a")).data)[2] == 3);
    }
    write_raw(p, R"({"w": {"dtype": "F32", "shape": [2]}})", 16);
    expect("data_offsets");
    CHECK(open_error(tmp / "missing.safetensors").find("not found") != std::string::npos);
  }

  TEST_CASE("writer round trip, atomic (no temporary left), metadata kept") {
    test::TempDir tmp;
    const std::string p = tmp / "out.safetensors";
    std::vector<float> a = {1, 2, 3, 4, 5, 6};
    std::vector<int32_t> b = {7, 8};
    REQUIRE(write_safetensors(p, {{"a", DType::kF32, {2, 3}, a.data()}, {"b", DType::kI32, {2}, b.data()}}, {{"k", "v"}}).ok());
    auto f = SafetensorsFile::open(p);
    REQUIRE(f.ok());
    CHECK(test::read_f32(**f, "a") == a);
    CHECK(test::read_i32(**f, "b") == b);
    CHECK((*f)->metadata().at("k") == "v");
    int n_files = 0;
    for (auto& e : std::filesystem::directory_iterator(tmp.path)) n_files += e.is_regular_file();
    CHECK(n_files == 1);
    Status st = write_safetensors(tmp / "no/such/dir/x.safetensors", {{"a", DType::kF32, {2, 3}, a.data()}});
    CHECK(!st.ok());
    CHECK(st.message().find("no/such/dir") != std::string::npos);
  }

  TEST_CASE("sharded checkpoint through model.safetensors.index.json") {
    const std::string src = test::shared_dir() + "/golden/llama-gqa";
    auto single = CheckpointReader::open(src);
    REQUIRE(single.ok());
    test::TempDir tmp;
    // Split the tensors over two shards.
    std::vector<TensorToWrite> s1, s2;
    json wm = json::object();
    int i = 0;
    for (const auto& name : (*single)->names()) {
      auto f = (*single)->find(name);
      TensorView v = f.file->view(*f.entry);
      TensorToWrite t{name, v.dtype, f.entry->shape, v.data};
      (i++ % 2 ? s2 : s1).push_back(t);
      wm[name] = i % 2 ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    }
    REQUIRE(write_safetensors(tmp / "model-00001-of-00002.safetensors", s1).ok());
    REQUIRE(write_safetensors(tmp / "model-00002-of-00002.safetensors", s2).ok());
    std::ofstream(tmp / "model.safetensors.index.json") << json{{"metadata", json::object()}, {"weight_map", wm}}.dump();
    auto sharded = CheckpointReader::open(tmp.path.string());
    REQUIRE_MESSAGE(sharded.ok(), sharded.status().message());
    CHECK((*sharded)->names() == (*single)->names());
    for (const auto& name : (*single)->names()) {
      auto a = (*single)->find(name);
      auto b = (*sharded)->find(name);
      REQUIRE(b.entry != nullptr);
      CHECK(std::memcmp(a.file->view(*a.entry).data, b.file->view(*b.entry).data, a.entry->end - a.entry->begin) == 0);
    }
    // An index that points a tensor at the wrong shard is an error naming both.
    const std::string first = (*single)->names()[0];
    wm[first] = wm[first] == "model-00001-of-00002.safetensors" ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
    std::ofstream(tmp / "model.safetensors.index.json") << json{{"weight_map", wm}}.dump();
    auto bad = CheckpointReader::open(tmp.path.string());
    REQUIRE(!bad.ok());
    CHECK(bad.status().message().find(first) != std::string::npos);
    // An index that names a shard that is not there.
    wm[first] = "model-00009-of-00002.safetensors";
    std::ofstream(tmp / "model.safetensors.index.json") << json{{"weight_map", wm}}.dump();
    auto missing = CheckpointReader::open(tmp.path.string());
    REQUIRE(!missing.ok());
    CHECK(missing.status().message().find("model-00009-of-00002.safetensors") != std::string::npos);
  }
}
