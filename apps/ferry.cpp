// ferry: the command-line front end. Each subcommand parses its flags, loads what it needs through
// the library, and turns every failure into one line on stderr naming the file, tensor or flag,
// with a non-zero exit (1 for run-time failures, 2 for bad usage).
#include <omp.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <tbb/blocked_range.h>
#include <tbb/global_control.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_reduce.h>

#include "cpu/attention.h"
#include "cpu/cpu_executor.h"
#include "cpu/gemm.h"
#include "cpu/lora_train.h"
#include "cpu/offload_executor.h"
#include "cpu/simd.h"
#include "gpu/device.h"
#include "gpu/gpu_executor.h"
#include "models/chat_template.h"
#include "models/safetensors.h"
#include "models/synthetic.h"
#include "models/weight_format.h"
#include "offload/disk_reader.h"
#include "offload/packed_store.h"
#include "runtime/budget.h"
#include "runtime/finetune.h"
#include "runtime/generate.h"
#include "runtime/lora.h"
#include "runtime/model.h"
#include "runtime/serve.h"
#include "runtime/server.h"
#include "runtime/topology.h"
#include "runtime/trace.h"

namespace {

using namespace ferry;

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

int fail(const Status& st) {
  std::fprintf(stderr, "ferry: error: %s\n", st.message().c_str());
  return st.code() == ErrorCode::kInvalidArgument ? kExitUsage : kExitError;
}

// Options every model-running subcommand shares.
struct ModelFlags {
  std::string model;
  std::string device = "auto";
  int64_t layers = 0;
  int threads = 0;
  std::string disk;
  std::string kv = "auto";
  std::string gpu_mem;
  std::string host_mem;
  int64_t cpu_layers = -1;
  int64_t kv_host_layers = -1;
  std::string trace;
  std::string kv_mem, kv_disk;
  std::string quant = "bf16";
  std::string quant_head = "bf16";
  std::string lora;  // run, logits: a peft LoRA adapter directory

  void add(CLI::App* app) {
    app->add_option("-m,--model", model, "Hugging Face model directory, or synthetic:PRESET")->required();
    app->add_option("--device", device, "Executor: cpu, gpu or auto (auto: the GPU when ferry has CUDA and one answers)")
        ->check(CLI::IsMember({"cpu", "gpu", "auto"}));
    app->add_option("--layers", layers, "Synthetic models only: keep the preset's shapes but use N layers")->check(CLI::Range(1, 4096));
    app->add_option("--threads", threads, "CPU threads (default: all cores)")->check(CLI::Range(1, 4096));
    app->add_option("--gpu-mem", gpu_mem,
                    "GPU memory budget (e.g. 8G): layers that do not fit are streamed or computed on the CPU, as the planner decides. "
                    "With --device cpu: the same engine against an emulated device of this size");
    app->add_option("--host-mem", host_mem,
                    "Pinned host memory for the layers that do not fit on the GPU (default: unlimited; 0 with --disk); the rest are read from --disk");
    app->add_option("--cpu-layers", cpu_layers, "Compute exactly N layers on the CPU (default: the planner's choice)")->check(CLI::Range(int64_t{0}, int64_t{4096}));
    app->add_option("--quant", quant,
                    "Quantise the layers' Linear weights at load: nf4 (QLoRA's NF4, blocks of 64, fp32 absmax: 0.5625 bytes a parameter), "
                    "nf4-dq (NF4 with QLoRA's double-quantised absmax: 0.516 bytes) or int8 (per output channel: 1.0 bytes); bf16 keeps "
                    "them (default). A --disk store packed with --quant needs none")
        ->check(CLI::IsMember({"bf16", "nf4", "nf4-dq", "int8"}));
    app->add_option("--quant-head", quant_head,
                    "With --quant: quantise the lm_head too, int8 (per output row) or nf4; bf16 keeps it (default, as QLoRA does). "
                    "Frees GPU memory for layers (Llama-3's lm_head: 1.96 GiB in BF16, 0.98 GiB int8); not for a model whose "
                    "lm_head is its token embedding, nor with --disk")
        ->check(CLI::IsMember({"bf16", "nf4", "int8"}));
    app->add_option("--trace", trace, "Write a Chrome trace (open in Perfetto): tracks for CPU, GPU compute, GPU copies, disk reads");
    app->add_option("--disk", disk, "Packed store (from 'ferry pack') holding the weights; layers beyond --gpu-mem and --host-mem are read from it, checksummed");
    app->add_option("--kv", kv, "Where K/V live with --device gpu: gpu, host (the CPU computes attention over them, overlapped with the GPU's GEMMs), "
                                "split (how many layers' K/V go to the host, by the cost model: each frees GPU memory for weights) or "
                                "auto (split's choice, but K/V that fit on the GPU stay there unless the host is predicted 10% faster)")
        ->check(CLI::IsMember({"auto", "gpu", "host", "split"}));
    app->add_option("--kv-host-layers", kv_host_layers, "With --kv split: keep exactly N layers' K/V on the host (default: the planner's choice)")
        ->check(CLI::Range(int64_t{0}, int64_t{4096}));
    app->add_option("--kv-mem", kv_mem, "Host memory for K/V blocks (e.g. 16G; default: what the batch needs); blocks beyond it need --kv-disk");
    app->add_option("--kv-disk", kv_disk,
                    "Directory for K/V blocks that do not fit in --kv-mem (an anonymous file, io_uring, checksummed): the coldest blocks "
                    "of sequences not in the step are spilled there and read back when their sequence runs");
  }
  LoadOptions load(bool need_tokenizer, const std::string& resolved_device) const {
    LoadOptions o;
    o.synthetic_layers = layers;
    o.need_tokenizer = need_tokenizer;
    o.host_weights = resolved_device != "gpu";
    o.disk = disk;
    WeightFormat f = WeightFormat::kBF16;
    weight_format_from_name(quant, &f);  // checked by CLI11
    o.quant = weight_format_info(f).dtype;
    o.quant_head = quant_head == "int8" ? DType::kQ8 : quant_head == "nf4" ? DType::kNF4 : DType::kBF16;
    return o;
  }
};

// Applies --threads to oneTBB and oneDNN's OpenMP pool; the returned object must stay alive.
std::unique_ptr<tbb::global_control> apply_threads(int threads) {
  if (threads <= 0) return nullptr;
  omp_set_num_threads(threads);
  return std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism, threads);
}

// Resolves --device auto to gpu when ferry was built with CUDA and a GPU answers, else cpu.
std::string resolve_device(const std::string& device, bool lora = false) {
  if (device != "auto") return device;
  if (lora) return "cpu";  // --lora runs on the CPU backend (make_backend)
  return gpu::probe().n_devices > 0 ? "gpu" : "cpu";
}

KvCacheShape kv_shape(const ModelConfig& cfg, const std::vector<int64_t>& lengths) {
  KvCacheShape s;
  s.n_layers = cfg.n_layers;
  s.n_kv_heads = cfg.n_kv_heads;
  s.head_dim = cfg.head_dim;
  s.block_size = 16;
  s.n_blocks = std::max<int64_t>(1, kv_blocks_needed(lengths, s.block_size));
  return s;
}

// The executor and the KV cache for `device` (already resolved): the GPU executor keeps the KV bytes
// of GPU-computed layers itself, so the KvCache then holds block tables, and host K/V only for the
// layers the plan puts on the CPU.
struct Backend {
  std::unique_ptr<Executor> executor;
  std::unique_ptr<KvCache> kv;
  gpu::GpuExecutor* gpu = nullptr;         // when the executor is the GPU's
  cpu::OffloadCpuExecutor* emulated = nullptr;  // the CPU under --gpu-mem
  bool planned = false;
  GpuPlan plan;
  HardwareProfile hw;
  int64_t budget = 0;
  int64_t driver_before = -1;
};

// --gpu-mem: one rule in every command. No flag: no cap. A size: the cap, which must be positive
// (0 is refused, not read as "no cap") and at least the minimum working set (plan_gpu names it).
Expected<int64_t> parse_gpu_mem(const std::string& text) {
  FERRY_ASSIGN_OR_RETURN(const int64_t b, parse_size(text, "--gpu-mem"));
  if (b <= 0) return invalid_argument("--gpu-mem " + text + ": a budget must be a positive size (leave --gpu-mem out for no cap)");
  return b;
}

// The planner's input from the flags.
Expected<GpuPlanInput> plan_input(const ModelFlags& flags, const Model& model, int64_t batch) {
  GpuPlanInput in;
  if (!flags.gpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(in.budget_bytes, parse_gpu_mem(flags.gpu_mem));
  }
  if (!flags.host_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(in.host_budget_bytes, parse_size(flags.host_mem, "--host-mem"));
  }
  in.have_disk = model.weights->packed() != nullptr;
  in.cpu_layers = flags.cpu_layers;
  FERRY_ASSIGN_OR_RETURN(in.kv, parse_kv_place(flags.kv));
  if (flags.kv_host_layers >= 0 && in.kv != KvPlace::kSplit) return invalid_argument("--kv-host-layers needs --kv split");
  in.kv_host_layers = flags.kv_host_layers;
  in.max_batch = batch;
  in.hw = load_profile();
  // FERRY_EMBEDDING=gpu keeps the token embedding on the GPU (to time what moving it gains).
  if (const char* e = std::getenv("FERRY_EMBEDDING"); e && std::string(e) == "gpu") in.embedding_may_leave_gpu = false;
  // A quantised lm_head (--quant-head): the head's bytes, and the globals with it (BF16 embedding).
  if (const TensorView& h = model.weights->globals().t[kLmHead]; is_quantized(h.dtype)) {
    in.head_bytes = static_cast<int64_t>(h.nbytes()) + 2 * model.config.n_embd;
    in.globals_bytes = 2 * model.config.n_vocab * model.config.n_embd + in.head_bytes;
  }
  // Quantised weights: every layer's bytes through the format's layout (the GPU keeps them so).
  if (is_quantized(linear_dtype(model.weights->layer(0)))) {
    in.layer_bytes = gpu_layer_bytes(model.config, linear_dtype(model.weights->layer(0)));
    in.weights = linear_dtype(model.weights->layer(0));
  }
  return in;
}

Expected<Backend> make_backend(const std::string& device, Model& model, const std::vector<int64_t>& lengths, const ModelFlags& flags,
                               int64_t max_step_tokens = 512) {
  Backend b;
  const bool offload = !flags.gpu_mem.empty() || !flags.host_mem.empty() || flags.cpu_layers >= 0;
  std::shared_ptr<const LoraAdapter> lora;
  if (!flags.lora.empty()) {
    if (device == "gpu" || offload || !flags.disk.empty())
      return unsupported("--lora: adapters run on the CPU backend in this version (--device cpu, without --gpu-mem, --host-mem, --cpu-layers or "
                         "--disk); the GPU executor's LoRA products are not built yet");
    auto a = load_lora(model.config, flags.lora);
    if (!a.ok()) return a.status().with_context("--lora");
    lora = std::make_shared<const LoraAdapter>(std::move(*a));
  }
  KvCacheShape shape = kv_shape(model.config, lengths);
  // --kv-mem caps the host pool; the blocks beyond it live on --kv-disk.
  int64_t disk_records = 0;
  if (!flags.kv_disk.empty() && flags.kv_mem.empty()) return invalid_argument("--kv-disk needs --kv-mem (the host memory K/V may use before spilling)");
  if (!flags.kv_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(const int64_t cap, parse_size(flags.kv_mem, "--kv-mem"));
    KvCacheShape one = shape;
    one.dtype = device == "gpu" ? DType::kBF16 : DType::kF32;  // the host pool's dtype on each backend
    one.n_blocks = 1;
    const int64_t fit = cap / one.bytes();
    if (fit < 1)
      return out_of_memory(strprintf("--kv-mem %s is below one K/V block (%s: %lld tokens of every layer)", flags.kv_mem.c_str(),
                                     format_bytes(static_cast<double>(one.bytes())).c_str(), (long long)shape.block_size));
    const int64_t longest = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
    const int64_t one_seq = (longest + shape.block_size - 1) / shape.block_size;
    if (fit < one_seq)
      return out_of_memory(strprintf("--kv-mem %s holds %lld K/V blocks of %lld tokens; a sequence of %lld tokens needs %lld in memory at once: raise --kv-mem",
                                     flags.kv_mem.c_str(), (long long)fit, (long long)shape.block_size, (long long)longest, (long long)one_seq));
    if (fit < shape.n_blocks) {
      if (flags.kv_disk.empty())
        return out_of_memory(strprintf("--kv-mem %s holds %lld of the %lld K/V blocks the batch needs (%s): raise it, lower --batch, or give --kv-disk DIR",
                                       flags.kv_mem.c_str(), (long long)fit, (long long)shape.n_blocks,
                                       format_bytes(static_cast<double>(shape.n_blocks * one.bytes())).c_str()));
      disk_records = shape.n_blocks - fit;
      shape.n_blocks = fit;
    }
  }
  auto add_disk = [&](KvCache& kv) -> Status {
    if (flags.kv_disk.empty()) return Status::Ok();
    return kv.enable_disk(flags.kv_disk, std::max<int64_t>(disk_records, 1));
  };
  FERRY_ASSIGN_OR_RETURN(GpuPlanInput in, plan_input(flags, model, static_cast<int64_t>(lengths.size())));
  in.max_step_tokens = max_step_tokens;
  b.budget = in.budget_bytes;
  b.hw = in.hw;
  if (device == "gpu") {
    gpu::GpuInfo g = gpu::probe();
    if (g.n_devices == 0) return unsupported("--device gpu: no usable GPU (" + g.why_none + ")");
    in.kv_bytes = shape.bytes() / 2;  // BF16 on the GPU
    FERRY_ASSIGN_OR_RETURN(b.plan, plan_gpu(model.config, in));
    b.planned = true;
    gpu::GpuOptions opts;
    opts.plan = b.plan;
    opts.cap_bytes = in.budget_bytes > 0 ? in.budget_bytes - b.plan.reserve_bytes : 0;
    opts.max_outputs = in.max_batch;
    b.driver_before = gpu::driver_used_bytes();
    FERRY_ASSIGN_OR_RETURN(auto ex, gpu::GpuExecutor::create(*model.weights, shape, opts));
    b.gpu = ex.get();
    b.executor = std::move(ex);
    // Host K/V (the plan's kv_host layers, CPU-computed ones included) in BF16, as on the GPU, on
    // the NUMA node nearest the GPU.
    KvCacheShape host_shape = shape;
    host_shape.dtype = DType::kBF16;
    FERRY_ASSIGN_OR_RETURN(auto kv, KvCache::create(host_shape, b.plan.kv_host, g.pci_bus));
    FERRY_RETURN_IF_ERROR(add_disk(kv));
    b.kv = std::make_unique<KvCache>(std::move(kv));
    return b;
  }
  if (offload) {
    // The offload engine against the emulated device: the device holds the stored bytes.
    in.emulated = true;
    in.layer_bytes = cpu::stored_layer_bytes(*model.weights);
    in.globals_bytes = cpu::stored_globals_bytes(*model.weights);
    in.embedding_bytes = static_cast<int64_t>(model.weights->globals().t[kTokEmbd].nbytes());
    FERRY_ASSIGN_OR_RETURN(b.plan, plan_gpu(model.config, in));
    b.planned = true;
    FERRY_ASSIGN_OR_RETURN(auto ex, cpu::OffloadCpuExecutor::create(*model.weights, b.plan, in.budget_bytes));
    b.emulated = ex.get();
    b.executor = std::move(ex);
  } else {
    auto ex = std::make_unique<cpu::CpuExecutor>(model.config);
    ex->set_lora(lora);
    b.executor = std::move(ex);
  }
  FERRY_ASSIGN_OR_RETURN(auto kv, KvCache::create(shape));
  FERRY_RETURN_IF_ERROR(add_disk(kv));
  b.kv = std::make_unique<KvCache>(std::move(kv));
  return b;
}

// Prints where the layers went and what the devices hold (stderr).
void print_backend(const Backend& be) {
  if (!be.planned) return;
  std::fprintf(stderr, "ferry: plan: %s\nferry: placement: %s\n", be.plan.describe().c_str(), be.plan.placement().c_str());
  if (be.gpu) {
    const int64_t driver_now = gpu::driver_used_bytes();
    std::fprintf(stderr, "ferry: gpu: ferry holds %s (peak %s), the driver counts %s more than before ferry started; streamed %s\n",
                 format_bytes(static_cast<double>(be.gpu->device_bytes())).c_str(), format_bytes(static_cast<double>(be.gpu->peak_device_bytes())).c_str(),
                 format_bytes(static_cast<double>(driver_now - be.driver_before)).c_str(), format_bytes(static_cast<double>(be.gpu->streamed_bytes())).c_str());
  }
  if (be.gpu && be.gpu->n_kv_host_layers() > 0)
    std::fprintf(stderr, "ferry: kv: %lld of %lld layers keep K/V in host memory (%s, NUMA node %d, %s in huge pages); their attention runs on the CPU (%s kernel, %s)\n",
                 (long long)be.gpu->n_kv_host_layers(), (long long)be.plan.place.size(), format_bytes(static_cast<double>(be.kv->host_bytes())).c_str(),
                 be.kv->numa_node(), format_bytes(static_cast<double>(be.kv->huge_page_bytes())).c_str(), cpu::attn_isa_name(cpu::attn_isa_best()), topology_summary().c_str());
  if (const KvDiskFile* d = be.kv->disk())
    std::fprintf(stderr, "ferry: kv: %lld blocks in host memory, %lld more on disk (%s, %s, %s)\n", (long long)be.kv->shape().n_blocks,
                 (long long)d->n_records(), d->where().c_str(), format_bytes(static_cast<double>(d->n_records() * d->record_bytes())).c_str(),
                 d->direct_io() ? "O_DIRECT" : "buffered");
  if (be.emulated)
    std::fprintf(stderr, "ferry: emulated device: peak %s of %s; streamed %s\n", format_bytes(static_cast<double>(be.emulated->device().peak_bytes())).c_str(),
                 be.budget > 0 ? format_bytes(static_cast<double>(be.budget)).c_str() : "no cap",
                 format_bytes(static_cast<double>(be.emulated->streamed_bytes())).c_str());
}

Expected<std::vector<int32_t>> parse_ids(const std::string& text, const char* flag) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = text.find(',', i);
    if (j == std::string::npos) j = text.size();
    std::string tok = text.substr(i, j - i);
    while (!tok.empty() && (tok.front() == ' ' || tok.front() == '[')) tok.erase(0, 1);
    while (!tok.empty() && (tok.back() == ' ' || tok.back() == ']')) tok.pop_back();
    if (!tok.empty()) {
      char* end = nullptr;
      errno = 0;
      long long v = std::strtoll(tok.c_str(), &end, 10);
      if (*end != '\0' || errno != 0 || v < 0 || v > INT32_MAX)
        return invalid_argument(strprintf("%s: '%s' is not a token id (a non-negative integer)", flag, tok.c_str()));
      ids.push_back(static_cast<int32_t>(v));
    }
    i = j + 1;
  }
  return ids;
}


// ---------------------------------------------------------------------------------------------
struct RunFlags {
  ModelFlags m;
  std::vector<std::string> prompts;
  int64_t n_predict = 128;
  float temp = 0.8f;
  int64_t top_k = 40;
  float top_p = 0.95f;
  uint64_t seed = 0;
  bool ignore_eos = false;
  bool no_bos = false;
  std::string prompts_file;   // throughput mode: JSONL in
  std::string out_file;       // JSONL out
  int64_t batch = 64;
  int64_t step_tokens = 2048;
  bool no_progress = false;
  bool prefix_cache = false;
};

// Throughput mode's interruption: set by SIGINT / SIGTERM while g_stop_armed, read by serve() before
// every step.
std::atomic<bool> g_stop{false}, g_stop_armed{false};
std::atomic<int> g_signal{0};

// SIGINT and SIGTERM are blocked in every thread but one of ferry's own, which takes them with
// sigwait: a handler run on a compute thread's stack can overwrite what oneDNN's JIT kernels keep
// below their stack pointer (valgrind sees them read there), and throughput mode's SIGINT corrupted
// the heap inside a oneDNN matmul in 8 of 20 runs (notes/correctness.md). Armed (throughput mode),
// the first signal stops the run after the step in flight; otherwise, or a second time, the signal
// takes its default action (the process ends by it, as without this thread).
void take_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // before any other thread exists: they all inherit it
  std::thread([set] {
    for (;;) {
      int sig = 0;
      if (sigwait(&set, &sig) != 0) continue;
      if (g_stop_armed.load() && !g_stop.exchange(true)) {
        g_signal.store(sig);
        continue;
      }
      signal(sig, SIG_DFL);
      pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
      raise(sig);
    }
  }).detach();
}

// Checks every output path a command will write before its work starts (a missing folder, a
// read-only place, a device node): a long run is not lost at the end. Empty paths are skipped.
Status check_outputs(std::initializer_list<std::pair<const char*, std::string>> outputs) {
  for (const auto& [flag, path] : outputs)
    if (!path.empty()) FERRY_RETURN_IF_ERROR(check_output_path(path).with_context(flag));
  return Status::Ok();
}

// Writes the trace when --trace was given; returns the exit code `rc` (or 1 if writing failed).
int finish_trace(const ModelFlags& f, int rc) {
  if (f.trace.empty()) return rc;
  if (Status st = Tracer::get().write(f.trace); !st.ok()) return fail(st);
  std::fprintf(stderr, "ferry: trace with %zu spans written to %s\n", Tracer::get().size(), f.trace.c_str());
  return rc;
}

// Throughput mode: `ferry run --prompts IN.jsonl --out OUT.jsonl --batch N`.
Expected<std::vector<nlohmann::json>> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) return not_found("--prompts " + path + ": cannot open");
  std::vector<nlohmann::json> rows;
  std::string line;
  int64_t no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return invalid_argument(strprintf("--prompts %s:%lld: not a JSON object", path.c_str(), (long long)no));
    j["_line"] = no;
    rows.push_back(std::move(j));
  }
  if (rows.empty()) return invalid_argument("--prompts " + path + ": no requests in the file");
  return rows;
}

int cmd_throughput(const RunFlags& f) {
  if (f.out_file.empty()) return fail(invalid_argument("--prompts needs --out OUT.jsonl for the completions"));
  if (Status st = check_outputs({{"--out", f.out_file}, {"--trace", f.m.trace}}); !st.ok()) return fail(st);
  if (!f.m.trace.empty()) Tracer::get().enable();
  auto threads = apply_threads(f.m.threads);
  SamplingParams sp{f.temp, f.top_k, f.top_p, f.seed};
  if (Status st = sp.validate(); !st.ok()) return fail(st);
  if (!f.prompts.empty()) return fail(invalid_argument("-p and --prompts do not go together: put every prompt in the JSONL file"));
  auto rows = read_jsonl(f.prompts_file);
  if (!rows.ok()) return fail(rows.status());
  const std::string device = resolve_device(f.m.device, !f.m.lora.empty());
  bool need_tok = false;
  for (const auto& j : *rows) need_tok |= j.contains("prompt");
  auto model = load_model(f.m.model, f.m.load(need_tok, device));
  if (!model.ok()) return fail(model.status());
  const ModelConfig& cfg = model->config;
  if (need_tok && !model->tokenizer) return fail(invalid_argument("--prompts: text prompts need a tokenizer; " + f.m.model + " has none (give \"ids\")"));
  std::vector<ServeRequest> reqs;
  for (const auto& j : *rows) {
    const long long no = j["_line"].get<long long>();
    ServeRequest r;
    r.max_tokens = f.n_predict;
    if (j.contains("max_tokens")) {
      if (!j["max_tokens"].is_number_integer() || j["max_tokens"].get<int64_t>() < 1)
        return fail(invalid_argument(strprintf("--prompts %s:%lld: max_tokens must be a positive integer", f.prompts_file.c_str(), no)));
      r.max_tokens = j["max_tokens"].get<int64_t>();
    }
    if (j.contains("ids")) {
      if (!j["ids"].is_array() || j["ids"].empty())
        return fail(invalid_argument(strprintf("--prompts %s:%lld: \"ids\" must be a non-empty array of token ids", f.prompts_file.c_str(), no)));
      for (const auto& v : j["ids"]) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= cfg.n_vocab)
          return fail(invalid_argument(strprintf("--prompts %s:%lld: %s is not a token id of this model (vocab %lld)", f.prompts_file.c_str(), no,
                                                 v.dump().c_str(), (long long)cfg.n_vocab)));
        r.prompt.push_back(v.get<int32_t>());
      }
    } else if (j.contains("prompt") && j["prompt"].is_string()) {
      r.prompt = model->tokenizer->encode(j["prompt"].get<std::string>(), !f.no_bos);
      if (r.prompt.empty() && cfg.bos_token_id >= 0) r.prompt.push_back(static_cast<int32_t>(cfg.bos_token_id));
      if (r.prompt.empty()) return fail(invalid_argument(strprintf("--prompts %s:%lld: the prompt is empty", f.prompts_file.c_str(), no)));
    } else {
      return fail(invalid_argument(strprintf("--prompts %s:%lld: each line needs \"prompt\" (text) or \"ids\" (token ids)", f.prompts_file.c_str(), no)));
    }
    if (static_cast<int64_t>(r.prompt.size()) + r.max_tokens > cfg.n_ctx_max)
      return fail(invalid_argument(strprintf("--prompts %s:%lld: %zu prompt tokens + %lld new ones pass max_position_embeddings (%lld)", f.prompts_file.c_str(),
                                             no, r.prompt.size(), (long long)r.max_tokens, (long long)cfg.n_ctx_max)));
    reqs.push_back(std::move(r));
  }
  // KV for the `batch` longest requests at once; the GPU's workspace for a step of step_tokens.
  std::vector<int64_t> totals;
  for (const auto& r : reqs) totals.push_back(static_cast<int64_t>(r.prompt.size()) + r.max_tokens);
  std::sort(totals.rbegin(), totals.rend());
  totals.resize(std::min<size_t>(totals.size(), static_cast<size_t>(f.batch)));
  // The CPU's work in throughput mode is attention; whole CPU layers would run prompt chunks of
  // thousands of tokens on it. --cpu-layers N still asks for them.
  ModelFlags mf = f.m;
  if (mf.cpu_layers < 0 && mf.lora.empty()) mf.cpu_layers = 0;  // (--lora runs on the plain CPU backend)
  auto be = make_backend(device, *model, totals, mf, f.step_tokens);
  if (!be.ok()) return fail(be.status());
  Runner runner(*model->weights, *be->executor, *be->kv);
  ServeOptions so;
  so.batch = f.batch;
  so.max_step_tokens = f.step_tokens;
  so.sampling = sp;
  so.stop_at_eos = !f.ignore_eos;
  so.whole_prompts = be->gpu && be->gpu->n_kv_host_layers() > 0;
  so.prefix_cache = f.prefix_cache;
  if (f.prefix_cache && !f.m.kv_disk.empty()) std::fprintf(stderr, "ferry: --prefix-cache is off with --kv-disk\n");
  print_backend(*be);
  // A bar redrawn in place on a terminal (at most 5 times a second); a line per tenth of the
  // requests otherwise (logs).
  const bool bar = !f.no_progress, tty = isatty(2) != 0;
  double last_draw = -1e9;
  int64_t last_tenth = 0;
  auto progress = [&](int64_t done, int64_t total, int64_t generated, double ms) {
    if (!bar) return;
    if (tty && ms - last_draw < 200 && done < total) return;
    if (!tty && done * 10 / std::max<int64_t>(total, 1) == last_tenth && done < total) return;
    last_draw = ms;
    last_tenth = done * 10 / std::max<int64_t>(total, 1);
    const double tps = ms > 0 ? generated / (ms / 1e3) : 0;
    const double eta = done > 0 ? ms / 1e3 * static_cast<double>(total - done) / static_cast<double>(done) : 0;
    const int width = 30, filled = static_cast<int>(width * done / std::max<int64_t>(total, 1));
    std::fprintf(stderr, "%s[%s%s] %lld/%lld requests, %lld tokens, %.1f tok/s, ETA %s   %s", tty ? "\r" : "", std::string(filled, '#').c_str(),
                 std::string(width - filled, '.').c_str(), (long long)done, (long long)total, (long long)generated, tps,
                 done > 0 ? strprintf("%.0f s", eta).c_str() : "-", tty ? "" : "\n");
  };
  std::vector<ServeResult> results;
  // SIGINT / SIGTERM stop the run after the step in flight; the finished requests are written. A
  // second signal ends the process at once (take_stop_signals).
  so.stop = &g_stop;
  g_stop_armed.store(true);
  auto stats = serve(runner, reqs, so, results, {}, progress);
  g_stop_armed.store(false);
  if (bar && tty) std::fputc('\n', stderr);
  if (!stats.ok()) return fail(stats.status());
  std::string out;
  int64_t n_finished = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (!results[i].finished) continue;  // only after an interruption
    ++n_finished;
    const nlohmann::json& in = (*rows)[i];
    nlohmann::json o;
    if (in.contains("id")) o["id"] = in["id"];
    o["index"] = i;
    if (model->tokenizer) o["completion"] = model->tokenizer->decode(results[i].tokens, /*skip_special=*/true);
    o["ids"] = results[i].tokens;
    o["prompt_tokens"] = reqs[i].prompt.size();
    o["completion_tokens"] = results[i].tokens.size();
    o["finish_reason"] = results[i].hit_eos ? "stop" : "length";
    o["ttft_ms"] = std::round(results[i].ttft_ms * 10) / 10;
    o["latency_ms"] = std::round(results[i].latency_ms * 10) / 10;
    out += o.dump() + "\n";
  }
  if (Status st = write_file_atomic(f.out_file, out.data(), out.size()); !st.ok()) return fail(st.with_context("--out"));
  if (stats->interrupted) {
    const int sig = g_signal.load();
    std::fprintf(stderr, "ferry: interrupted by %s: the %lld finished of %zu requests written to %s (each line keeps its \"index\"); the rest were not\n",
                 sig == SIGTERM ? "SIGTERM" : "SIGINT", (long long)n_finished, reqs.size(), f.out_file.c_str());
    return 128 + (sig ? sig : SIGINT);
  }
  const ServeStats& s = *stats;
  // The run's floor: per step the plan's floor (plan_floor: streamed weights over PCIe, GEMM FLOPs
  // over the GPU rate, host-resident K/V over host DRAM, every host byte over the shared DRAM rate),
  // summed over the steps run.
  if (be->planned) {
    double floor_ms = 0;
    for (const auto& [tokens, kv_tokens] : s.step_shapes)
      floor_ms += plan_floor(cfg, be->plan, tokens, be->hw, static_cast<double>(kv_tokens) / static_cast<double>(tokens)).step_ms;
    std::fprintf(stderr, "ferry: floor of these %lld steps %.2f s (PCIe %.1f GB/s, host DRAM %.1f GB/s alone, %.1f GB/s shared, GPU %.0f TFLOP/s): %.0f%% of it reached\n",
                 (long long)s.steps, floor_ms / 1e3, be->hw.h2d_gbs, be->hw.host_dram_gbs, be->hw.dram_shared_gbs, be->hw.gemm_tflops, 100 * floor_ms / s.total_ms);
  }
  const int64_t peak = be->gpu ? be->gpu->peak_device_bytes() : be->emulated ? be->emulated->device().peak_bytes() : -1;
  std::fprintf(stderr,
               "ferry: served %lld requests in %.2f s: %lld prompt + %lld generated tokens, %.1f generated tok/s (%.1f tok/s with prompts), "
               "%lld steps, batch peak %lld%s\n"
               "ferry: time to first token: mean %.0f ms, p50 %.0f ms, p90 %.0f ms; peak %s memory %s; completions in %s\n",
               (long long)s.n_requests, s.total_ms / 1e3, (long long)s.prompt_tokens, (long long)s.generated_tokens,
               s.generated_tokens / (s.total_ms / 1e3), (s.generated_tokens + s.prompt_tokens) / (s.total_ms / 1e3), (long long)s.steps,
               (long long)s.peak_live, so.prefix_cache ? strprintf(", %lld prompt tokens from the prefix cache", (long long)s.cached_prompt_tokens).c_str() : "", s.ttft_mean_ms, s.ttft_p50_ms, s.ttft_p90_ms, be->emulated ? "emulated-device" : "GPU",
               peak >= 0 ? format_bytes(static_cast<double>(peak)).c_str() : "n/a (no GPU)", f.out_file.c_str());
  if (const KvDiskFile* d = be->kv->disk())
    std::fprintf(stderr, "ferry: kv disk: %lld blocks spilled (%s written), %lld read back (%s)\n", (long long)s.blocks_spilled,
                 format_bytes(static_cast<double>(d->bytes_written())).c_str(), (long long)s.blocks_restored,
                 format_bytes(static_cast<double>(d->bytes_read())).c_str());
  be->executor.reset();  // resolves the last GPU spans
  if (Tracer::get().enabled() && be->gpu && be->gpu->n_kv_host_layers() > 0) {
    // Against the GPU's compute and its weight copies: in a streamed plan the attention mostly hides
    // under the copy stream (the GEMMs of a layer take a fraction of its copy).
    const Tracer::Overlap o = Tracer::get().overlap("cpu.attention", std::vector<std::string>{"gpu.compute", "gpu.copy"});
    const Tracer::Overlap oc = Tracer::get().overlap("cpu.attention", std::vector<std::string>{"gpu.compute"});
    std::fprintf(stderr, "ferry: overlap: %.1f%% of %.1f ms of CPU attention ran while the GPU computed or copied weights (%.1f%% under compute alone)\n",
                 100 * o.hidden_fraction, o.copy_ms, 100 * oc.hidden_fraction);
  }
  return finish_trace(f.m, 0);
}

int cmd_run(const RunFlags& f) {
  if (!f.prompts_file.empty()) return cmd_throughput(f);
  if (Status st = check_outputs({{"--trace", f.m.trace}}); !st.ok()) return fail(st);
  if (!f.m.trace.empty()) Tracer::get().enable();
  auto threads = apply_threads(f.m.threads);
  SamplingParams sp{f.temp, f.top_k, f.top_p, f.seed};
  if (Status st = sp.validate(); !st.ok()) return fail(st);
  if (f.n_predict < 0) return fail(invalid_argument("-n must be >= 0"));
  const std::string device = resolve_device(f.m.device, !f.m.lora.empty());
  auto model = load_model(f.m.model, f.m.load(true, device));
  if (!model.ok()) return fail(model.status());
  const ModelConfig& cfg = model->config;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> texts = f.prompts.empty() ? std::vector<std::string>{""} : f.prompts;
  for (const auto& p : texts) {
    std::vector<int32_t> ids = model->tokenizer->encode(p, !f.no_bos);
    if (ids.empty() && cfg.bos_token_id >= 0) ids.push_back(static_cast<int32_t>(cfg.bos_token_id));
    if (ids.empty()) return fail(invalid_argument("-p: the prompt is empty and the model has no BOS token to start from"));
    if (static_cast<int64_t>(ids.size()) > cfg.n_ctx_max)
      return fail(invalid_argument(strprintf("-p: the prompt is %zu tokens, longer than the model's max_position_embeddings (%lld)",
                                             ids.size(), static_cast<long long>(cfg.n_ctx_max))));
    prompts.push_back(std::move(ids));
  }
  std::vector<int64_t> lengths;
  for (const auto& p : prompts) lengths.push_back(std::min<int64_t>(cfg.n_ctx_max, static_cast<int64_t>(p.size()) + f.n_predict));
  auto be = make_backend(device, *model, lengths, f.m);
  if (!be.ok()) return fail(be.status());
  Executor* ex = be->executor.get();
  Runner runner(*model->weights, *ex, *be->kv);

  GenerateOptions go;
  go.n_predict = f.n_predict;
  go.sampling = sp;
  go.stop_at_eos = !f.ignore_eos;
  const bool stream = prompts.size() == 1;
  std::vector<StreamDecoder> decoders;
  for (size_t i = 0; i < prompts.size(); ++i) {
    decoders.emplace_back(*model->tokenizer, /*skip_special=*/true);
    decoders.back().prime(prompts[i]);
  }
  std::vector<std::string> outputs(prompts.size());
  if (stream) {
    std::fputs(texts[0].c_str(), stdout);
    std::fflush(stdout);
  }
  auto on_token = [&](int64_t i, int32_t tok) {
    std::string piece = decoders[i].push(tok);
    if (stream) {
      std::fputs(piece.c_str(), stdout);
      std::fflush(stdout);
    } else {
      outputs[i] += piece;
    }
  };
  auto res = generate(runner, prompts, go, on_token);
  if (!res.ok()) {
    if (stream) std::fputc('\n', stdout);
    return fail(res.status());
  }
  if (stream) {
    std::fputs(decoders[0].flush().c_str(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  } else {
    for (size_t i = 0; i < prompts.size(); ++i) std::printf("[%zu] %s%s%s\n", i, texts[i].c_str(), outputs[i].c_str(), decoders[i].flush().c_str());
    std::fflush(stdout);
  }
  const double prefill_tps = res->prefill_ms > 0 ? res->n_prompt_tokens / (res->prefill_ms / 1e3) : 0;
  const int64_t n_dec = res->n_generated - static_cast<int64_t>(prompts.size());  // the first token of each comes from prefill
  const double decode_tps = res->decode_ms > 0 && n_dec > 0 ? n_dec / (res->decode_ms / 1e3) : 0;
  std::fprintf(stderr, "ferry: %lld prompt tokens, prefill %.1f ms (%.1f tok/s), %lld generated, decode %.2f tok/s [%s, %s]\n",
               static_cast<long long>(res->n_prompt_tokens), res->prefill_ms, prefill_tps, static_cast<long long>(res->n_generated),
               decode_tps, std::string(ex->name()).c_str(), cpu::simd_level());
  print_backend(*be);
  if (Tracer::get().enabled() && ((be->gpu && be->gpu->n_streamed_layers() > 0) || be->emulated)) {
    be->executor.reset();  // resolves the last GPU spans
    const Tracer::Overlap o = Tracer::get().overlap(be->gpu ? "gpu.copy" : "emulated.copy", std::vector<std::string>{"gpu.compute", "cpu.compute"});
    std::fprintf(stderr, "ferry: overlap: %.1f%% of %.1f ms of weight copies hidden under %.1f ms of compute\n", 100 * o.hidden_fraction, o.copy_ms,
                 o.compute_ms);
  }
  return finish_trace(f.m, 0);
}

// ---------------------------------------------------------------------------------------------
// --ctx of serve and chat: the tokens a request or conversation may hold. 0: max_position_embeddings,
// at most 4096; past max_position_embeddings is refused.
Expected<int64_t> context_tokens(int64_t ctx, const ModelConfig& cfg) {
  if (ctx > cfg.n_ctx_max)
    return invalid_argument(strprintf("--ctx %lld passes the model's max_position_embeddings (%lld)", (long long)ctx, (long long)cfg.n_ctx_max));
  return ctx > 0 ? ctx : std::min<int64_t>(cfg.n_ctx_max, 4096);
}

struct ServeFlags {
  ModelFlags m;
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string name;           // the model id the API reports (default: the directory's name)
  std::string chat_template;  // a format name overriding the model's template
  int64_t ctx = 0;            // prompt + completion per request (0: min(max_position_embeddings, 4096))
  int64_t batch = 8;
  int64_t step_tokens = 512;
  int64_t max_tokens = 0;     // chat's default max_tokens (0: the rest of the context)
  std::string api_key;
  bool no_prefix_cache = false;
};

// `ferry serve`: the OpenAI-compatible HTTP server (runtime/server.h) until SIGINT / SIGTERM.
int cmd_serve(const ServeFlags& f) {
  if (Status st = check_outputs({{"--trace", f.m.trace}}); !st.ok()) return fail(st);
  if (!f.m.trace.empty()) Tracer::get().enable();
  auto threads = apply_threads(f.m.threads);
  const std::string device = resolve_device(f.m.device, !f.m.lora.empty());
  auto model = load_model(f.m.model, f.m.load(true, device));
  if (!model.ok()) return fail(model.status());
  const ModelConfig& cfg = model->config;
  if (!model->tokenizer) return fail(invalid_argument("serve: " + f.m.model + " has no tokenizer.json; the API takes and returns text"));
  ServerOptions so;
  so.host = f.host;
  so.port = f.port;
  auto ctx = context_tokens(f.ctx, cfg);
  if (!ctx.ok()) return fail(ctx.status());
  so.ctx = *ctx;
  so.default_chat_max_tokens = f.max_tokens;
  so.api_key = f.api_key;
  if (so.api_key.empty())
    if (const char* k = std::getenv("FERRY_API_KEY"); k) so.api_key = k;
  so.engine = EngineOptions{f.batch, f.step_tokens, false, !f.no_prefix_cache && f.m.kv_disk.empty()};
  so.model_id = !f.name.empty() ? f.name : std::filesystem::path(f.m.model).filename().string();
  if (so.model_id.empty()) so.model_id = std::filesystem::path(f.m.model).parent_path().filename().string();
  // The chat template: the model's (recognised), or --chat-template's format. Without either the
  // chat endpoint answers 400 with the reason; completions still work.
  std::string chat_note = "no chat endpoint: a synthetic model has no chat template";
  if (model->spec.rfind("synthetic:", 0) != 0) {
    auto t = ChatTemplate::from_model_dir(f.m.model, f.chat_template);
    if (t.ok()) {
      so.chat = *t;
      chat_note = std::string("chat format ") + chat_format_name(t->format);
    } else if (!f.chat_template.empty()) {
      return fail(t.status());
    } else {
      chat_note = "no chat endpoint (" + t.status().message() + ")";
    }
  }
  // K/V for `batch` requests of the whole context at once; more wait in the queue.
  std::vector<int64_t> lengths(static_cast<size_t>(f.batch), so.ctx);
  ModelFlags mf = f.m;
  if (device == "gpu" && mf.cpu_layers < 0) mf.cpu_layers = 0;  // as in throughput mode: the CPU's work is attention
  auto be = make_backend(device, *model, lengths, mf, f.step_tokens);
  if (!be.ok()) return fail(be.status());
  so.engine.whole_prompts = be->gpu && be->gpu->n_kv_host_layers() > 0;
  Runner runner(*model->weights, *be->executor, *be->kv);
  so.log = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  print_backend(*be);
  Server server(runner, *model->tokenizer, so);
  g_stop_armed.store(true);
  auto port = server.start();
  if (!port.ok()) return fail(port.status());
  std::fprintf(stderr, "ferry: serving %s (%s, %s) on http://%s:%d/v1 — %lld requests at once, %lld tokens each (--ctx), %s; Ctrl-C stops\n",
               so.model_id.c_str(), std::string(be->executor->name()).c_str(), chat_note.c_str(), so.host.c_str(), *port, (long long)f.batch,
               (long long)so.ctx, so.api_key.empty() ? "no API key" : "API key required");
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  server.stop();
  g_stop_armed.store(false);
  const ServerCounters c = server.counters();
  std::fprintf(stderr, "ferry: served %lld requests: %lld prompt + %lld generated tokens in %lld steps; %lld answered with an error\n",
               (long long)c.requests, (long long)c.prompt_tokens, (long long)c.generated_tokens, (long long)c.steps, (long long)c.refused);
  be->executor.reset();
  return finish_trace(f.m, 0);
}

// ---------------------------------------------------------------------------------------------
struct ChatFlags {
  ModelFlags m;
  std::string chat_template;
  std::string system;
  int64_t n_predict = 512;
  int64_t ctx = 0;
  float temp = 0.7f;
  int64_t top_k = 40;
  float top_p = 0.95f;
  uint64_t seed = 0;
};

// `ferry chat`: a conversation on the terminal. Each line of standard input is a user turn; the
// reply streams to standard output. The whole conversation goes through the chat template every
// turn; when it no longer fits --ctx, the oldest exchanges are dropped (the system message stays).
// "/reset" starts over, "/exit" or end of input ends.
int cmd_chat(const ChatFlags& f) {
  if (Status st = check_outputs({{"--trace", f.m.trace}}); !st.ok()) return fail(st);
  if (!f.m.trace.empty()) Tracer::get().enable();
  auto threads = apply_threads(f.m.threads);
  SamplingParams sp{f.temp, f.top_k, f.top_p, f.seed};
  if (Status st = sp.validate(); !st.ok()) return fail(st);
  if (f.m.model.rfind("synthetic:", 0) == 0) return fail(invalid_argument("chat: -m " + f.m.model + ": a synthetic model has no chat template; give a model directory"));
  auto tmpl = ChatTemplate::from_model_dir(f.m.model, f.chat_template);
  if (!tmpl.ok()) return fail(tmpl.status());
  const std::string device = resolve_device(f.m.device, !f.m.lora.empty());
  auto model = load_model(f.m.model, f.m.load(true, device));
  if (!model.ok()) return fail(model.status());
  const ModelConfig& cfg = model->config;
  const Tokenizer& tok = *model->tokenizer;
  auto ctx_or = context_tokens(f.ctx, cfg);
  if (!ctx_or.ok()) return fail(ctx_or.status());
  const int64_t ctx = *ctx_or;
  if (f.n_predict >= ctx) return fail(invalid_argument(strprintf("-n %lld leaves no room for the conversation in --ctx %lld", (long long)f.n_predict, (long long)ctx)));
  auto be = make_backend(device, *model, {ctx}, f.m);
  if (!be.ok()) return fail(be.status());
  Runner runner(*model->weights, *be->executor, *be->kv);
  Engine engine(runner, EngineOptions{1, 512, false});
  const std::vector<int32_t> stop_ids = tmpl->end_of_turn_ids(tok);
  std::vector<ChatMessage> conv;
  if (!f.system.empty()) conv.push_back({"system", f.system});
  const bool tty = isatty(0) != 0;
  std::fprintf(stderr, "ferry: chat with %s (%s format, %s); a line is a turn, /reset starts over, /exit or Ctrl-D ends\n", f.m.model.c_str(),
               chat_format_name(tmpl->format), std::string(be->executor->name()).c_str());
  std::string line;
  int64_t turn = 0;
  int32_t kept = -1;          // the sequence holding the conversation's K/V
  std::vector<int32_t> held;  // the tokens whose K/V it holds
  for (;;) {
    if (tty) std::fputs("> ", stdout), std::fflush(stdout);
    if (!std::getline(std::cin, line) || line == "/exit") break;
    if (line == "/reset") {
      conv.resize(f.system.empty() ? 0 : 1);
      if (kept >= 0) engine.drop_sequence(kept);
      kept = -1;
      held.clear();
      std::fprintf(stderr, "ferry: the conversation starts over\n");
      continue;
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    conv.push_back({"user", line});
    std::vector<int32_t> prompt;
    for (;;) {
      auto text = tmpl->render(conv, true);
      if (!text.ok()) return fail(text.status());
      prompt = tok.encode(*text, false);
      const size_t first = f.system.empty() ? 0 : 1;
      if (static_cast<int64_t>(prompt.size()) + f.n_predict <= ctx || conv.size() <= first + 1) break;
      conv.erase(conv.begin() + static_cast<std::ptrdiff_t>(first), conv.begin() + static_cast<std::ptrdiff_t>(first + 2));  // the oldest exchange
      std::fprintf(stderr, "ferry: the conversation passed --ctx %lld: the oldest exchange was dropped\n", (long long)ctx);
    }
    EngineRequest r;
    r.prompt = prompt;
    r.max_tokens = std::min<int64_t>(f.n_predict, ctx - static_cast<int64_t>(prompt.size()));
    r.sampling = sp;
    r.sampling.seed = f.seed + static_cast<uint64_t>(turn++);
    r.stop_ids = stop_ids;
    r.keep_sequence = true;
    // The K/V of the turns before stay in the cache: only what the new prompt does not share with
    // them is prefilled (all of it after /reset or when old exchanges were dropped).
    if (kept >= 0) {
      size_t same = 0;
      while (same < held.size() && same + 1 < prompt.size() && held[same] == prompt[same]) ++same;
      r.continue_seq = kept;
      r.continue_len = static_cast<int64_t>(same);
    }
    if (r.max_tokens < 1) return fail(invalid_argument(strprintf("the message is %zu tokens, more than --ctx %lld", prompt.size(), (long long)ctx)));
    const int64_t cached = r.continue_len;
    if (auto id = engine.submit(std::move(r)); !id.ok()) return fail(id.status());
    StreamDecoder dec(tok, /*skip_special=*/true);
    dec.prime(prompt);
    std::string reply;
    std::vector<EngineEvent> events;
    held = prompt;
    int64_t n_gen = 0;
    const auto t0 = std::chrono::steady_clock::now();
    while (!engine.idle()) {
      if (Status st = engine.step(events); !st.ok()) return fail(st);
      for (const EngineEvent& e : events) {
        if (e.kept_seq >= 0) kept = e.kept_seq;
        else held.push_back(e.token);  // fed back (the last token of the reply is not)
        ++n_gen;
        const std::string piece = dec.push(e.token);
        reply += piece;
        std::fputs(piece.c_str(), stdout);
        std::fflush(stdout);
      }
    }
    const std::string rest = dec.flush();
    reply += rest;
    std::printf("%s\n", rest.c_str());
    std::fflush(stdout);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "ferry: [%zu prompt tokens, %lld of them cached; %lld generated in %.2f s]\n", prompt.size(), (long long)cached, (long long)n_gen, s);
    conv.push_back({"assistant", reply});
  }
  print_backend(*be);
  be->executor.reset();
  return finish_trace(f.m, 0);
}

// ---------------------------------------------------------------------------------------------
struct LogitsFlags {
  ModelFlags m;
  std::string ids;
  std::string out;
};

int cmd_logits(const LogitsFlags& f) {
  if (Status st = check_outputs({{"--out", f.out}, {"--trace", f.m.trace}}); !st.ok()) return fail(st);
  if (!f.m.trace.empty()) Tracer::get().enable();
  auto threads = apply_threads(f.m.threads);
  auto ids = parse_ids(f.ids, "--ids");
  if (!ids.ok()) return fail(ids.status());
  if (ids->empty()) return fail(invalid_argument("--ids: no token ids given"));
  const std::string device = resolve_device(f.m.device, !f.m.lora.empty());
  auto model = load_model(f.m.model, f.m.load(false, device));
  if (!model.ok()) return fail(model.status());
  const ModelConfig& cfg = model->config;
  for (int32_t id : *ids)
    if (id >= cfg.n_vocab) return fail(invalid_argument(strprintf("--ids: token id %d is outside the vocabulary (vocab_size %lld)", id, static_cast<long long>(cfg.n_vocab))));
  if (static_cast<int64_t>(ids->size()) > cfg.n_ctx_max)
    return fail(invalid_argument(strprintf("--ids: %zu tokens is more than max_position_embeddings (%lld)", ids->size(), static_cast<long long>(cfg.n_ctx_max))));
  auto be = make_backend(device, *model, {static_cast<int64_t>(ids->size())}, f.m);
  if (!be.ok()) return fail(be.status());
  Runner runner(*model->weights, *be->executor, *be->kv);
  auto logits = prompt_logits(runner, *ids);
  if (!logits.ok()) return fail(logits.status());
  Status st = write_safetensors(f.out, {{"logits", DType::kF32, {static_cast<int64_t>(ids->size()), cfg.n_vocab}, logits->data()}},
                                {{"model", f.m.model}, {"device", std::string(be->executor->name())}});
  if (!st.ok()) return fail(st.with_context("--out"));
  std::fprintf(stderr, "ferry: wrote logits [%zu, %lld] to %s\n", ids->size(), static_cast<long long>(cfg.n_vocab), f.out.c_str());
  print_backend(*be);
  be->executor.reset();
  return finish_trace(f.m, 0);
}

// ---------------------------------------------------------------------------------------------
struct FinetuneFlags {
  ModelFlags m;
  std::string data;
  std::string eval_data;
  std::string out;
  std::string init_adapter;
  std::string resume;
  std::string targets = "all";
  std::string schedule = "constant";
  std::string log;
  int64_t rank = 16;
  double alpha = 32;
  double lr = 2e-4;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;
  int64_t steps = 0;
  int64_t epochs = 1;
  int64_t batch = 4;
  int64_t grad_accum = 1;
  int64_t seq_len = 512;
  int64_t warmup = 0;
  int64_t save_every = 0;
  int64_t eval_every = 0;
  uint64_t seed = 0;
  bool quant_given = false;  // --quant on the command line (else NF4, or a bitsandbytes checkpoint as stored)
};

// The token-weighted mean loss over `ex` in batches of `rows`, no gradients.
Expected<double> eval_loss(cpu::LoraTrainer& trainer, const LoraAdapter& w, const std::vector<FinetuneExample>& ex, int64_t rows, int32_t pad) {
  double sum = 0;
  int64_t n = 0;
  const int64_t count = static_cast<int64_t>(ex.size());
  for (int64_t i = 0; i < count; i += rows) {
    FERRY_ASSIGN_OR_RETURN(const cpu::LossResult r, trainer.loss(w, make_train_batch(ex, i, std::min(rows, count - i), pad), nullptr));
    sum += r.loss * static_cast<double>(r.n_tokens);
    n += r.n_tokens;
  }
  return sum / static_cast<double>(n);
}

// `ferry finetune`: LoRA adapters over a frozen (by default NF4) base, trained on the CPU
// (cpu/lora_train.h), written as peft's adapter files, with the optimizer's state beside them so a
// run can be resumed (--resume).
int cmd_finetune(const FinetuneFlags& f) {
  const std::string weights_path = f.out + "/adapter_model.safetensors", config_path = f.out + "/adapter_config.json",
                    state_path = f.out + "/training_state.safetensors";
  if (f.m.device == "gpu")
    return fail(unsupported("finetune: --device gpu: the GPU training pass (the frozen layers streamed a second time for the backward) is not "
                            "built yet; this version trains on the CPU (--device cpu)"));
  if (!f.resume.empty() && !f.init_adapter.empty()) return fail(invalid_argument("finetune: --resume and --init-adapter: give one (--resume also restores the optimizer)"));
  {
    std::error_code ec;
    std::filesystem::create_directories(f.out, ec);
    if (ec) return fail(invalid_argument(strprintf("--out %s: cannot create the directory: %s", f.out.c_str(), ec.message().c_str())));
  }
  if (Status st = check_outputs({{"--out", weights_path}, {"--out", config_path}, {"--out", state_path}, {"--log", f.log}}); !st.ok()) return fail(st);
  auto threads = apply_threads(f.m.threads);
  // Without --quant: NF4, QLoRA's base, unless the weights come quantised (a bitsandbytes checkpoint)
  // or from a packed store (--disk): then as they are stored.
  LoadOptions lo = f.m.load(false, "cpu");
  if (!f.quant_given) lo.quant = DType::kBF16;
  auto model = load_model(f.m.model, lo);
  if (!model.ok()) return fail(model.status());
  if (!f.quant_given && !is_quantized(model->config.checkpoint_quant) && f.m.disk.empty())
    if (Status st = model->weights->quantize(DType::kNF4); !st.ok()) return fail(st);
  const ModelConfig& cfg = model->config;
  const int64_t eos = cfg.eos_token_ids.empty() ? -1 : cfg.eos_token_ids[0];
  const int64_t seq_len = std::min(f.seq_len, cfg.n_ctx_max);
  auto data = read_finetune_data(f.data, model->tokenizer.get(), seq_len, cfg.n_vocab, eos);
  if (!data.ok()) return fail(data.status());
  std::vector<FinetuneExample> eval;
  if (!f.eval_data.empty()) {
    auto e = read_finetune_data(f.eval_data, model->tokenizer.get(), seq_len, cfg.n_vocab, eos);
    if (!e.ok()) return fail(e.status().with_context("--eval-data"));
    eval = std::move(*e);
  }
  LoraAdapter w;
  const std::string from = !f.resume.empty() ? f.resume : f.init_adapter;
  if (!from.empty()) {
    auto a = load_lora(cfg, from);
    if (!a.ok()) return fail(a.status().with_context(f.resume.empty() ? "--init-adapter" : "--resume"));
    w = std::move(*a);
  } else {
    auto targets = parse_lora_targets(f.targets);
    if (!targets.ok()) return fail(targets.status());
    LoraConfig lc;
    lc.rank = f.rank, lc.alpha = f.alpha, lc.targets = *targets;
    w = LoraAdapter::init(cfg, lc, f.seed);
  }
  const int64_t n_ex = static_cast<int64_t>(data->size()), rows = std::min(f.batch, n_ex), per_step = rows * f.grad_accum;
  const int64_t steps = f.steps > 0 ? f.steps : f.epochs * ((n_ex + per_step - 1) / per_step);
  AdamW opt(w, AdamWParams{.lr = f.lr, .weight_decay = f.weight_decay});
  int64_t first_step = 1, next_example = 0;
  if (!f.resume.empty()) {
    // The adapter and the optimizer state must be of the same step: an interrupted save could leave
    // one newer than the other.
    auto meta = opt.load(f.resume + "/training_state.safetensors");
    if (!meta.ok()) return fail(meta.status().with_context("--resume"));
    auto ad = SafetensorsFile::open(f.resume + "/adapter_model.safetensors");
    if (!ad.ok()) return fail(ad.status().with_context("--resume"));
    auto it = (*ad)->metadata().find("ferry_step");
    const std::string ad_step = it == (*ad)->metadata().end() ? "none" : it->second;
    if (ad_step != std::to_string(opt.steps()))
      return fail(corrupt(strprintf("--resume %s: the adapter is of step %s and the optimizer state of step %lld (a save was interrupted): resume "
                                    "from an earlier copy, or start again with --init-adapter",
                                    f.resume.c_str(), ad_step.c_str(), static_cast<long long>(opt.steps()))));
    first_step = opt.steps() + 1;
    if (auto ne = meta->find("next_example"); ne != meta->end()) next_example = std::strtoll(ne->second.c_str(), nullptr, 10) % n_ex;
    if (first_step > steps)
      return fail(invalid_argument(strprintf("--resume: the run already took %lld steps; --steps %lld is not more", static_cast<long long>(opt.steps()),
                                             static_cast<long long>(steps))));
  }
  int64_t n_trained = 0, n_cut = 0;
  for (const auto& e : *data) {
    for (size_t i = 1; i < e.labels.size(); ++i) n_trained += e.labels[i] != cpu::kIgnoreLabel;
    n_cut += e.cut;
  }
  if (n_cut > 0)
    std::fprintf(stderr, "ferry: %lld of %lld examples are longer than --seq-len %lld: their tails are not trained on\n", static_cast<long long>(n_cut),
                 static_cast<long long>(n_ex), static_cast<long long>(seq_len));
  std::fprintf(stderr, "ferry: finetune %s (%s): LoRA r=%lld alpha=%g on %zu modules a layer, %lld parameters; %lld examples (%lld trained tokens), "
                       "steps %lld..%lld of %lld rows x %lld, lr %g (%s, warm-up %lld), clip %g, on the CPU\n",
               f.m.model.c_str(), model->weights->source().c_str(), static_cast<long long>(w.cfg.rank), w.cfg.alpha, w.cfg.targets.size(),
               static_cast<long long>(w.n_params()), static_cast<long long>(n_ex), static_cast<long long>(n_trained), static_cast<long long>(first_step),
               static_cast<long long>(steps), static_cast<long long>(rows), static_cast<long long>(f.grad_accum), f.lr, f.schedule.c_str(),
               static_cast<long long>(f.warmup), f.max_grad_norm);
  const int32_t pad = eos >= 0 ? static_cast<int32_t>(eos) : 0;
  cpu::LoraTrainer trainer(*model->weights);
  nlohmann::json log = nlohmann::json::array();
  int64_t done_step = first_step - 1;
  // Adapter first, then the optimizer state, both tagged with the step (see --resume), then the log.
  auto save = [&]() -> Status {
    const std::map<std::string, std::string> meta{{"ferry_step", std::to_string(done_step)}};
    FERRY_RETURN_IF_ERROR(save_lora(w, f.out, f.m.model, meta));
    FERRY_RETURN_IF_ERROR(opt.save(state_path, {{"next_example", std::to_string(next_example)}, {"data", f.data}}));
    if (f.log.empty()) return Status::Ok();
    const std::string text = log.dump(1) + "\n";
    return write_file_atomic(f.log, text.data(), text.size()).with_context("--log");
  };
  auto evaluate = [&](int64_t step) -> Status {
    if (eval.empty()) return Status::Ok();
    FERRY_ASSIGN_OR_RETURN(const double l, eval_loss(trainer, w, eval, rows, pad));
    std::fprintf(stderr, "step %lld  eval loss %.4f (%zu examples)\n", static_cast<long long>(step), l, eval.size());
    log.push_back({{"step", step}, {"eval_loss", l}});
    return Status::Ok();
  };
  LoraAdapter g = LoraAdapter::zeros(cfg, w.cfg), acc = g;
  const auto t_start = std::chrono::steady_clock::now();
  int64_t tokens_done = 0;
  g_stop_armed.store(true);
  Status failed = Status::Ok();
  for (int64_t step = first_step; step <= steps && !g_stop.load(); ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    // Gradient accumulation: the micro-batches' gradients weighted by their trained tokens, so the
    // step's gradient is that of the mean over all of them.
    lora_scale(acc, 0.0f);
    double loss_sum = 0;
    int64_t n_tok = 0, n_in = 0;
    for (int64_t k = 0; k < f.grad_accum && failed.ok(); ++k) {
      const cpu::TrainBatch b = make_train_batch(*data, next_example, rows, pad);
      next_example = (next_example + rows) % n_ex;
      auto r = trainer.loss(w, b, &g);
      if (!r.ok()) {
        failed = r.status().with_context(strprintf("step %lld", static_cast<long long>(step)));
        break;
      }
      lora_axpy(acc, static_cast<float>(r->n_tokens), g);
      loss_sum += r->loss * static_cast<double>(r->n_tokens);
      n_tok += r->n_tokens;
      n_in += b.rows * b.len;
    }
    if (!failed.ok()) break;
    lora_scale(acc, 1.0f / static_cast<float>(n_tok));
    // torch.nn.utils.clip_grad_norm_: scaled by max_norm / (norm + 1e-6) when above it.
    const double norm = lora_norm(acc);
    if (!std::isfinite(norm)) {  // never step (and save) an adapter into NaN: the last save stands
      failed = invalid_argument(strprintf("step %lld: the gradient is not finite (norm %g); the adapter saved before this step stands: "
                                          "lower --lr or check the data",
                                          static_cast<long long>(step), norm));
      break;
    }
    if (f.max_grad_norm > 0 && norm > f.max_grad_norm) lora_scale(acc, static_cast<float>(f.max_grad_norm / (norm + 1e-6)));
    const double lr = finetune_lr(f.lr, step, steps, f.warmup, f.schedule);
    opt.set_lr(lr);
    opt.step(w, acc);
    done_step = step;
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), loss = loss_sum / static_cast<double>(n_tok);
    tokens_done += n_in;
    std::fprintf(stderr, "step %lld/%lld  loss %.4f  grad norm %.3g  lr %.3g  %lld tokens  %.2f s (%.0f tok/s)\n", static_cast<long long>(step),
                 static_cast<long long>(steps), loss, norm, lr, static_cast<long long>(n_in), sec, static_cast<double>(n_in) / sec);
    log.push_back({{"step", step}, {"loss", loss}, {"grad_norm", norm}, {"lr", lr}, {"tokens", n_in}, {"trained_tokens", n_tok}, {"seconds", sec}});
    if (f.eval_every > 0 && step % f.eval_every == 0 && step < steps)
      if (failed = evaluate(step); !failed.ok()) break;
    if (f.save_every > 0 && step % f.save_every == 0 && step < steps)
      if (failed = save(); !failed.ok()) break;
  }
  g_stop_armed.store(false);
  if (!failed.ok()) return fail(failed);
  if (!g_stop.load() && done_step == steps)
    if (Status st = evaluate(done_step); !st.ok()) return fail(st);
  if (Status st = save(); !st.ok()) return fail(st);
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (g_stop.load()) {
    const int sig = g_signal.load();
    std::fprintf(stderr, "ferry: interrupted by %s after step %lld of %lld: the adapter and optimizer state as of that step written to %s "
                         "(continue with --resume %s)\n",
                 sig == SIGTERM ? "SIGTERM" : "SIGINT", static_cast<long long>(done_step), static_cast<long long>(steps), f.out.c_str(), f.out.c_str());
    return 128 + (sig ? sig : SIGINT);
  }
  std::fprintf(stderr, "ferry: %lld steps, %lld tokens in %.1f s (%.0f tok/s); adapter written to %s (peft: PeftModel.from_pretrained(model, \"%s\"))\n",
               static_cast<long long>(steps - first_step + 1), static_cast<long long>(tokens_done), total, static_cast<double>(tokens_done) / total,
               f.out.c_str(), f.out.c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------
int cmd_inspect(const ModelFlags& f) {
  auto model = load_model(f.model, f.load(false, "cpu"));
  if (!model.ok()) return fail(model.status());
  const ModelConfig& c = model->config;
  const WeightStore& ws = *model->weights;
  std::printf("model:        %s\n", f.model.c_str());
  std::printf("weights:      %s\n", ws.source().c_str());
  std::printf("architecture: %s (%s)\n", c.architecture.c_str(), std::string(family_name(c.family)).c_str());
  std::printf("shape:        %lld layers, hidden %lld, ffn %lld, heads %lld, kv heads %lld, head_dim %lld, vocab %lld\n",
              (long long)c.n_layers, (long long)c.n_embd, (long long)c.n_ff, (long long)c.n_heads, (long long)c.n_kv_heads,
              (long long)c.head_dim, (long long)c.n_vocab);
  const char* rope = c.rope_scaling.type == RopeType::kLlama3 ? "llama3" : c.rope_scaling.type == RopeType::kLinear ? "linear" : "none";
  std::printf("context:      %lld positions, rope theta %g, scaling %s (factor %g)%s\n", (long long)c.n_ctx_max, c.rope_theta, rope,
              c.rope_scaling.factor, c.sliding_window > 0 ? strprintf(", sliding window %lld", (long long)c.sliding_window).c_str() : "");
  std::printf("options:      rms_norm_eps %g, attention bias %s, tied embeddings %s, dtype %s\n", c.rms_norm_eps, c.attention_bias ? "yes" : "no",
              c.tie_word_embeddings ? "yes" : "no", std::string(dtype_name(c.dtype)).c_str());
  std::printf("parameters:   %lld (%.2f B)\n", (long long)c.n_params(), c.n_params() / 1e9);
  // Bytes as stored, per component.
  const GlobalWeights& g = ws.globals();
  size_t total = 0;
  size_t per_comp[kLayerTensorCount] = {};
  for (int64_t il = 0; il < c.n_layers; ++il) {
    const LayerWeights& lw = ws.layer(il);
    for (int t = 0; t < kLayerTensorCount; ++t)
      if (lw.t[t].n_dims > 0) per_comp[t] += lw.t[t].nbytes();
    for (const auto& v : lw.t)
      if (v.n_dims > 0) total += v.nbytes();
  }
  const size_t embd = g[kTokEmbd].nbytes(), head = c.tie_word_embeddings ? 0 : g[kLmHead].nbytes(), norm = g[kOutNorm].nbytes();
  total += embd + head + norm;
  std::printf("bytes:        %s in all\n", format_bytes(total).c_str());
  size_t layer0 = 0;
  for (const auto& v : ws.layer(0).t)
    if (v.n_dims > 0) layer0 += v.nbytes();
  std::printf("  per layer   %s (served from %s)\n", format_bytes(static_cast<double>(layer0)).c_str(), std::string(tier_name(ws.layer_tier(0))).c_str());
  std::printf("  embedding   %s\n", format_bytes(embd).c_str());
  std::printf("  lm_head     %s%s\n", format_bytes(head).c_str(), c.tie_word_embeddings ? " (tied to the embedding)" : "");
  std::printf("  final norm  %s\n", format_bytes(norm).c_str());
  std::printf("  per component, all layers:\n");
  for (int t = 0; t < kLayerTensorCount; ++t)
    if (per_comp[t]) {
      const LayerWeights& l0 = ws.layer(0);
      const char* name = t == kWqkv && is_fused_qkv(l0) ? "wqkv" : t == kWGateUp && is_fused_gate_up(l0) ? "w_gate_up" : layer_tensor_short_name(static_cast<LayerTensor>(t));
      std::printf("    %-10s %s\n", name, format_bytes(per_comp[t]).c_str());
    }
  return 0;
}

// ---------------------------------------------------------------------------------------------
struct PlanFlags {
  ModelFlags m;
  int64_t batch = 1;
  int64_t context = 4096;
};

int cmd_plan(const PlanFlags& f) {
  // The plan `run` would make with the same flags: for the GPU, or with --device cpu (or auto
  // without a GPU) for the emulated device, whose K/V stay in host memory.
  const std::string device = resolve_device(f.m.device, !f.m.lora.empty());
  LoadOptions lo = f.m.load(false, device);
  lo.shapes_only = true;  // a plan reads shapes and formats, never weight bytes
  auto model = load_model(f.m.model, lo);
  if (!model.ok()) return fail(model.status());
  const ModelConfig& c = model->config;
  auto inp = plan_input(f.m, *model, f.batch);
  if (!inp.ok()) return fail(inp.status());
  GpuPlanInput in = *inp;
  const int64_t ctx = std::min(f.context, c.n_ctx_max);
  if (device == "cpu") {
    in.emulated = true;
    in.layer_bytes = cpu::stored_layer_bytes(*model->weights);
    in.globals_bytes = cpu::stored_globals_bytes(*model->weights);
    in.embedding_bytes = static_cast<int64_t>(model->weights->globals().t[kTokEmbd].nbytes());
  } else {
    in.kv_bytes = 2 * c.n_layers * f.batch * ctx * c.kv_dim() * 2;  // BF16 K and V
  }
  auto plan = plan_gpu(c, in);
  if (!plan.ok()) return fail(plan.status());
  const HardwareProfile& hw = in.hw;
  const PlanFloor fl = plan_floor(c, *plan, f.batch, hw, static_cast<double>(ctx));
  const double b = static_cast<double>(f.batch);
  std::printf("model:      %s (%s, %lld layers, %.2f B parameters)\n", f.m.model.c_str(), c.architecture.c_str(), (long long)c.n_layers, c.n_params() / 1e9);
  std::printf("device:     %s\n", device == "cpu" ? "cpu (the emulated device of --gpu-mem; K/V in host memory)" : "gpu");
  std::printf("budget:     --gpu-mem %s, --host-mem %s%s, batch %lld, context %lld (KV %s, BF16)\n", f.m.gpu_mem.empty() ? "(none)" : f.m.gpu_mem.c_str(),
              f.m.host_mem.empty() ? (in.have_disk ? "0 (--disk)" : "(unlimited)") : f.m.host_mem.c_str(), in.have_disk ? ", --disk" : "",
              (long long)f.batch, (long long)ctx, format_bytes(static_cast<double>(in.kv_bytes)).c_str());
  std::printf("placement:  %s\n", plan->placement().c_str());
  std::printf("layers:     %lld resident, %lld streamed (%lld from disk), %lld computed on the CPU\n", (long long)plan->n_resident,
              (long long)plan->n_streamed, (long long)plan->n_disk, (long long)plan->n_cpu);
  std::printf("kv:         %s\n", device == "cpu" ? "in host memory, attention on the CPU" : plan->n_kv_host == 0 ? "on the GPU, attention on the GPU"
                                   : strprintf("%lld of %lld layers in host memory, attention on the CPU (%s kernel); --kv %s", (long long)plan->n_kv_host,
                                               (long long)c.n_layers, cpu::attn_isa_name(cpu::attn_isa_best()), f.m.kv.c_str()).c_str());
  std::printf("bytes:      GPU %s (weights %s, globals %s, KV %s, staging %s, workspace %s, runtime reserve %s); pinned host %s%s; disk %s per step\n",
              format_bytes(static_cast<double>(plan->total_bytes)).c_str(), format_bytes(static_cast<double>(plan->n_resident * plan->layer_bytes)).c_str(),
              format_bytes(static_cast<double>(plan->globals_bytes)).c_str(), format_bytes(static_cast<double>(plan->kv_gpu_bytes)).c_str(),
              format_bytes(static_cast<double>(plan->slots_bytes)).c_str(), format_bytes(static_cast<double>(plan->workspace_bytes)).c_str(),
              format_bytes(static_cast<double>(plan->reserve_bytes)).c_str(), format_bytes(static_cast<double>(plan->host_bytes)).c_str(),
              plan->embedding_on_host ? strprintf(" + token embedding %s", format_bytes(static_cast<double>(plan->embedding_host_bytes)).c_str()).c_str() : "",
              format_bytes(static_cast<double>(plan->disk_bytes)).c_str());
  std::printf("predicted:  %.2f ms per decode step = %.1f tok/s (cost model with the profile's measured rates)\n", plan->predicted_ms,
              1e3 * b / plan->predicted_ms);
  std::printf("floor:      %.2f ms per decode step = %.1f tok/s (bound by %s): PCIe %.2f ms, disk %.2f ms, CPU layers %.2f ms, GPU memory %.2f ms, compute %.2f ms, host K/V %.2f ms, host DRAM shared %.2f ms\n",
              fl.step_ms, 1e3 * b / fl.step_ms, fl.bound, fl.stream_ms, fl.disk_ms, fl.cpu_ms, fl.hbm_ms, fl.compute_ms, fl.kv_ms, fl.host_ms);
  const double gemv_gbs = gpu_layer_rate(hw, in.weights, 1);
  std::printf("profile:    %s: H2D %.1f GB/s, HBM %.0f GB/s%s, GPU BF16 %.0f TFLOP/s, host DRAM %.1f GB/s, CPU layer %.1f GB/s%s%s, CPU %.2f TFLOP/s, disk %.2f GB/s\n",
              hw.source.c_str(), hw.h2d_gbs, hw.hbm_gbs,
              gemv_gbs < hw.hbm_gbs
                  ? strprintf(" (decode GEMV %.0f GB/s of %s weights, %.0f us a layer beside)", gemv_gbs, std::string(dtype_name(in.weights)).c_str(),
                              1e3 * gpu_layer_fixed_ms(hw, in.weights, 1))
                        .c_str()
                  : "",
              hw.gemm_tflops, hw.host_dram_gbs, hw.cpu_layer_gbs,
              is_quantized(in.weights) ? strprintf(" (%s: %.1f GB/s)", std::string(dtype_name(in.weights)).c_str(), cpu_layer_rate(hw, in.weights)).c_str() : "",
              hw.cpu_layer_shared_gbs > 0 ? strprintf(", beside copies %.1f GB/s with the copies at %.1f", hw.cpu_layer_shared_gbs, hw.h2d_shared_gbs).c_str() : "",
              hw.cpu_tflops, hw.disk_gbs);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// bench and sweep: decode throughput under a budget, against the plan's prediction and floor.
struct BenchFlags {
  ModelFlags m;
  std::vector<std::string> budgets;  // sweep: --gpu-mem list
  std::vector<int64_t> batches{1};
  int64_t n_predict = 32;
  int64_t prompt_tokens = 16;
  bool overlap = true;
  std::string json;
  std::string out;  // sweep: PREFIX for .csv/.json/.svg
};

struct BenchPoint {
  std::string gpu_mem;
  int64_t batch = 1;
  std::string error;  // the point could not run (budget below the minimum, say)
  GpuPlan plan;
  PlanFloor floor;
  double decode_tps = 0, prefill_ms = 0, predicted_tps = 0, floor_tps = 0;
  int64_t ferry_peak = 0, driver_delta = -1;
  double overlap = -1, copy_ms = 0, compute_ms = 0;
  std::string device;
};

// Runs `batch` synthetic prompts of `prompt_tokens` tokens and `n` greedy decode steps. With `traced`
// the Tracer is on (no CUDA graphs, events around every copy and layer) and only overlap is kept.
BenchPoint bench_point(const BenchFlags& f, const std::string& gpu_mem, int64_t batch, bool traced) {
  BenchPoint pt;
  pt.gpu_mem = gpu_mem;
  pt.batch = batch;
  ModelFlags mf = f.m;
  mf.gpu_mem = gpu_mem;
  Tracer::get().reset();
  if (traced) Tracer::get().enable();
  struct Off {
    ~Off() { Tracer::get().disable(); }
  } off;
  const std::string device = resolve_device(mf.device);
  auto model = load_model(mf.model, mf.load(false, device));
  if (!model.ok()) {
    pt.error = model.status().message();
    return pt;
  }
  const ModelConfig& cfg = model->config;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int64_t> lengths;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < f.prompt_tokens; ++i) ids.push_back(static_cast<int32_t>((1 + 7919 * (b + 1) + 104729 * i) % cfg.n_vocab));
    prompts.push_back(ids);
    lengths.push_back(f.prompt_tokens + f.n_predict);
  }
  auto be = make_backend(device, *model, lengths, mf);
  if (!be.ok()) {
    pt.error = be.status().message();
    return pt;
  }
  pt.device = std::string(be->executor->name());
  Runner runner(*model->weights, *be->executor, *be->kv);
  GenerateOptions go;
  go.n_predict = f.n_predict;
  go.sampling.temperature = 0;
  go.stop_at_eos = false;
  auto res = generate(runner, prompts, go);
  if (!res.ok()) {
    pt.error = res.status().message();
    return pt;
  }
  const int64_t n_dec = res->n_generated - batch;
  pt.decode_tps = res->decode_ms > 0 ? n_dec / (res->decode_ms / 1e3) : 0;
  pt.prefill_ms = res->prefill_ms;
  if (be->planned) {
    pt.plan = be->plan;
    pt.floor = plan_floor(cfg, be->plan, batch, be->hw);
    pt.predicted_tps = 1e3 * batch / be->plan.predicted_ms;
    pt.floor_tps = 1e3 * batch / pt.floor.step_ms;
  }
  if (be->gpu) {
    pt.ferry_peak = be->gpu->peak_device_bytes();
    pt.driver_delta = gpu::driver_used_bytes() - be->driver_before;
  }
  if (be->emulated) pt.ferry_peak = be->emulated->device().peak_bytes();
  if (traced) {
    const bool gpu_run = be->gpu != nullptr;
    be->executor.reset();  // resolves the last spans
    const Tracer::Overlap o = Tracer::get().overlap(gpu_run ? "gpu.copy" : "emulated.copy", std::vector<std::string>{"gpu.compute", "cpu.compute"});
    pt.overlap = o.hidden_fraction;
    pt.copy_ms = o.copy_ms;
    pt.compute_ms = o.compute_ms;
  }
  return pt;
}

// Where the traced run of a point writes its trace: --trace itself for a single point, else with
// ".GPU_MEM.bBATCH" before the extension.
std::string point_trace_path(const std::string& trace, const std::string& gpu_mem, int64_t batch, bool several) {
  if (trace.empty() || !several) return trace;
  const std::filesystem::path p(trace);
  const std::string tag = "." + (gpu_mem.empty() ? std::string("all") : gpu_mem) + ".b" + std::to_string(batch);
  return (p.parent_path() / (p.stem().string() + tag + p.extension().string())).string();
}

// The untraced run's speed, and (with streamed layers, unless --no-overlap; always with --trace) a
// traced run's overlap, its trace written to `trace_path`.
BenchPoint measure_point(const BenchFlags& f, const std::string& gpu_mem, int64_t batch, const std::string& trace_path = "") {
  BenchPoint p = bench_point(f, gpu_mem, batch, false);
  if (p.error.empty() && ((f.overlap && p.plan.n_streamed > 0) || !trace_path.empty())) {
    const BenchPoint t = bench_point(f, gpu_mem, batch, true);
    if (!trace_path.empty()) {
      if (Status st = Tracer::get().write(trace_path); !st.ok()) p.error = st.message();
      else std::fprintf(stderr, "ferry: trace with %zu spans written to %s\n", Tracer::get().size(), trace_path.c_str());
    }
    p.overlap = t.overlap;
    p.copy_ms = t.copy_ms;
    p.compute_ms = t.compute_ms;
  }
  return p;
}

nlohmann::json point_json(const BenchPoint& p) {
  nlohmann::json j = {{"gpu_mem", p.gpu_mem}, {"batch", p.batch}};
  if (!p.error.empty()) {
    j["error"] = p.error;
    return j;
  }
  j.update({{"device", p.device},
            {"decode_tok_s", p.decode_tps},
            {"prefill_ms", p.prefill_ms},
            {"predicted_tok_s", p.predicted_tps},
            {"floor_tok_s", p.floor_tps},
            {"of_floor", p.floor_tps > 0 ? p.decode_tps / p.floor_tps : 0},
            {"bound", p.floor.bound},
            {"resident", p.plan.n_resident},
            {"streamed", p.plan.n_streamed},
            {"from_disk", p.plan.n_disk},
            {"cpu", p.plan.n_cpu},
            {"placement", p.plan.placement()},
            {"embedding_on_host", p.plan.embedding_on_host},
            {"ferry_peak_bytes", p.ferry_peak},
            {"driver_delta_bytes", p.driver_delta}});
  if (p.overlap >= 0) j.update({{"overlap", p.overlap}, {"copy_ms", p.copy_ms}, {"compute_ms", p.compute_ms}});
  return j;
}

void print_point(const BenchPoint& p) {
  if (!p.error.empty()) {
    std::printf("--gpu-mem %-6s batch %-4lld  not run: %s\n", p.gpu_mem.c_str(), (long long)p.batch, p.error.c_str());
    return;
  }
  std::printf("--gpu-mem %-6s batch %-4lld  decode %8.2f tok/s | predicted %8.2f | floor %8.2f (%s) | %3.0f%% of floor | %lld resident, %lld streamed (%lld disk), %lld cpu%s | GPU peak %s (driver %s)",
              p.gpu_mem.empty() ? "-" : p.gpu_mem.c_str(), (long long)p.batch, p.decode_tps, p.predicted_tps, p.floor_tps, p.floor.bound,
              p.floor_tps > 0 ? 100 * p.decode_tps / p.floor_tps : 0.0, (long long)p.plan.n_resident, (long long)p.plan.n_streamed,
              (long long)p.plan.n_disk, (long long)p.plan.n_cpu, p.plan.embedding_on_host ? ", embedding in host memory" : "",
              format_bytes(static_cast<double>(p.ferry_peak)).c_str(),
              p.driver_delta >= 0 ? format_bytes(static_cast<double>(p.driver_delta)).c_str() : "-");
  if (p.overlap >= 0) std::printf(" | overlap %.1f%% (%.0f ms copies, %.0f ms compute)", 100 * p.overlap, p.copy_ms, p.compute_ms);
  std::printf("\n");
  std::fflush(stdout);
}

int cmd_bench(const BenchFlags& f) {
  const bool several = f.batches.size() > 1;
  if (Status st = check_outputs({{"--json", f.json}}); !st.ok()) return fail(st);
  for (int64_t batch : f.batches)
    if (Status st = check_outputs({{"--trace", point_trace_path(f.m.trace, f.m.gpu_mem, batch, several)}}); !st.ok()) return fail(st);
  auto threads = apply_threads(f.m.threads);
  nlohmann::json all = nlohmann::json::array();
  int rc = 0;
  for (int64_t batch : f.batches) {
    BenchPoint p = measure_point(f, f.m.gpu_mem, batch, point_trace_path(f.m.trace, f.m.gpu_mem, batch, several));
    print_point(p);
    if (!p.error.empty()) rc = kExitError;
    all.push_back(point_json(p));
  }
  if (!f.json.empty()) {
    const std::string text = all.dump(1) + "\n";
    if (Status st = write_file_atomic(f.json, text.data(), text.size()); !st.ok()) return fail(st.with_context("--json"));
  }
  return rc;
}

// tokens/s against --gpu-mem, one measured line and one dashed floor line per batch.
std::string sweep_svg(const std::string& title, const std::vector<BenchPoint>& pts, const std::vector<int64_t>& batches) {
  const double W = 760, H = 460, L = 70, R = 170, T = 40, B = 60;
  double xmax = 1, ymax = 1;
  auto gib = [](const std::string& s) {
    auto b = parse_size(s, "--gpu-mem");
    return b.ok() ? static_cast<double>(*b) / (1 << 30) : 0.0;
  };
  for (const auto& p : pts) {
    xmax = std::max(xmax, gib(p.gpu_mem));
    if (p.error.empty()) ymax = std::max({ymax, p.decode_tps, p.floor_tps});
  }
  ymax *= 1.1;
  auto X = [&](double v) { return L + (W - L - R) * v / xmax; };
  auto Y = [&](double v) { return H - B - (H - T - B) * v / ymax; };
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};
  std::string o = strprintf("<svg xmlns='http://www.w3.org/2000/svg' width='%.0f' height='%.0f' font-family='sans-serif' font-size='12'>\n", W, H);
  o += strprintf("<rect width='100%%' height='100%%' fill='white'/><text x='%.0f' y='22' font-size='14'>%s</text>\n", L, title.c_str());
  o += strprintf("<line x1='%.0f' y1='%.0f' x2='%.0f' y2='%.0f' stroke='black'/><line x1='%.0f' y1='%.0f' x2='%.0f' y2='%.0f' stroke='black'/>\n", L, H - B,
                 W - R, H - B, L, T, L, H - B);
  for (int i = 0; i <= 5; ++i) {
    const double yv = ymax * i / 5, xv = xmax * i / 5;
    o += strprintf("<text x='%.0f' y='%.0f' text-anchor='end'>%.1f</text><line x1='%.0f' y1='%.1f' x2='%.0f' y2='%.1f' stroke='#ddd'/>\n", L - 6, Y(yv) + 4, yv,
                   L, Y(yv), W - R, Y(yv));
    o += strprintf("<text x='%.1f' y='%.0f' text-anchor='middle'>%.0f</text>\n", X(xv), H - B + 18, xv);
  }
  o += strprintf("<text x='%.0f' y='%.0f' text-anchor='middle'>--gpu-mem (GiB)</text>\n", (L + W - R) / 2, H - 18);
  o += strprintf("<text x='18' y='%.0f' transform='rotate(-90 18 %.0f)' text-anchor='middle'>decode tokens/s</text>\n", (T + H - B) / 2, (T + H - B) / 2);
  for (size_t bi = 0; bi < batches.size(); ++bi) {
    const char* c = colors[bi % 6];
    std::string meas, flr;
    for (const auto& p : pts) {
      if (p.batch != batches[bi] || !p.error.empty()) continue;
      meas += strprintf("%.1f,%.1f ", X(gib(p.gpu_mem)), Y(p.decode_tps));
      flr += strprintf("%.1f,%.1f ", X(gib(p.gpu_mem)), Y(p.floor_tps));
      o += strprintf("<circle cx='%.1f' cy='%.1f' r='3.5' fill='%s'/>\n", X(gib(p.gpu_mem)), Y(p.decode_tps), c);
    }
    o += strprintf("<polyline points='%s' fill='none' stroke='%s' stroke-width='2'/>\n", meas.c_str(), c);
    o += strprintf("<polyline points='%s' fill='none' stroke='%s' stroke-width='1.5' stroke-dasharray='6 4'/>\n", flr.c_str(), c);
    const double ly = T + 20 + 36 * static_cast<double>(bi);
    o += strprintf("<line x1='%.0f' y1='%.0f' x2='%.0f' y2='%.0f' stroke='%s' stroke-width='2'/><text x='%.0f' y='%.0f'>batch %lld measured</text>\n", W - R + 10,
                   ly, W - R + 34, ly, c, W - R + 40, ly + 4, (long long)batches[bi]);
    o += strprintf("<line x1='%.0f' y1='%.0f' x2='%.0f' y2='%.0f' stroke='%s' stroke-dasharray='6 4'/><text x='%.0f' y='%.0f'>batch %lld floor</text>\n", W - R + 10,
                   ly + 16, W - R + 34, ly + 16, c, W - R + 40, ly + 20, (long long)batches[bi]);
  }
  return o + "</svg>\n";
}

int cmd_sweep(const BenchFlags& f) {
  for (const auto& mem : f.budgets) {
    if (Expected<int64_t> b = parse_gpu_mem(mem); !b.ok()) return fail(b.status());
    for (int64_t batch : f.batches)
      if (Status st = check_outputs({{"--trace", point_trace_path(f.m.trace, mem, batch, true)}}); !st.ok()) return fail(st);
  }
  for (const char* ext : {".csv", ".json", ".svg"})
    if (Status st = check_outputs({{"--out", f.out + ext}}); !st.ok()) return fail(st);
  auto threads = apply_threads(f.m.threads);
  std::vector<BenchPoint> pts;
  for (const auto& mem : f.budgets) {
    for (int64_t batch : f.batches) {
      BenchPoint p = measure_point(f, mem, batch, point_trace_path(f.m.trace, mem, batch, true));
      print_point(p);
      pts.push_back(p);
    }
  }
  nlohmann::json j = {{"model", f.m.model}, {"n_predict", f.n_predict}, {"prompt_tokens", f.prompt_tokens}, {"profile", load_profile().source}};
  j["points"] = nlohmann::json::array();
  std::string csv = "gpu_mem,batch,device,decode_tok_s,predicted_tok_s,floor_tok_s,of_floor,resident,streamed,from_disk,cpu,ferry_peak_bytes,driver_delta_bytes,overlap,error\n";
  for (const auto& p : pts) {
    j["points"].push_back(point_json(p));
    csv += strprintf("%s,%lld,%s,%.3f,%.3f,%.3f,%.3f,%lld,%lld,%lld,%lld,%lld,%lld,%.3f,\"%s\"\n", p.gpu_mem.c_str(), (long long)p.batch, p.device.c_str(),
                     p.decode_tps, p.predicted_tps, p.floor_tps, p.floor_tps > 0 ? p.decode_tps / p.floor_tps : 0.0, (long long)p.plan.n_resident,
                     (long long)p.plan.n_streamed, (long long)p.plan.n_disk, (long long)p.plan.n_cpu, (long long)p.ferry_peak, (long long)p.driver_delta,
                     p.overlap, p.error.c_str());
  }
  const std::string js = j.dump(1) + "\n", svg = sweep_svg("ferry sweep: " + f.m.model + " (decode, greedy)", pts, f.batches);
  for (auto [ext, text] : {std::pair<const char*, const std::string*>{".csv", &csv}, {".json", &js}, {".svg", &svg}}) {
    if (Status st = write_file_atomic(f.out + ext, text->data(), text->size()); !st.ok()) return fail(st.with_context("--out"));
  }
  std::fprintf(stderr, "ferry: wrote %s.csv, %s.json and %s.svg\n", f.out.c_str(), f.out.c_str(), f.out.c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------
struct CalibrateFlags {
  std::string dir = "/tmp";
  std::string disk;
  std::string out;
  int threads = 0;
};

// Best-of-n wall time of fn, in seconds.
template <typename F>
double best_seconds(int n, F&& fn) {
  double best = 1e30;
  for (int i = 0; i < n; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Reads every block of `m` once (io_uring, O_DIRECT, checksums verified): bytes per second.
Expected<double> disk_read_rate(const PackedManifest& m) {
  FERRY_ASSIGN_OR_RETURN(auto reader, DiskReader::open(m));
  uint64_t largest = 0, total = 0;
  for (const auto& b : m.blocks) largest = std::max(largest, b.padded_bytes);
  HostBuffer buf[2] = {HostBuffer(largest, kPackAlign), HostBuffer(largest, kPackAlign)};
  if (!buf[0].data() || !buf[1].data()) return out_of_memory("calibrate: cannot allocate the read buffers");
  const auto t0 = std::chrono::steady_clock::now();
  // Two reads in flight, as the staging ring keeps them.
  FERRY_RETURN_IF_ERROR(reader->submit(0, 0, buf[0].data()));
  for (size_t b = 0; b < m.blocks.size(); ++b) {
    if (b + 1 < m.blocks.size()) FERRY_RETURN_IF_ERROR(reader->submit(static_cast<int>((b + 1) % 2), static_cast<int64_t>(b + 1), buf[(b + 1) % 2].data()));
    FERRY_RETURN_IF_ERROR(reader->wait(static_cast<int>(b % 2)));
    total += m.blocks[b].padded_bytes;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(total) / s;
}

int cmd_calibrate(const CalibrateFlags& f) {
  if (f.out.empty()) {  // the default profile's folder is ferry's own: created
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(profile_path()).parent_path(), ec);
  }
  if (Status st = check_outputs({{"--out", f.out.empty() ? profile_path() : f.out}}); !st.ok()) return fail(st);
  auto threads = apply_threads(f.threads);
  HardwareProfile hw;
  std::string measured = "ferry calibrate " + std::string(cpu::simd_level());
  std::fprintf(stderr, "ferry: calibrating (about a minute)...\n");
  // GPU: copies and GEMMs.
  const gpu::GpuRates g = gpu::measure_gpu_rates();
  if (g.error.empty()) {
    hw.h2d_gbs = g.h2d_gbs;
    hw.hbm_gbs = g.hbm_gbs;
    hw.gemm_tflops = g.gemm_tflops;
    hw.gpu_gemv_gbs = g.gemv_gbs;
    hw.gpu_gemv_nf4_gbs = g.gemv_nf4_gbs;
    hw.gpu_gemv_nf4dq_gbs = g.gemv_nf4dq_gbs;
    hw.gpu_gemv_q8_gbs = g.gemv_q8_gbs;
    std::printf("gpu:        %s: H2D %.1f GB/s, D2H %.1f GB/s, device memory %.0f GB/s, BF16 GEMM %.0f TFLOP/s\n", gpu::probe().name.c_str(),
                g.h2d_gbs, g.d2h_gbs, g.hbm_gbs, g.gemm_tflops);
    std::printf("gpu gemv:   one row: BF16 %.0f GB/s, NF4 %.0f GB/s, NF4-DQ %.0f GB/s, int8 %.0f GB/s of weights (%.0f%% / %.0f%% / %.0f%% / %.0f%% of device memory; 0: failed)\n",
                g.gemv_gbs, g.gemv_nf4_gbs, g.gemv_nf4dq_gbs, g.gemv_q8_gbs, 100 * g.gemv_gbs / g.hbm_gbs, 100 * g.gemv_nf4_gbs / g.hbm_gbs,
                100 * g.gemv_nf4dq_gbs / g.hbm_gbs, 100 * g.gemv_q8_gbs / g.hbm_gbs);
    // A decode layer's time beyond its weight bytes at the GEMV rate (its norms and attention, the
    // launches, the GEMVs' ramp and tail): resident synthetic Llama-2-7B steps at 6 layers less those
    // at 2, per layer, less a layer's bytes at the one-row rate measured above; batch 1, 128 steps.
    {
      std::string line;
      for (WeightFormat f : kWeightFormats) {
        const WeightFormatInfo fi = weight_format_info(f);
        BenchFlags bf;
        bf.m.model = std::string(kSyntheticPrefix) + "llama-2-7b";
        bf.m.device = "gpu";
        bf.m.quant = std::string(fi.name);
        bf.n_predict = 128;
        bf.overlap = false;
        double step_ms[2] = {0, 0};
        int64_t layer_bytes = 0;
        std::string err;
        for (int j = 0; j < 2 && err.empty(); ++j) {
          bf.m.layers = j == 0 ? 2 : 6;
          const BenchPoint pt = bench_point(bf, "", 1, false);
          if (!pt.error.empty() || pt.decode_tps <= 0) err = pt.error.empty() ? "no decode time" : pt.error;
          step_ms[j] = pt.decode_tps > 0 ? 1e3 / pt.decode_tps : 0;
          layer_bytes = pt.plan.layer_bytes;
        }
        const std::string name(dtype_name(fi.dtype));
        if (err.empty() && layer_bytes > 0) {
          const double layer_ms = (step_ms[1] - step_ms[0]) / 4;
          double& fixed = gpu_layer_fixed_us(hw, fi.dtype);
          fixed = std::max(0.0, 1e3 * (layer_ms - static_cast<double>(layer_bytes) / (gpu_layer_rate(hw, fi.dtype, 1) * 1e9) * 1e3));
          line += strprintf("%s%s %.0f us (of %.0f)", line.empty() ? "" : ", ", name.c_str(), fixed, 1e3 * layer_ms);
        } else {
          line += strprintf("%s%s not measured (%s)", line.empty() ? "" : ", ", name.c_str(), err.c_str());
        }
      }
      std::printf("gpu layer:  a Llama-2-7B decode layer beyond its weight bytes at the GEMV rate (batch 1): %s\n", line.c_str());
    }
  } else {
    std::printf("gpu:        not measured (%s): the built-in H100 values are kept\n", g.error.c_str());
    measured += ", GPU rates built-in";
  }
  // Host DRAM: a parallel read of 2 GiB. Integer sums, which the compiler vectorises: a float sum's
  // add chains held this read to 74-76 GB/s on the H100 host, under what the K/V kernel reads there.
  // Prefetched 4 KiB ahead, as the CPU layers' kernels read: without it the H200 host's CPU layers
  // read BF16 weights at 117-126% of this rate, and the floors built on it were under measured runs.
  {
    const size_t n = (size_t{2} << 30) / sizeof(uint64_t);
    HostBuffer buf(n * sizeof(uint64_t));
    if (!buf.data()) return fail(out_of_memory("calibrate: cannot allocate 2 GiB of host memory"));
    uint64_t* p = buf.as<uint64_t>();
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, 1 << 19), [&](const auto& r) {
      for (size_t i = r.begin(); i < r.end(); ++i) p[i] = i;
    });
    volatile uint64_t sink = 0;
    auto read_all = [&] {
      sink = tbb::parallel_reduce(tbb::blocked_range<size_t>(0, n, 1 << 19), uint64_t{0}, [&](const auto& r, uint64_t acc) {
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        size_t i = r.begin();
        for (; i + 4 <= r.end(); i += 4) {
          if (i % 8 == 0) __builtin_prefetch(p + i + 512);
          a0 += p[i];
          a1 += p[i + 1];
          a2 += p[i + 2];
          a3 += p[i + 3];
        }
        for (; i < r.end(); ++i) a0 += p[i];
        return acc + a0 + a1 + a2 + a3;
      }, std::plus<uint64_t>());
    };
    const double s = best_seconds(4, read_all);
    hw.host_dram_gbs = static_cast<double>(n * sizeof(uint64_t)) / s / 1e9;
    std::printf("host DRAM:  read %.1f GB/s (2 GiB, all threads)\n", hw.host_dram_gbs);
    // The same reads while the copy engine pulls pinned memory to the GPU: what the CPU's K/V reads
    // and the weights' DMA get together (the split planner's shared term).
    constexpr int kPasses = 8;
    const gpu::SharedCopyRate sh = gpu::h2d_during([&] {
      for (int i = 0; i < kPasses; ++i) read_all();
    });
    if (sh.error.empty()) {
      const double cpu_gbs = kPasses * static_cast<double>(n * sizeof(uint64_t)) / sh.host_seconds / 1e9;
      hw.dram_shared_gbs = cpu_gbs + sh.h2d_gbs;
      hw.h2d_shared_gbs = sh.h2d_gbs;
      std::printf("shared:     %.1f GB/s (CPU read %.1f GB/s while H2D copies ran at %.1f GB/s)\n", hw.dram_shared_gbs, cpu_gbs, sh.h2d_gbs);
    } else {
      hw.dram_shared_gbs = hw.host_dram_gbs;  // no copy engine to share it with
      hw.h2d_shared_gbs = hw.h2d_gbs;
      std::printf("shared:     not measured (%s): the CPU's read rate is used\n", sh.error.c_str());
    }
  }
  // ferry's CPU layer GEMMs on BF16 weights larger than the caches: batch 1 (bytes/s) and 64 (FLOP/s).
  {
    // Each format's set of matrices is 2 GiB, copies of one (addresses, not contents, decide what a
    // cache holds): with 360 MB of BF16 and 100 MB of NF4 the H200 host's Xeon read them at 117-126%
    // of its DRAM rate, and beside the copy engine faster than alone.
    const int64_t N = 11008, K = 4096;
    constexpr int64_t kSetBytes = int64_t{2} << 30;
    HostBuffer src(static_cast<size_t>(N * K * 2));
    if (!src.data()) return fail(out_of_memory("calibrate: cannot allocate the GEMM weights"));
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, N * K, 1 << 20), [&](const auto& r) {
      synthetic_fill_bf16("calibrate", K, false, r.begin(), r.end() - r.begin(), src.as<uint16_t>() + r.begin());
    });
    auto make_set = [&](const HostBuffer& one, std::vector<HostBuffer>& set) -> Status {
      const int64_t n = (kSetBytes + static_cast<int64_t>(one.size()) - 1) / static_cast<int64_t>(one.size());
      set.clear();
      for (int64_t i = 0; i < n; ++i) {
        set.emplace_back(one.size());
        if (!set.back().data()) return out_of_memory("calibrate: cannot allocate 2 GiB of GEMM weights");
        std::memcpy(set.back().data(), one.data(), one.size());
      }
      return Status::Ok();
    };
    std::vector<HostBuffer> mats;
    if (Status st = make_set(src, mats); !st.ok()) return fail(st);
    const double set_bytes = static_cast<double>(mats.size()) * static_cast<double>(src.size());
    std::vector<float> x(64 * K, 0.01f), y(64 * N);
    auto run = [&](int64_t M) {  // the precision CPU-computed layers run at
      for (auto& m : mats) cpu::gemm_xwt(x.data(), M, TensorView::contiguous(m.data(), DType::kBF16, {N, K}), y.data(), {}, cpu::GemmPrecision::kBf16Inputs);
    };
    const double s1 = best_seconds(4, [&] { run(1); });
    hw.cpu_layer_gbs = set_bytes / s1 / 1e9;
    const double s64 = best_seconds(3, [&] { run(64); });
    hw.cpu_tflops = 2.0 * 64 * static_cast<double>(mats.size()) * static_cast<double>(N * K) / s64 / 1e12;
    std::printf("cpu layer:  batch 1 %.1f GB/s of BF16 weights (%.0f%% of the DRAM read rate), batch 64 %.2f TFLOP/s\n", hw.cpu_layer_gbs,
                100 * hw.cpu_layer_gbs / hw.host_dram_gbs, hw.cpu_tflops);
    // The batch-1 layer beside the copy engine, as a hybrid step runs them: the rate each keeps. The
    // planner balances streamed against CPU layers on these two. Beside the plain read above the
    // copies keep less than beside the layers, and priced at that rate the planner put too many
    // layers on the CPU (notes/quant.md: Llama-3-70B NF4 at 24G).
    {
      const int passes = static_cast<int>(std::clamp(0.5 / std::max(s1, 1e-4), 2.0, 64.0));
      const gpu::SharedCopyRate lc = gpu::h2d_during([&] {
        for (int i = 0; i < passes; ++i) run(1);
      });
      if (lc.error.empty()) {
        const double cpu_beside = passes * set_bytes / lc.host_seconds / 1e9;
        std::printf("cpu layer:  beside H2D copies %.1f GB/s of BF16 weights, the copies %.1f GB/s", cpu_beside, lc.h2d_gbs);
        if (cpu_beside <= 1.05 * hw.cpu_layer_gbs) {
          hw.cpu_layer_shared_gbs = cpu_beside;
          hw.h2d_shared_gbs = lc.h2d_gbs;
          // The floor's shared DRAM rate: the larger of the two pairs' sums (a floor under a
          // measured pair would not be one).
          hw.dram_shared_gbs = std::max(hw.dram_shared_gbs, cpu_beside + lc.h2d_gbs);
          std::printf("\n");
        } else {
          std::printf(" (faster than alone: not a DRAM rate, not used)\n");
        }
      }
    }
    // The same matrices quantised (--quant): bytes of the format per second at batch 1.
    double* rates[] = {&hw.cpu_layer_nf4_gbs, &hw.cpu_layer_nf4dq_gbs, &hw.cpu_layer_q8_gbs};
    double* shared[] = {&hw.cpu_layer_nf4_shared_gbs, &hw.cpu_layer_nf4dq_shared_gbs, &hw.cpu_layer_q8_shared_gbs};
    int fi = 0;
    for (DType t : {DType::kNF4, DType::kNF4DQ, DType::kQ8}) {
      HostBuffer one(static_cast<size_t>(quant_layout(t, N, K).bytes));
      if (!one.data()) return fail(out_of_memory("calibrate: cannot allocate the quantised GEMM weights"));
      quantize_bf16_weight(t, src.as<uint16_t>(), N, K, one.as<uint8_t>());
      if (Status st = make_set(one, mats); !st.ok()) return fail(st);
      auto run_q = [&] {  // at the precision the CPU layers' o, gate+up and down run at (their QKV: exact)
        for (auto& m : mats) cpu::gemm_xwt(x.data(), 1, TensorView::contiguous(m.data(), t, {N, K}), y.data(), {}, cpu::GemmPrecision::kBf16Inputs);
      };
      const double sq = best_seconds(4, run_q);
      const double q_bytes = static_cast<double>(mats.size()) * static_cast<double>(one.size());
      *rates[fi] = q_bytes / sq / 1e9;
      // And beside the copy engine: a decoding kernel keeps its own share of that rate.
      const int passes = static_cast<int>(std::clamp(0.5 / std::max(sq, 1e-4), 2.0, 64.0));
      const gpu::SharedCopyRate qc = gpu::h2d_during([&] {
        for (int i = 0; i < passes; ++i) run_q();
      });
      if (qc.error.empty()) {
        const double beside = passes * q_bytes / qc.host_seconds / 1e9;
        if (beside <= 1.05 * *rates[fi]) *shared[fi] = beside;
      }
      ++fi;
    }
    mats.clear();
    std::printf("cpu layer:  batch 1 NF4 %.1f GB/s, NF4-DQ %.1f GB/s, int8 %.1f GB/s of quantised weights", hw.cpu_layer_nf4_gbs, hw.cpu_layer_nf4dq_gbs,
                hw.cpu_layer_q8_gbs);
    if (hw.cpu_layer_nf4_shared_gbs > 0 || hw.cpu_layer_nf4dq_shared_gbs > 0 || hw.cpu_layer_q8_shared_gbs > 0)
      std::printf("; beside H2D copies %.1f, %.1f, %.1f GB/s (0: not measured)", hw.cpu_layer_nf4_shared_gbs, hw.cpu_layer_nf4dq_shared_gbs,
                  hw.cpu_layer_q8_shared_gbs);
    std::printf("\n");
  }
  // Disk: the given store, or a 1 GiB scratch store in --dir.
  {
    Expected<double> rate = 0.0;
    std::string what;
    if (!f.disk.empty()) {
      auto m = open_store_unchecked(f.disk);
      if (!m.ok()) return fail(m.status());
      rate = disk_read_rate(*m);
      what = f.disk;
    } else {
      auto m = write_scratch_store(f.dir, int64_t{1} << 30);
      if (!m.ok()) return fail(m.status());
      rate = disk_read_rate(*m);
      std::error_code ec;
      std::filesystem::remove_all(m->dir, ec);
      what = "1 GiB scratch file in " + f.dir;
    }
    if (!rate.ok()) return fail(rate.status());
    hw.disk_gbs = *rate / 1e9;
    std::printf("disk:       %.2f GB/s (%s, O_DIRECT io_uring, checksums verified)\n", hw.disk_gbs, what.c_str());
  }
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::localtime(&now));
  hw.source = measured + ", " + date;
  const std::string out = f.out.empty() ? profile_path() : f.out;
  if (Status st = save_profile(hw, out); !st.ok()) return fail(st.with_context("--out"));
  std::printf("profile:    written to %s (ferry plan / run read it; FERRY_PROFILE overrides the path)\n", out.c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------
struct PackFlags {
  std::string model;
  std::string out;
  std::string dtype = "stored";
  std::string quant = "bf16";
  int64_t layers = 0;
};

int cmd_pack(const PackFlags& f) {
  WeightFormat q = WeightFormat::kBF16;
  weight_format_from_name(f.quant, &q);  // checked by CLI11
  auto model = load_model(f.model, LoadOptions{.synthetic_layers = f.layers, .need_tokenizer = false, .quant = weight_format_info(q).dtype});
  if (!model.ok()) return fail(model.status());
  const auto t0 = std::chrono::steady_clock::now();
  PackOptions po;
  po.bf16 = f.dtype == "bf16";
  if (Status st = pack_store(*model->weights, f.out, po); !st.ok()) return fail(st);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto m = open_store(f.out, model->config);
  if (!m.ok()) return fail(m.status());
  std::fprintf(stderr, "ferry: packed %lld layers + globals (%s) into %s in %.2f s\n", static_cast<long long>(model->config.n_layers),
               format_bytes(static_cast<double>(m->file_bytes)).c_str(), f.out.c_str(), s);
  return 0;
}

// ---------------------------------------------------------------------------------------------
struct TokenizeFlags {
  std::string model;
  std::string text;
  std::string decode;
  bool specials = false;
};

int cmd_tokenize(const TokenizeFlags& f) {
  namespace fs = std::filesystem;
  std::unique_ptr<Tokenizer> tok;
  if (f.model.rfind(kSyntheticPrefix, 0) == 0) {
    LoadOptions lo;
    lo.synthetic_layers = 1;
    auto m = load_model(f.model, lo);
    if (!m.ok()) return fail(m.status());
    tok = std::move(m->tokenizer);
  } else {
    std::error_code ec;
    const std::string path = fs::is_directory(f.model, ec) ? (fs::path(f.model) / "tokenizer.json").string() : f.model;
    auto t = Tokenizer::from_file(path);
    if (!t.ok()) return fail(t.status());
    tok = std::move(*t);
  }
  if (!f.decode.empty()) {
    auto ids = parse_ids(f.decode, "--decode");
    if (!ids.ok()) return fail(ids.status());
    for (int32_t id : *ids)
      if (id >= tok->n_vocab()) return fail(invalid_argument(strprintf("--decode: id %d is outside the vocabulary (%lld ids)", id, static_cast<long long>(tok->n_vocab()))));
    std::printf("%s\n", tok->decode(*ids, !f.specials).c_str());
    return 0;
  }
  std::vector<int32_t> ids = tok->encode(f.text, f.specials);
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
  std::printf("%s]\n", out.c_str());
  return 0;
}

// Options several subcommands share.
void add_lora_option(CLI::App* app, std::string& dir) {
  app->add_option("--lora", dir, "A peft LoRA adapter directory (e.g. from 'ferry finetune') applied unmerged in float32; the CPU backend only in this version");
}
void add_chat_template_option(CLI::App* app, std::string& name) {
  app->add_option("--chat-template", name, "Chat format instead of the model's own template: " + chat_format_names())
      ->check(CLI::IsMember({"chatml", "qwen2", "llama3", "llama2", "mistral", "zephyr"}));
}

}  // namespace

int main(int argc, char** argv) {
  take_stop_signals();
  CLI::App app{"ferry: run language models larger than the GPU (inference on CPU today; GPU and offload next)"};
  app.require_subcommand(1);
  app.footer("Run 'ferry SUBCOMMAND --help' for a subcommand's flags and examples.");

  RunFlags rf;
  CLI::App* run = app.add_subcommand("run", "Generate text from a prompt, streamed as it is produced");
  rf.m.add(run);
  add_lora_option(run, rf.m.lora);
  run->add_option("-p,--prompt", rf.prompts, "Prompt text (repeat for a batch of prompts)");
  run->add_option("-n,--n-predict", rf.n_predict, "Tokens to generate per prompt")->check(CLI::Range(int64_t{0}, int64_t{1} << 24));
  run->add_option("--temp", rf.temp, "Sampling temperature; 0 = greedy");
  run->add_option("--top-k", rf.top_k, "Keep the K most likely tokens (0 = all)");
  run->add_option("--top-p", rf.top_p, "Nucleus: keep the smallest set with probability >= P");
  run->add_option("--seed", rf.seed, "Random seed (same seed, same text)");
  run->add_flag("--ignore-eos", rf.ignore_eos, "Keep generating past the end-of-sequence token");
  run->add_flag("--no-bos", rf.no_bos, "Do not add the tokenizer's BOS template to the prompt");
  run->add_option("--prompts", rf.prompts_file,
                  "Throughput mode: a JSONL file of requests, one object per line: {\"prompt\": TEXT} or {\"ids\": [...]}, optional \"max_tokens\" and \"id\"");
  run->add_option("--out", rf.out_file, "Throughput mode: JSONL completions, in input order, written atomically at the end");
  run->add_option("--batch", rf.batch, "Throughput mode: most sequences in flight (new ones admitted as others finish)")->check(CLI::Range(int64_t{1}, int64_t{65536}));
  run->add_option("--step-tokens", rf.step_tokens, "Throughput mode: tokens per step (decode tokens plus prompt chunks)")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  run->add_flag("--no-progress", rf.no_progress, "Throughput mode: no progress bar");
  run->add_flag("--prefix-cache", rf.prefix_cache,
                "Throughput mode: requests whose prompts start with the same tokens (a system prompt) share their K/V blocks instead of prefilling them again (not with --kv-disk)");
  run->footer(
      "Examples:\n"
      "  ferry run -m synthetic:stories15m -p \"Once upon a time\" -n 32\n"
      "  ferry run -m ~/models/Llama-2-7b-hf -p \"The capital of France is\" --temp 0\n"
      "  ferry run -m DIR -p \"first prompt\" -p \"second prompt\" -n 64 --seed 7\n"
      "  ferry run -m DIR --prompts requests.jsonl --out completions.jsonl --batch 128 --gpu-mem 8G --kv host");

  ServeFlags svf;
  CLI::App* serve_cmd = app.add_subcommand("serve", "Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, streaming)");
  svf.m.add(serve_cmd);
  add_lora_option(serve_cmd, svf.m.lora);
  serve_cmd->add_option("--host", svf.host, "Address to listen on (0.0.0.0: every interface)");
  serve_cmd->add_option("--port", svf.port, "TCP port")->check(CLI::Range(1, 65535));
  serve_cmd->add_option("--name", svf.name, "The model id the API reports (default: the model directory's name)");
  add_chat_template_option(serve_cmd, svf.chat_template);
  serve_cmd->add_option("--ctx", svf.ctx, "Prompt + completion tokens a request may have (default: max_position_embeddings, at most 4096); K/V are sized for --batch of them")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 24));
  serve_cmd->add_option("--batch", svf.batch, "Most requests decoded together (more wait in a queue)")->check(CLI::Range(int64_t{1}, int64_t{4096}));
  serve_cmd->add_option("--step-tokens", svf.step_tokens, "Tokens per step: decode tokens plus chunks of new prompts")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  serve_cmd->add_flag("--no-prefix-cache", svf.no_prefix_cache,
                      "Prefill every prompt whole (by default full K/V blocks stay cached and a prompt that starts with the same tokens reuses them; off with --kv-disk)");
  serve_cmd->add_option("--api-key", svf.api_key, "Require \"Authorization: Bearer KEY\" on /v1/* and /metrics (default: $FERRY_API_KEY; none: open)");
  serve_cmd->add_option("--max-tokens", svf.max_tokens, "Chat's max_tokens when a request gives none (default: the rest of --ctx)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  serve_cmd->footer(
      "Examples:\n"
      "  ferry serve -m ~/models/Qwen2-7B-Instruct --gpu-mem 8G --port 8080\n"
      "  curl http://127.0.0.1:8080/v1/chat/completions -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'\n"
      "  ferry serve -m ../shared/models/stories260K --ctx 256 &\n"
      "  curl http://127.0.0.1:8080/v1/completions -d '{\"prompt\": \"Once upon a time\", \"max_tokens\": 32, \"temperature\": 0}'");

  ChatFlags chf;
  CLI::App* chat = app.add_subcommand("chat", "Talk to an instruct model on the terminal, through its chat template (a line of input is a turn)");
  chf.m.add(chat);
  add_lora_option(chat, chf.m.lora);
  add_chat_template_option(chat, chf.chat_template);
  chat->add_option("--system", chf.system, "A system message to start the conversation with");
  chat->add_option("-n,--n-predict", chf.n_predict, "Most tokens a reply may have")->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  chat->add_option("--ctx", chf.ctx, "Context the conversation must fit (default: max_position_embeddings, at most 4096); older exchanges are dropped beyond it")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 24));
  chat->add_option("--temp", chf.temp, "Sampling temperature; 0 = greedy");
  chat->add_option("--top-k", chf.top_k, "Keep the K most likely tokens (0 = all)");
  chat->add_option("--top-p", chf.top_p, "Nucleus: keep the smallest set with probability >= P");
  chat->add_option("--seed", chf.seed, "Random seed");
  chat->footer("Examples:\n  ferry chat -m ~/models/Qwen2-7B-Instruct --gpu-mem 8G\n  ferry chat -m DIR --system \"You are terse.\" --temp 0");

  LogitsFlags lf;
  CLI::App* logits = app.add_subcommand("logits", "Write the F32 logits [L, vocab] of a token sequence to a safetensors file");
  lf.m.add(logits);
  add_lora_option(logits, lf.m.lora);
  logits->add_option("--ids", lf.ids, "Comma-separated token ids, e.g. 1,15043,3186")->required();
  logits->add_option("--out", lf.out, "Output .safetensors file (tensor 'logits'), written atomically")->required();
  logits->footer("Example:\n  ferry logits -m ../shared/golden/llama-gqa --ids 1,2,3 --out /tmp/logits.safetensors");

  ModelFlags inf;
  CLI::App* inspect = app.add_subcommand("inspect", "Print a model's architecture, parameter count and bytes per layer and component");
  inf.add(inspect);
  inspect->footer("Examples:\n  ferry inspect -m ~/models/Llama-2-7b-hf\n  ferry inspect -m synthetic:llama-3-70b");

  PlanFlags plf;
  CLI::App* plan = app.add_subcommand("plan", "Print where every layer would live under --gpu-mem, the bytes per tier and the decode-step floor");
  plf.m.add(plan);
  plan->add_option("--batch", plf.batch, "Sequences decoded together")->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
  plan->add_option("--context", plf.context, "Context length the KV cache is sized for")->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  plan->footer("Examples:\n  ferry plan -m synthetic:llama-2-7b --gpu-mem 8G --batch 1\n"
               "  ferry plan -m synthetic:llama-2-13b --gpu-mem 8G --host-mem 0 --disk STORE");

  BenchFlags bf;
  CLI::App* bench = app.add_subcommand("bench", "Measure decode throughput under the budgets, against the plan's prediction and floor; overlap from a traced run");
  bf.m.add(bench);
  bench->add_option("--batch", bf.batches, "Batch sizes (repeat or comma-separate)")->delimiter(',')->check(CLI::Range(int64_t{1}, int64_t{4096}));
  bench->add_option("-n,--n-predict", bf.n_predict, "Decode steps")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  bench->add_option("--prompt-tokens", bf.prompt_tokens, "Prompt length per sequence")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  bench->add_option("--json", bf.json, "Also write the results as JSON");
  bench->add_flag("!--no-overlap", bf.overlap, "Skip the traced run that measures overlap");
  bench->footer("Example:\n  ferry bench -m synthetic:llama-2-7b --gpu-mem 8G --batch 1,8 -n 32");

  BenchFlags sf;
  CLI::App* sweep = app.add_subcommand("sweep", "Benchmark a list of --gpu-mem budgets and batches; write CSV, JSON and an SVG plot with the floor");
  sf.m.add(sweep);
  sweep->remove_option(sweep->get_option("--gpu-mem"));
  sweep->add_option("--gpu-mem", sf.budgets, "Budgets, comma-separated (e.g. 4G,8G,16G)")->delimiter(',')->required();
  sweep->add_option("--batch", sf.batches, "Batch sizes, comma-separated")->delimiter(',')->check(CLI::Range(int64_t{1}, int64_t{4096}));
  sweep->add_option("-n,--n-predict", sf.n_predict, "Decode steps per point")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  sweep->add_option("--prompt-tokens", sf.prompt_tokens, "Prompt length per sequence")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  sweep->add_option("--out", sf.out, "Output prefix: PREFIX.csv, PREFIX.json, PREFIX.svg")->required();
  sweep->add_flag("!--no-overlap", sf.overlap, "Skip the traced runs that measure overlap");
  sweep->footer("Example:\n  ferry sweep -m synthetic:llama-2-7b --gpu-mem 4G,8G,12G,16G,24G,32G --batch 1,8 --out sweep-7b");

  CalibrateFlags cf;
  CLI::App* calibrate = app.add_subcommand("calibrate", "Measure this machine's copy, memory, GEMM and disk rates once; the planner uses them");
  calibrate->add_option("--dir", cf.dir, "Directory for the 1 GiB scratch file of the disk test (on the drive --disk stores will live on)");
  calibrate->add_option("--disk", cf.disk, "Measure reads of this packed store instead of a scratch file");
  calibrate->add_option("--out", cf.out, "Profile file (default: $XDG_CACHE_HOME/ferry/profile.json or ~/.cache/ferry/profile.json)");
  calibrate->add_option("--threads", cf.threads, "CPU threads (default: all cores)")->check(CLI::Range(1, 4096));
  calibrate->footer("Example:\n  ferry calibrate --dir /nvme/ferry\n  ferry plan -m synthetic:llama-2-7b --gpu-mem 8G");

  PackFlags pf;
  CLI::App* pack = app.add_subcommand("pack", "Write a model's weights as a packed store for the disk tier (checksummed, 4 KiB aligned)");
  pack->add_option("-m,--model", pf.model, "Hugging Face model directory, or synthetic:PRESET")->required();
  pack->add_option("--out", pf.out, "Store directory to create (written to a temporary name, renamed when complete)")->required();
  pack->add_option("--dtype", pf.dtype, "stored: keep each tensor's dtype; bf16: convert (what --device gpu streams)")->check(CLI::IsMember({"stored", "bf16"}));
  pack->add_option("--layers", pf.layers, "Synthetic models only: keep the preset's shapes but use N layers")->check(CLI::Range(1, 4096));
  pack->add_option("--quant", pf.quant, "Store the layers' Linear weights quantised: nf4, nf4-dq or int8 (as run's --quant; the disk tier then reads 4-bit blocks)")
      ->check(CLI::IsMember({"bf16", "nf4", "nf4-dq", "int8"}));
  pack->footer("Example:\n  ferry pack -m ~/models/Llama-2-13b-hf --out /nvme/ferry/llama-2-13b\n"
               "  ferry pack -m ~/models/Llama-3-70B --quant nf4 --out /nvme/ferry/llama-3-70b-nf4\n"
               "  ferry run -m ~/models/Llama-2-13b-hf --disk /nvme/ferry/llama-2-13b -p \"Hello\"");

  FinetuneFlags ftf;
  CLI::App* finetune = app.add_subcommand("finetune", "Train LoRA adapters over a frozen (NF4 by default) base model; write peft's adapter files");
  ftf.m.quant = "nf4";
  ftf.m.add(finetune);
  // Placement and K/V flags are the inference engine's: training runs on the CPU from host memory or --disk.
  for (const char* o : {"--gpu-mem", "--host-mem", "--cpu-layers", "--quant-head", "--trace", "--kv", "--kv-host-layers", "--kv-mem", "--kv-disk"})
    finetune->remove_option(finetune->get_option(o));
  finetune->get_option("--disk")->description("Packed store (from 'ferry pack') holding the frozen base: its layers are read from it, two in memory at a time");
  finetune->get_option("--quant")->description(
      "Format of the frozen base's Linear weights: nf4 (QLoRA; the default, except for a bitsandbytes checkpoint, which trains as stored), "
      "nf4-dq, int8 or bf16");
  finetune->add_option("--data", ftf.data,
                       "JSONL training data, one example a line: {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} (loss on the completion) "
                       "or {\"ids\": [...], \"labels\": [...]}")
      ->required();
  finetune->add_option("--out", ftf.out, "Adapter directory: adapter_model.safetensors + adapter_config.json, each written atomically")->required();
  finetune->add_option("--rank,-r", ftf.rank, "LoRA rank")->check(CLI::Range(int64_t{1}, int64_t{4096}));
  finetune->add_option("--alpha", ftf.alpha, "LoRA alpha (the update is scaled by alpha / rank)")->check(CLI::PositiveNumber);
  finetune->add_option("--targets", ftf.targets, "Linears to adapt: comma-separated q,k,v,o,gate,up,down (or peft's q_proj, ...), or all");
  finetune->add_option("--resume", ftf.resume, "Continue a run from its --out directory: adapter, optimizer state and data position (--steps: the total)");
  finetune->add_option("--eval-data", ftf.eval_data, "JSONL held-out examples: their loss at the end (and every --eval-every steps)");
  finetune->add_option("--eval-every", ftf.eval_every, "Also evaluate every N steps")->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  finetune->add_option("--grad-accum", ftf.grad_accum, "Micro-batches of --batch rows a step (the gradient of their token-weighted mean)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  finetune->add_option("--max-grad-norm", ftf.max_grad_norm, "Clip the gradient's global L2 norm to this (0: no clipping; 1.0 as Hugging Face's Trainer)")
      ->check(CLI::NonNegativeNumber);
  finetune->add_option("--init-adapter", ftf.init_adapter, "Start from this peft adapter directory (its rank, alpha and targets) instead of peft's initialisation");
  finetune->add_option("--lr", ftf.lr, "AdamW learning rate")->check(CLI::PositiveNumber);
  finetune->add_option("--weight-decay", ftf.weight_decay, "AdamW decoupled weight decay")->check(CLI::NonNegativeNumber);
  finetune->add_option("--schedule", ftf.schedule, "Learning rate after the warm-up: constant or cosine (to 0 at the last step)")
      ->check(CLI::IsMember({"constant", "cosine"}));
  finetune->add_option("--warmup", ftf.warmup, "Linear warm-up steps")->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  finetune->add_option("--steps", ftf.steps, "Optimizer steps (default: --epochs over the data)")->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  finetune->add_option("--epochs", ftf.epochs, "Passes over the data when --steps is not given")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  finetune->add_option("--batch", ftf.batch, "Examples a micro-batch")->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
  finetune->add_option("--seq-len", ftf.seq_len, "Tokens an example is cut to")->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  finetune->add_option("--save-every", ftf.save_every, "Also write the adapter and the optimizer state every N steps")->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  finetune->add_option("--seed", ftf.seed, "Seed of the adapters' initialisation");
  finetune->add_option("--log", ftf.log, "Write each step's loss, learning rate and time as a JSON array (atomically, with each save)");
  finetune->footer(
      "Trains on the CPU in this version (float32, gradient checkpointing: one layer's activations at a time); the GPU pass comes next.\n"
      "Examples:\n"
      "  ferry finetune -m ~/models/Llama-2-7b-hf --data train.jsonl --out adapters/run1 --steps 200 --lr 2e-4 --warmup 10\n"
      "  ferry finetune -m ../shared/golden/llama-gqa --data data.jsonl --out /tmp/adapter --quant bf16 -r 8 --alpha 16 --targets q,v");

  TokenizeFlags tf;
  CLI::App* tokenize = app.add_subcommand("tokenize", "Encode text to token ids (a JSON array), or decode ids to text");
  tokenize->add_option("-m,--model", tf.model, "Model directory, tokenizer.json file, or synthetic:PRESET")->required();
  tokenize->add_option("text", tf.text, "Text to encode");
  tokenize->add_flag("--specials", tf.specials, "Encode: add the BOS template; decode: keep special tokens");
  tokenize->add_option("--decode", tf.decode, "Decode these comma-separated ids instead");
  tokenize->footer("Examples:\n  ferry tokenize -m ../shared/tokenizers/llama3 --specials \"Hello world\"\n  ferry tokenize -m DIR --decode 15043,3186");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "ferry: error: %s\n", e.what());
    std::fprintf(stderr, "Run with --help for usage.\n");
    return kExitUsage;
  }
  int rc = kExitUsage;
  try {
    if (run->parsed()) rc = cmd_run(rf);
    else if (logits->parsed()) rc = cmd_logits(lf);
    else if (serve_cmd->parsed()) rc = cmd_serve(svf);
    else if (chat->parsed()) rc = cmd_chat(chf);
    else if (inspect->parsed()) rc = cmd_inspect(inf);
    else if (tokenize->parsed()) rc = cmd_tokenize(tf);
    else if (pack->parsed()) rc = cmd_pack(pf);
    else if (plan->parsed()) rc = cmd_plan(plf);
    else if (calibrate->parsed()) rc = cmd_calibrate(cf);
    else if (bench->parsed()) rc = cmd_bench(bf);
    else if (sweep->parsed()) rc = cmd_sweep(sf);
    else if (finetune->parsed()) {
      ftf.quant_given = finetune->get_option("--quant")->count() > 0;
      rc = cmd_finetune(ftf);
    }
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "ferry: error: out of host memory\n");
    rc = kExitError;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry: error: %s\n", e.what());
    rc = kExitError;
  }
  // What went to standard output must have arrived (a full disk, a closed pipe): else exit 1.
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    std::fprintf(stderr, "ferry: error: writing to standard output failed: %s\n", std::strerror(errno != 0 ? errno : EIO));
    return rc == 0 ? kExitError : rc;
  }
  return rc;
}
