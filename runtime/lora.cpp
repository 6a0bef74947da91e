#include "runtime/lora.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "models/safetensors.h"

namespace ferry {

const char* lora_module_name(LayerTensor t) {
  switch (t) {
    case kWq: return "q_proj";
    case kWk: return "k_proj";
    case kWv: return "v_proj";
    case kWo: return "o_proj";
    case kWGate: return "gate_proj";
    case kWUp: return "up_proj";
    case kWDown: return "down_proj";
    default: return nullptr;
  }
}

std::string lora_module_suffix(LayerTensor t) {
  const bool attn = t == kWq || t == kWk || t == kWv || t == kWo;
  return std::string(attn ? "self_attn." : "mlp.") + lora_module_name(t);
}

Expected<std::vector<LayerTensor>> parse_lora_targets(const std::string& list) {
  std::vector<bool> want(kLayerTensorCount, false);
  std::stringstream ss(list);
  std::string item;
  bool any = false;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if (item == "all" || item == "all-linear") {
      for (LayerTensor t : kLoraTargets) want[t] = true;
      any = true;
      continue;
    }
    bool found = false;
    for (LayerTensor t : kLoraTargets) {
      const std::string full = lora_module_name(t), shrt = full.substr(0, full.find('_'));
      if (item == full || item == shrt) want[t] = found = true;
    }
    if (!found)
      return invalid_argument(strprintf("--targets: unknown module '%s' (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, their short "
                                        "names q..down, or all)",
                                        item.c_str()));
    any = true;
  }
  if (!any) return invalid_argument("--targets: no module named");
  std::vector<LayerTensor> out;
  for (LayerTensor t : kLoraTargets)
    if (want[t]) out.push_back(t);
  return out;
}

bool LoraConfig::targets_has(LayerTensor t) const {
  for (LayerTensor x : targets)
    if (x == t) return true;
  return false;
}

namespace {
// The [out, in] shape of Linear `t`.
std::pair<int64_t, int64_t> linear_shape(const ModelConfig& m, LayerTensor t) {
  switch (t) {
    case kWq: return {m.q_dim(), m.n_embd};
    case kWk:
    case kWv: return {m.kv_dim(), m.n_embd};
    case kWo: return {m.n_embd, m.q_dim()};
    case kWGate:
    case kWUp: return {m.n_ff, m.n_embd};
    case kWDown: return {m.n_embd, m.n_ff};
    default: return {0, 0};
  }
}
}  // namespace

LoraAdapter LoraAdapter::zeros(const ModelConfig& model, const LoraConfig& cfg) {
  LoraAdapter w;
  w.cfg = cfg;
  w.layers.resize(model.n_layers);
  for (auto& layer : w.layers)
    for (LayerTensor t : cfg.targets) {
      const auto [out, in] = linear_shape(model, t);
      LoraPair& p = layer[t];
      p.in = in, p.out = out;
      p.a.assign(static_cast<size_t>(cfg.rank * in), 0.0f);
      p.b.assign(static_cast<size_t>(out * cfg.rank), 0.0f);
    }
  return w;
}

LoraAdapter LoraAdapter::init(const ModelConfig& model, const LoraConfig& cfg, uint64_t seed) {
  LoraAdapter w = zeros(model, cfg);
  std::mt19937_64 rng(seed);
  for (auto& layer : w.layers)
    for (LayerTensor t : cfg.targets) {
      LoraPair& p = layer[t];
      const float bound = 1.0f / std::sqrt(static_cast<float>(p.in));
      std::uniform_real_distribution<float> u(-bound, bound);
      for (float& x : p.a) x = u(rng);
    }
  return w;
}

int64_t LoraAdapter::n_params() const {
  int64_t n = 0;
  for (const auto& layer : layers)
    for (const LoraPair& p : layer) n += static_cast<int64_t>(p.a.size() + p.b.size());
  return n;
}

std::string LoraAdapter::tensor_name(int64_t il, LayerTensor t, bool a) {
  return strprintf("base_model.model.model.layers.%lld.%s.lora_%s.weight", static_cast<long long>(il), lora_module_suffix(t).c_str(), a ? "A" : "B");
}

AdamW::AdamW(const LoraAdapter& shape, const AdamWParams& p) : p_(p) {
  m_ = shape;
  for (auto& layer : m_.layers)
    for (LoraPair& q : layer) {
      std::fill(q.a.begin(), q.a.end(), 0.0f);
      std::fill(q.b.begin(), q.b.end(), 0.0f);
    }
  v_ = m_;
}

void AdamW::step(LoraAdapter& w, const LoraAdapter& g) {
  ++t_;
  // torch computes the bias corrections and the step size in double (Python floats), the moments and
  // the update in float32.
  const double bc1 = 1.0 - std::pow(p_.beta1, static_cast<double>(t_)), bc2 = 1.0 - std::pow(p_.beta2, static_cast<double>(t_));
  const float step_size = static_cast<float>(p_.lr / bc1), bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float decay = static_cast<float>(1.0 - p_.lr * p_.weight_decay), b1 = static_cast<float>(p_.beta1), b2 = static_cast<float>(p_.beta2),
              eps = static_cast<float>(p_.eps);
  auto update = [&](std::vector<float>& p, const std::vector<float>& gr, std::vector<float>& m, std::vector<float>& v) {
    FERRY_CHECK(p.size() == gr.size() && p.size() == m.size() && p.size() == v.size());
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] *= decay;
      m[i] += (gr[i] - m[i]) * (1.0f - b1);  // exp_avg.lerp_(grad, 1 - beta1)
      v[i] = v[i] * b2 + (1.0f - b2) * gr[i] * gr[i];
      const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
      p[i] -= step_size * (m[i] / denom);
    }
  };
  for (size_t il = 0; il < w.layers.size(); ++il)
    for (int t = 0; t < kLayerTensorCount; ++t) {
      LoraPair& p = w.layers[il][t];
      if (p.empty()) continue;
      update(p.a, g.layers[il][t].a, m_.layers[il][t].a, v_.layers[il][t].a);
      update(p.b, g.layers[il][t].b, m_.layers[il][t].b, v_.layers[il][t].b);
    }
}

namespace {
// Calls fn(il, t, is_a, vector) for every parameter of `w`, in save order.
template <class W, class F>
void for_each_param(W& w, F&& fn) {
  for (size_t il = 0; il < w.layers.size(); ++il)
    for (LayerTensor t : w.cfg.targets) {
      fn(static_cast<int64_t>(il), t, true, w.layers[il][t].a);
      fn(static_cast<int64_t>(il), t, false, w.layers[il][t].b);
    }
}
}  // namespace

double lora_norm(const LoraAdapter& g) {
  double s = 0;
  for_each_param(g, [&](int64_t, LayerTensor, bool, const std::vector<float>& v) {
    for (float x : v) s += static_cast<double>(x) * x;
  });
  return std::sqrt(s);
}

void lora_scale(LoraAdapter& g, float s) {
  for_each_param(g, [&](int64_t, LayerTensor, bool, std::vector<float>& v) {
    for (float& x : v) x *= s;
  });
}

void lora_axpy(LoraAdapter& y, float a, const LoraAdapter& x) {
  for_each_param(y, [&](int64_t il, LayerTensor t, bool is_a, std::vector<float>& v) {
    const std::vector<float>& src = is_a ? x.layers[il][t].a : x.layers[il][t].b;
    FERRY_CHECK(src.size() == v.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] += a * src[i];
  });
}

Status AdamW::save(const std::string& path, std::map<std::string, std::string> metadata) const {
  std::vector<TensorToWrite> tensors;
  auto add = [&](const char* prefix, const LoraAdapter& st) {
    for_each_param(st, [&](int64_t il, LayerTensor t, bool a, const std::vector<float>& v) {
      const LoraPair& p = st.layers[il][t];
      tensors.push_back({prefix + LoraAdapter::tensor_name(il, t, a), DType::kF32,
                         a ? std::vector<int64_t>{st.cfg.rank, p.in} : std::vector<int64_t>{p.out, st.cfg.rank}, v.data()});
    });
  };
  add("exp_avg.", m_);
  add("exp_avg_sq.", v_);
  metadata["adamw_step"] = std::to_string(t_);
  return write_safetensors(path, tensors, metadata);
}

Expected<std::map<std::string, std::string>> AdamW::load(const std::string& path) {
  FERRY_ASSIGN_OR_RETURN(auto file, SafetensorsFile::open(path));
  const auto& meta = file->metadata();
  auto it = meta.find("adamw_step");
  int64_t step = -1;
  if (it != meta.end()) step = std::strtoll(it->second.c_str(), nullptr, 10);
  if (step < 0) return corrupt(strprintf("%s: no adamw_step in its metadata: not a ferry training state", path.c_str()));
  LoraAdapter m = m_, v = v_;
  Status st = Status::Ok();
  auto read = [&](const char* prefix, LoraAdapter& dst) {
    for_each_param(dst, [&](int64_t il, LayerTensor t, bool a, std::vector<float>& out) {
      if (!st.ok()) return;
      const std::string name = prefix + LoraAdapter::tensor_name(il, t, a);
      const SafetensorsEntry* e = file->find(name);
      if (e == nullptr || e->dtype != DType::kF32 || static_cast<size_t>(file->view(*e).numel()) != out.size()) {
        st = corrupt(strprintf("%s: tensor '%s' is missing or not F32 with %zu elements: the state is of another adapter", path.c_str(), name.c_str(),
                               out.size()));
        return;
      }
      std::memcpy(out.data(), file->view(*e).data, out.size() * sizeof(float));
    });
  };
  read("exp_avg.", m);
  read("exp_avg_sq.", v);
  FERRY_RETURN_IF_ERROR(st);
  const size_t want = 4 * m.layers.size() * m.cfg.targets.size();
  if (file->entries().size() != want)
    return corrupt(strprintf("%s: %zu tensors; the adapter's optimizer state has %zu: the state is of another adapter", path.c_str(),
                             file->entries().size(), want));
  m_ = std::move(m), v_ = std::move(v), t_ = step;
  return meta;
}

Status save_lora(const LoraAdapter& w, const std::string& dir, const std::string& base_model, const std::map<std::string, std::string>& metadata) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) return invalid_argument(strprintf("--out %s: cannot create the adapter directory", dir.c_str()));
  std::vector<TensorToWrite> tensors;
  for (size_t il = 0; il < w.layers.size(); ++il)
    for (LayerTensor t : w.cfg.targets) {
      const LoraPair& p = w.layers[il][t];
      tensors.push_back({LoraAdapter::tensor_name(static_cast<int64_t>(il), t, true), DType::kF32, {w.cfg.rank, p.in}, p.a.data()});
      tensors.push_back({LoraAdapter::tensor_name(static_cast<int64_t>(il), t, false), DType::kF32, {p.out, w.cfg.rank}, p.b.data()});
    }
  // The weights first: a config beside them says the pair is whole.
  std::map<std::string, std::string> meta = metadata;
  meta["format"] = "pt";
  FERRY_RETURN_IF_ERROR(write_safetensors(dir + "/adapter_model.safetensors", tensors, meta));
  nlohmann::json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = base_model;
  j["r"] = w.cfg.rank;
  j["lora_alpha"] = w.cfg.alpha;
  j["lora_dropout"] = 0.0;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["use_rslora"] = false;
  j["use_dora"] = false;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = nlohmann::json::object();
  j["target_modules"] = nlohmann::json::array();
  for (LayerTensor t : w.cfg.targets) j["target_modules"].push_back(lora_module_name(t));
  const std::string text = j.dump(2) + "\n";
  return write_file_atomic(dir + "/adapter_config.json", text.data(), text.size());
}

Expected<LoraAdapter> load_lora(const ModelConfig& model, const std::string& dir) {
  const std::string cpath = dir + "/adapter_config.json", wpath = dir + "/adapter_model.safetensors";
  std::ifstream in(cpath);
  if (!in) return not_found(strprintf("%s: cannot read the adapter's config (a peft adapter directory holds adapter_config.json)", cpath.c_str()));
  std::stringstream buf;
  buf << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(buf.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) return corrupt(strprintf("%s: not a JSON object", cpath.c_str()));
  auto str = [&](const char* k) { return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : std::string(); };
  if (str("peft_type") != "LORA") return unsupported(strprintf("%s: peft_type is '%s'; ferry reads LORA adapters", cpath.c_str(), str("peft_type").c_str()));
  for (const char* k : {"use_dora", "use_rslora", "fan_in_fan_out"})
    if (j.contains(k) && j[k].is_boolean() && j[k].get<bool>()) return unsupported(strprintf("%s: %s is true, which ferry does not compute", cpath.c_str(), k));
  if (j.contains("bias") && str("bias") != "none") return unsupported(strprintf("%s: bias is '%s'; ferry trains and reads adapters without bias", cpath.c_str(), str("bias").c_str()));
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (j.contains(k) && j[k].is_object() && !j[k].empty()) return unsupported(strprintf("%s: %s is not empty; ferry reads one rank and alpha", cpath.c_str(), k));
  if (!j.contains("r") || !j["r"].is_number_integer() || j["r"].get<int64_t>() < 1 || !j.contains("lora_alpha") || !j["lora_alpha"].is_number())
    return corrupt(strprintf("%s: needs an integer r >= 1 and a number lora_alpha", cpath.c_str()));
  LoraConfig cfg;
  cfg.rank = j["r"].get<int64_t>();
  cfg.alpha = j["lora_alpha"].get<double>();
  std::string list;
  if (j.contains("target_modules") && j["target_modules"].is_array())
    for (const auto& m : j["target_modules"]) list += (m.is_string() ? m.get<std::string>() : std::string("?")) + ",";
  else
    return unsupported(strprintf("%s: target_modules must be a list of module names", cpath.c_str()));
  auto targets = parse_lora_targets(list);
  if (!targets.ok()) return invalid_argument(strprintf("%s: target_modules: %s", cpath.c_str(), targets.status().message().c_str()));
  cfg.targets = *targets;
  FERRY_ASSIGN_OR_RETURN(auto file, SafetensorsFile::open(wpath));
  LoraAdapter w = LoraAdapter::zeros(model, cfg);
  size_t used = 0;
  for (size_t il = 0; il < w.layers.size(); ++il)
    for (LayerTensor t : cfg.targets)
      for (bool a : {true, false}) {
        LoraPair& p = w.layers[il][t];
        const std::string name = LoraAdapter::tensor_name(static_cast<int64_t>(il), t, a);
        const SafetensorsEntry* e = file->find(name);
        const std::vector<int64_t> want = a ? std::vector<int64_t>{cfg.rank, p.in} : std::vector<int64_t>{p.out, cfg.rank};
        if (e == nullptr) return not_found(strprintf("%s: tensor '%s' is missing", wpath.c_str(), name.c_str()));
        if (e->shape != want || (e->dtype != DType::kF32 && e->dtype != DType::kBF16 && e->dtype != DType::kF16))
          return corrupt(strprintf("%s: tensor '%s' is %s %s; the model needs F32/F16/BF16 %s", wpath.c_str(), name.c_str(),
                                   std::string(dtype_name(e->dtype)).c_str(), shape_str(e->shape).c_str(), shape_str(want).c_str()));
        std::vector<float>& dst = a ? p.a : p.b;
        convert_to_f32(file->view(*e).data, e->dtype, dst.data(), static_cast<int64_t>(dst.size()));
        for (float x : dst)
          if (!std::isfinite(x)) return corrupt(strprintf("%s: tensor '%s' holds a NaN or an infinity", wpath.c_str(), name.c_str()));
        ++used;
      }
  if (used != file->entries().size()) {
    for (const auto& [name, e] : file->entries()) {
      bool known = false;
      for (size_t il = 0; il < w.layers.size() && !known; ++il)
        for (LayerTensor t : cfg.targets) known |= name == LoraAdapter::tensor_name(static_cast<int64_t>(il), t, true) || name == LoraAdapter::tensor_name(static_cast<int64_t>(il), t, false);
      if (!known)
        return corrupt(strprintf("%s: unexpected tensor '%s' for a %lld-layer model with targets %s", wpath.c_str(), name.c_str(),
                                 static_cast<long long>(model.n_layers), list.c_str()));
    }
  }
  return w;
}

}  // namespace ferry
