#include "offload/weight_store.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <cmath>
#include <set>

#include <nlohmann/json.hpp>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "models/synthetic.h"
#include "models/weight_format.h"
#include "offload/layer_layout.h"

namespace ferry {

// One Linear weight of a bitsandbytes checkpoint, bound in place (bind_bnb below).
struct BnbLinear {
  const uint8_t* codes = nullptr;
  const float* absmax = nullptr;         // fp32 absmax (not double-quantised)
  const uint8_t* absmax_codes = nullptr;  // double-quantised
  const float* absmax2 = nullptr;
  float offset = 0;
  int64_t rows = 0, n_absmax = 0;
  const int8_t* q8 = nullptr;  // 8-bit: int8 rows
  const float* scb = nullptr;  // and each row's absmax (w = q * SCB / 127)
  // A Linear the checkpoint keeps unquantised (llm_int8_skip_modules), quantised at load: the blocks
  // above point into `owned`; int8 rows then carry their scale itself.
  std::shared_ptr<const std::vector<uint8_t>> owned;
  const float* q8_scale = nullptr;
};

namespace {

Expected<TensorView> bind(const CheckpointReader& ckpt, const TensorSpec& spec) {
  auto found = ckpt.find(spec.name);
  if (found.entry == nullptr)
    return not_found(strprintf("tensor '%s' %s is missing from %s", spec.name.c_str(), shape_str(spec.shape).c_str(),
                               ckpt.source_description().c_str()));
  const SafetensorsEntry& e = *found.entry;
  if (e.shape != spec.shape)
    return corrupt(strprintf("%s: tensor '%s' has shape %s but config.json implies %s", found.file->path().c_str(),
                             spec.name.c_str(), shape_str(e.shape).c_str(), shape_str(spec.shape).c_str()));
  if (e.dtype != DType::kF32 && e.dtype != DType::kF16 && e.dtype != DType::kBF16)
    return unsupported(strprintf("%s: tensor '%s' has dtype %s (supported: F32, F16, BF16)", found.file->path().c_str(),
                                 spec.name.c_str(), std::string(dtype_name(e.dtype)).c_str()));
  return found.file->view(e);
}

// Returns the index of the first NaN or infinity in `v` (BF16, F16 or F32), or -1.
int64_t first_non_finite(const TensorView& v) {
  const int64_t n = v.numel();
  auto scan = [n](const auto* p, auto exp_mask) -> int64_t {
    // All-ones exponent: infinity or NaN. Checked in runs so the loop vectorises.
    constexpr int64_t kRun = 4096;
    for (int64_t i0 = 0; i0 < n; i0 += kRun) {
      const int64_t i1 = std::min(n, i0 + kRun);
      bool any = false;
      for (int64_t i = i0; i < i1; ++i) any |= (p[i] & exp_mask) == exp_mask;
      if (any)
        for (int64_t i = i0; i < i1; ++i)
          if ((p[i] & exp_mask) == exp_mask) return i;
    }
    return -1;
  };
  switch (v.dtype) {
    case DType::kBF16: return scan(static_cast<const uint16_t*>(v.data), uint16_t{0x7f80});
    case DType::kF16: return scan(static_cast<const uint16_t*>(v.data), uint16_t{0x7c00});
    case DType::kF32: return scan(static_cast<const uint32_t*>(v.data), uint32_t{0x7f800000u});
    default: return -1;
  }
}

// One Linear weight ([rows, cols] in config.json) of a bitsandbytes checkpoint in `format`, as
// transformers saves it. 4-bit: `name` U8 [rows * cols / 2, 1] (two codes a byte, the first in the
// high nibble, as ferry's NF4), `name.absmax` (F32, one per 64 weights; with double quantisation U8
// codes of the signed dynamic map, and `name.nested_absmax` F32 one per 256 of them,
// `name.nested_quant_map` F32 [256]), `name.quant_map` F32 [16] and
// `name.quant_state.bitsandbytes__nf4` (U8: JSON with quant_type, blocksize, shape and,
// double-quantised, nested_blocksize and nested_offset, the absmax' mean). 8-bit: below.
// Whether module `m` ("model.layers.1.mlp.down_proj") is one llm_int8_skip_modules keeps unquantised:
// an entry is part of its name, as transformers matches them.
bool skipped_module(const std::string& m, const std::vector<std::string>& skip) {
  return std::any_of(skip.begin(), skip.end(), [&](const std::string& k) { return m.find(k) != std::string::npos; });
}

// A Linear stored in 16 or 32 bits in a bitsandbytes checkpoint (llm_int8_skip_modules) quantised by
// ferry's codec into the checkpoint's format (quantize_stored_weight: NF4 or int8 in ferry's blob
// layout), NF4-DQ's absmax then double-quantised over this Linear, as bitsandbytes does each one.
BnbLinear requantize_bnb(const TensorView& v, int64_t rows, int64_t cols, DType format) {
  const DType t = format == DType::kQ8 ? DType::kQ8 : DType::kNF4;
  const QuantLayout l = quant_layout(t, rows, cols);
  const int64_t na = l.n_scales, codes2_at = l.bytes, a2_at = codes2_at + align16(na);  // NF4-DQ: its codes and absmax2 after the blob
  auto own = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(format == DType::kNF4DQ ? a2_at + 4 * ((na + 255) / 256) : l.bytes));
  uint8_t* base = own->data();
  quantize_stored_weight(t, v.data, v.dtype, rows, cols, base);
  const float* scales = reinterpret_cast<const float*>(base + l.scales);
  BnbLinear b;
  b.rows = rows;
  if (t == DType::kQ8) {
    b.q8 = reinterpret_cast<const int8_t*>(base);
    b.q8_scale = scales;
  } else {
    b.codes = base;
    b.absmax = scales;  // (where the model runs NF4: these, not the double-quantised ones)
    b.n_absmax = na;
    if (format == DType::kNF4DQ) {
      quantize_absmax_dq(scales, na, base + codes2_at, reinterpret_cast<float*>(base + a2_at), &b.offset);
      b.absmax_codes = base + codes2_at;
      b.absmax2 = reinterpret_cast<const float*>(base + a2_at);
    }
  }
  b.owned = std::move(own);
  return b;
}

Expected<BnbLinear> bind_bnb(const CheckpointReader& ckpt, const TensorSpec& spec, DType format, const std::vector<std::string>& skip,
                             std::set<std::string>& used) {
  const int64_t rows = spec.shape[0], cols = spec.shape[1], n = rows * cols, na = n / 64;
  const bool dq = format == DType::kNF4DQ;
  const std::string src = ckpt.source_description();
  // Kept in 16 or 32 bits (llm_int8_skip_modules): quantised here to the checkpoint's format.
  if (auto f = ckpt.find(spec.name); f.entry != nullptr && (f.entry->dtype == DType::kBF16 || f.entry->dtype == DType::kF16 || f.entry->dtype == DType::kF32)) {
    const std::string module = spec.name.substr(0, spec.name.size() - std::string(".weight").size());
    if (!skipped_module(module, skip))
      return corrupt(strprintf("%s: tensor '%s' is stored as %s, not quantised, and config.json's quantization_config llm_int8_skip_modules does "
                               "not name '%s'",
                               f.file->path().c_str(), spec.name.c_str(), std::string(dtype_name(f.entry->dtype)).c_str(), module.c_str()));
    if (f.entry->shape != spec.shape)
      return corrupt(strprintf("%s: tensor '%s' has shape %s but config.json implies %s", f.file->path().c_str(), spec.name.c_str(),
                               shape_str(f.entry->shape).c_str(), shape_str(spec.shape).c_str()));
    if (format != DType::kQ8 && cols % 64 != 0)
      return unsupported(strprintf("%s: '%s' %s (kept unquantised) cannot be quantised to NF4: its rows are not whole blocks of 64", src.c_str(),
                                   spec.name.c_str(), shape_str(spec.shape).c_str()));
    const TensorView v = f.file->view(*f.entry);
    if (first_non_finite(v) >= 0) return corrupt(strprintf("%s: tensor '%s' holds a NaN or an infinity", f.file->path().c_str(), spec.name.c_str()));
    used.insert(spec.name);
    return requantize_bnb(v, rows, cols, format);
  }
  auto part = [&](const std::string& suffix, DType dt, int64_t numel) -> Expected<TensorView> {
    const std::string name = spec.name + suffix;
    auto f = ckpt.find(name);
    if (f.entry == nullptr)
      return not_found(strprintf("%s: tensor '%s' is missing (a bitsandbytes checkpoint stores it beside '%s')", src.c_str(), name.c_str(),
                                 spec.name.c_str()));
    int64_t got = 1;
    for (int64_t d : f.entry->shape) got *= d;
    if (f.entry->dtype != dt || (numel >= 0 && got != numel))
      return corrupt(strprintf("%s: tensor '%s' is %s %s; the bitsandbytes weight %s %s needs %s with %lld elements", f.file->path().c_str(),
                               name.c_str(), std::string(dtype_name(f.entry->dtype)).c_str(), shape_str(f.entry->shape).c_str(), spec.name.c_str(),
                               shape_str(spec.shape).c_str(), std::string(dtype_name(dt)).c_str(), static_cast<long long>(numel)));
    used.insert(name);
    return f.file->view(*f.entry);
  };
  if (format == DType::kQ8) {  // `name` I8 [rows, cols]; `<module>.SCB` F32 [rows]; `name_format` U8 (0: rows as they are)
    BnbLinear b;
    b.rows = rows;
    FERRY_ASSIGN_OR_RETURN(TensorView q, part("", DType::kI8, n));
    const std::string module = spec.name.substr(0, spec.name.size() - std::string(".weight").size());
    auto f = ckpt.find(module + ".SCB");
    if (f.entry == nullptr || f.entry->dtype != DType::kF32 || f.entry->shape != std::vector<int64_t>{rows})
      return corrupt(strprintf("%s: tensor '%s.SCB' (F32 [%lld], the rows' absmax) is %s beside the bitsandbytes 8-bit weight '%s'", src.c_str(),
                               module.c_str(), static_cast<long long>(rows), f.entry ? "of another dtype or shape" : "missing", spec.name.c_str()));
    used.insert(module + ".SCB");
    const TensorView scb = f.file->view(*f.entry);
    if (first_non_finite(scb) >= 0) return corrupt(strprintf("%s: '%s.SCB' holds a NaN or an infinity", src.c_str(), module.c_str()));
    if (auto wf = ckpt.find(spec.name + "_format"); wf.entry != nullptr) {
      const TensorView v = wf.file->view(*wf.entry);
      if (wf.entry->dtype != DType::kU8 || v.numel() != 1 || *static_cast<const uint8_t*>(v.data) != 0)
        return unsupported(strprintf("%s: '%s_format' is not 0 (rows as they are): a GPU-tiled bitsandbytes layout ferry does not read", src.c_str(),
                                     spec.name.c_str()));
      used.insert(spec.name + "_format");
    }
    b.q8 = static_cast<const int8_t*>(q.data);
    b.scb = static_cast<const float*>(scb.data);
    return b;
  }
  if (cols % 64 != 0)
    return unsupported(strprintf("%s: bitsandbytes 4-bit weight '%s' %s: its rows are not whole blocks of 64", src.c_str(), spec.name.c_str(),
                                 shape_str(spec.shape).c_str()));
  BnbLinear b;
  b.rows = rows, b.n_absmax = na;
  FERRY_ASSIGN_OR_RETURN(TensorView codes, part("", DType::kU8, n / 2));
  b.codes = static_cast<const uint8_t*>(codes.data);
  FERRY_ASSIGN_OR_RETURN(TensorView qmap, part(".quant_map", DType::kF32, 16));
  if (std::memcmp(qmap.data, kNf4Codes, sizeof kNf4Codes) != 0)
    return unsupported(strprintf("%s: '%s.quant_map' is not NF4's 16 code values", src.c_str(), spec.name.c_str()));
  FERRY_ASSIGN_OR_RETURN(TensorView qs, part(".quant_state.bitsandbytes__nf4", DType::kU8, -1));
  const std::string text(static_cast<const char*>(qs.data), static_cast<size_t>(qs.numel()));
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  const std::string qs_name = spec.name + ".quant_state.bitsandbytes__nf4";
  if (j.is_discarded() || !j.is_object()) return corrupt(strprintf("%s: '%s' is not a JSON object", src.c_str(), qs_name.c_str()));
  // Fields of the wrong type read as absent (nlohmann's value() and get() throw on them).
  auto str = [&](const char* k) { return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : std::string(); };
  auto num = [&](const char* k, int64_t dflt) { return !j.contains(k) ? dflt : j[k].is_number_integer() ? j[k].get<int64_t>() : int64_t{-1}; };
  std::vector<int64_t> shape;
  if (j.contains("shape") && j["shape"].is_array())
    for (const auto& d : j["shape"]) shape.push_back(d.is_number_integer() ? d.get<int64_t>() : int64_t{-1});
  if (str("quant_type") != "nf4" || num("blocksize", 0) != 64 || shape != spec.shape)
    return corrupt(strprintf("%s: '%s' says %s; expected quant_type nf4, blocksize 64 and shape %s", src.c_str(), qs_name.c_str(), text.c_str(),
                             shape_str(spec.shape).c_str()));
  if (!dq) {
    FERRY_ASSIGN_OR_RETURN(TensorView a, part(".absmax", DType::kF32, na));
    b.absmax = static_cast<const float*>(a.data);
  } else {
    FERRY_ASSIGN_OR_RETURN(TensorView a, part(".absmax", DType::kU8, na));
    FERRY_ASSIGN_OR_RETURN(TensorView a2, part(".nested_absmax", DType::kF32, (na + 255) / 256));
    FERRY_ASSIGN_OR_RETURN(TensorView map, part(".nested_quant_map", DType::kF32, 256));
    if (std::memcmp(map.data, dynamic_map_signed(), 256 * sizeof(float)) != 0)
      return unsupported(strprintf("%s: '%s.nested_quant_map' is not bitsandbytes' signed dynamic map", src.c_str(), spec.name.c_str()));
    if (num("nested_blocksize", 256) != 256 || !j.contains("nested_offset") || !j["nested_offset"].is_number())
      return corrupt(strprintf("%s: '%s' says %s; double quantisation needs nested_blocksize 256 and a nested_offset", src.c_str(), qs_name.c_str(),
                               text.c_str()));
    b.absmax_codes = static_cast<const uint8_t*>(a.data);
    b.absmax2 = static_cast<const float*>(a2.data);
    b.offset = j["nested_offset"].get<float>();
    if (!std::isfinite(b.offset) || first_non_finite(a2) >= 0)
      return corrupt(strprintf("%s: '%s' holds a NaN or an infinity in its double-quantised absmax", src.c_str(), spec.name.c_str()));
  }
  if (b.absmax != nullptr && first_non_finite(TensorView::contiguous(const_cast<float*>(b.absmax), DType::kF32, {na})) >= 0)
    return corrupt(strprintf("%s: '%s.absmax' holds a NaN or an infinity", src.c_str(), spec.name.c_str()));
  return b;
}
}  // namespace

Expected<std::unique_ptr<WeightStore>> WeightStore::from_checkpoint(const ModelConfig& cfg, std::unique_ptr<CheckpointReader> ckpt) {
  std::unique_ptr<WeightStore> ws(new WeightStore());
  ws->cfg_ = cfg;
  ws->source_ = ckpt->source_description();
  std::set<std::string> used;
  // Every bound tensor, for the finite check below.
  struct Named {
    std::string name;
    int64_t layer;
    TensorView v;
  };
  std::vector<Named> all;
  const auto gspecs = global_tensor_specs(cfg);
  for (int g = 0; g < kGlobalTensorCount; ++g) {
    if (gspecs[g].name.empty()) continue;
    FERRY_ASSIGN_OR_RETURN(ws->globals_.t[g], bind(*ckpt, gspecs[g]));
    used.insert(gspecs[g].name);
    all.push_back({gspecs[g].name, -1, ws->globals_.t[g]});
  }
  if (cfg.tie_word_embeddings) {
    ws->globals_.t[kLmHead] = ws->globals_.t[kTokEmbd];
    used.insert("lm_head.weight");  // some tied checkpoints store a copy; the embedding is used
  }
  ws->layers_.resize(cfg.n_layers);
  const bool bnb = is_quantized(cfg.checkpoint_quant);  // bitsandbytes: the Linear weights are read below (bind_bnb)
  auto is_linear = [](int t) { return t == kWq || t == kWk || t == kWv || t == kWo || t == kWGate || t == kWUp || t == kWDown; };
  for (int64_t il = 0; il < cfg.n_layers; ++il) {
    const auto specs = layer_tensor_specs(cfg, il);
    for (int t = 0; t < kLayerTensorCount; ++t) {
      if (specs[t].name.empty() || (bnb && is_linear(t))) continue;
      FERRY_ASSIGN_OR_RETURN(ws->layers_[il].t[t], bind(*ckpt, specs[t]));
      used.insert(specs[t].name);
      all.push_back({specs[t].name, il, ws->layers_[il].t[t]});
    }
  }
  std::vector<std::array<BnbLinear, kLayerTensorCount>> bnb_w(bnb ? cfg.n_layers : 0);
  for (int64_t il = 0; il < static_cast<int64_t>(bnb_w.size()); ++il) {
    const auto specs = layer_tensor_specs(cfg, il);
    for (int t = 0; t < kLayerTensorCount; ++t)
      if (is_linear(t)) {
        FERRY_ASSIGN_OR_RETURN(bnb_w[il][t], bind_bnb(*ckpt, specs[t], cfg.checkpoint_quant, cfg.checkpoint_skip_modules, used));
      }
  }
  for (const auto& name : ckpt->names()) {
    if (used.count(name) || is_ignored_tensor(name)) continue;
    return corrupt(strprintf("%s: unexpected tensor '%s' for %s with %lld layers (wrong config.json, or an architecture ferry does not know)",
                             ckpt->source_description().c_str(), name.c_str(), cfg.architecture.c_str(),
                             static_cast<long long>(cfg.n_layers)));
  }
  // Every weight must be finite: a NaN or an infinity would reach the logits as garbage. One pass
  // over the checkpoint, split over the cores (the pages are then cached for the upload).
  std::vector<int64_t> first_bad(all.size(), -1);
  tbb::parallel_for(tbb::blocked_range<size_t>(0, all.size(), 1), [&](const tbb::blocked_range<size_t>& r) {
    for (size_t i = r.begin(); i != r.end(); ++i) first_bad[i] = first_non_finite(all[i].v);
  });
  for (size_t i = 0; i < all.size(); ++i)
    if (first_bad[i] >= 0)
      return corrupt(strprintf("%s: tensor '%s'%s holds a NaN or an infinity (element %lld): the checkpoint is damaged", ckpt->source_description().c_str(),
                               all[i].name.c_str(), all[i].layer >= 0 ? strprintf(" (layer %lld)", (long long)all[i].layer).c_str() : "",
                               (long long)first_bad[i]));
  if (bnb) FERRY_RETURN_IF_ERROR(ws->import_bnb(bnb_w));
  ws->ckpt_ = std::move(ckpt);
  ws->layer_tier_.assign(cfg.n_layers, Tier::kHost);
  return ws;
}

// Every layer's block in `q`'s layout (layer_layout), built in parallel: norms and biases from the
// current views as BF16, each quantised (possibly fused) [R, K] tensor by fill(il, t, dst, R, K);
// the store then serves these blocks and releases the sources it owned. `what` names the work in
// the out-of-memory error.
template <class Fill>
Status WeightStore::build_quant_layers(DType q, const std::string& what, Fill&& fill) {
  const ModelConfig& c = cfg_;
  const int64_t L = c.n_layers;
  std::vector<HostBuffer> blocks(L);
  std::vector<LayerWeights> out(L);
  std::atomic<int64_t> failed{-1};
  std::set<const void*> replaced;
  for (int64_t il = 0; il < L; ++il)
    for (const auto& v : layers_[il].t) replaced.insert(v.data);
  tbb::parallel_for(int64_t{0}, L, [&](int64_t il) {
    const LayerLayout lay = layer_layout(c, il, q);
    HostBuffer b(lay.bytes);
    if (b.data() == nullptr) {
      failed = il;
      return;
    }
    std::memset(b.data(), 0, lay.bytes);  // the alignment padding too
    uint8_t* base = b.as<uint8_t>();
    std::vector<float> f;
    for (int t = 0; t < kLayerTensorCount; ++t) {
      if (!lay.present[t]) continue;
      uint8_t* dst = base + lay.offset[t];
      const TensorView& shape = lay.shapes.t[t];
      if (is_quantized(lay.dtype[t])) {
        fill(il, t, dst, shape.shape[0], shape.shape[1]);
        continue;
      }
      const TensorView& src = layers_[il].t[t];  // norms, biases: BF16
      f.resize(static_cast<size_t>(shape.numel()));
      convert_to_f32(src.data, src.dtype, f.data(), f.size());
      for (size_t i = 0; i < f.size(); ++i) reinterpret_cast<uint16_t*>(dst)[i] = f32_to_bf16(f[i]);
    }
    out[il] = lay.views(base, Tier::kHost);
    blocks[il] = std::move(b);
  });
  if (failed >= 0)
    return out_of_memory(strprintf("%s: cannot allocate %llu bytes of host memory for layer %lld", what.c_str(),
                                   static_cast<unsigned long long>(layer_layout(c, failed, q).bytes), static_cast<long long>(failed.load())));
  layers_ = std::move(out);
  // The sources the store owned are no longer needed (a checkpoint's mapping stays: the globals use it).
  std::vector<HostBuffer> kept;
  for (auto& b : owned_)
    if (!replaced.count(b.data())) kept.push_back(std::move(b));
  owned_ = std::move(kept);
  for (auto& b : blocks)
    if (b.data()) owned_.push_back(std::move(b));
  return Status::Ok();
}

// The bitsandbytes weights into ferry's quantised layer blocks (layer_layout: q/k/v and gate/up
// fused): codes and absmax copied as they are. NF4-DQ keeps each Linear's blocks of 256 and mean where
// every fused part's absmax count is a multiple of 256 (dq_parts); elsewhere the absmax is expanded
// to fp32 (exactly: map[code] * absmax2 + mean, as ferry's own dequantisation) and the model runs NF4.
Status WeightStore::import_bnb(const std::vector<std::array<BnbLinear, kLayerTensorCount>>& w) {
  const ModelConfig& c = cfg_;
  bool aligned = true;  // (NF4-DQ)
  for (int64_t il = 0; il < c.n_layers; ++il)
    for (int t : {kWq, kWk, kWv, kWGate, kWUp}) aligned = aligned && w[il][t].n_absmax % 256 == 0;
  const bool dq = c.checkpoint_quant == DType::kNF4DQ;
  const DType q = c.checkpoint_quant == DType::kQ8 ? DType::kQ8 : dq && aligned ? DType::kNF4DQ : DType::kNF4;
  FERRY_RETURN_IF_ERROR(build_quant_layers(q, source_, [&](int64_t il, int t, uint8_t* dst, int64_t R, int64_t K) {
    std::vector<const BnbLinear*> parts;
    if (t == kWqkv) parts = {&w[il][kWq], &w[il][kWk], &w[il][kWv]};
    else if (t == kWGateUp) parts = {&w[il][kWGate], &w[il][kWUp]};
    else parts = {&w[il][t]};
    const QuantLayout l = quant_layout(q, R, K);
    int64_t r = 0, a = 0;
    for (const BnbLinear* p : parts) {
      if (q == DType::kQ8) {  // int8 rows, then a float scale a row
        std::memcpy(dst + r * K, p->q8, static_cast<size_t>(p->rows * K));
        float* sc = reinterpret_cast<float*>(dst + l.scales) + r;
        for (int64_t i = 0; i < p->rows; ++i) sc[i] = p->q8_scale ? p->q8_scale[i] : p->scb[i] / 127.0f;
        r += p->rows;
        continue;
      }
      std::memcpy(dst + r * K / 2, p->codes, static_cast<size_t>(p->rows * K / 2));
      const int64_t na = p->n_absmax, nb = (na + 255) / 256;
      if (q == DType::kNF4DQ) {  // a is a multiple of 256 (aligned)
        std::memcpy(dst + l.scales + a, p->absmax_codes, static_cast<size_t>(na));
        std::memcpy(dst + l.scales2 + 4 * (a / 256), p->absmax2, static_cast<size_t>(4 * nb));
        std::fill_n(reinterpret_cast<float*>(dst + l.means) + a / 256, nb, p->offset);
      } else if (p->absmax != nullptr) {
        std::memcpy(dst + l.scales + 4 * a, p->absmax, static_cast<size_t>(4 * na));
      } else {
        const float* map = dynamic_map_signed();
        float* am = reinterpret_cast<float*>(dst + l.scales) + a;
        for (int64_t i = 0; i < na; ++i) am[i] = map[p->absmax_codes[i]] * p->absmax2[i / 256] + p->offset;
      }
      r += p->rows, a += na;
    }
    FERRY_CHECK(r == R);
  }));
  int64_t kept = 0;  // Linears the checkpoint keeps unquantised
  for (const auto& l : w)
    for (const BnbLinear& b : l) kept += b.owned ? 1 : 0;
  source_ += q == DType::kQ8     ? ", bitsandbytes 8-bit as int8 rows with a scale each (SCB / 127)"
             : q == DType::kNF4DQ ? ", bitsandbytes NF4 with double-quantised absmax as stored"
             : dq               ? ", bitsandbytes NF4 (its double-quantised absmax expanded to fp32: a q/k/v or gate/up part's count is not a multiple of 256)"
                                : ", bitsandbytes NF4 as stored";
  if (kept > 0)
    source_ += strprintf("; %lld Linear%s it keeps unquantised (llm_int8_skip_modules) quantised to %s at load (ferry's layers hold one format)",
                         static_cast<long long>(kept), kept == 1 ? "" : "s", std::string(dtype_name(q)).c_str());
  return Status::Ok();
}


WeightStore::SyntheticInfo WeightStore::synthetic_info(int64_t il, int t) const {
  if (il < 0) {
    const auto g = global_tensor_specs(cfg_);
    const int gi = (t == kLmHead && cfg_.tie_word_embeddings) ? kTokEmbd : t;
    return {g[gi].name, cfg_.n_embd, gi == kOutNorm};
  }
  const auto specs = layer_tensor_specs(cfg_, il);
  const bool norm = t == kAttnNorm || t == kFfnNorm;
  const bool bias = t == kBq || t == kBk || t == kBv;
  const int64_t fan_in = t == kWDown ? cfg_.n_ff : t == kWo ? cfg_.q_dim() : bias ? 64 : cfg_.n_embd;
  return {specs[t].name, fan_in, norm};
}

Expected<std::unique_ptr<WeightStore>> WeightStore::synthetic(const ModelConfig& cfg, const std::string& preset, bool host) {
  std::unique_ptr<WeightStore> ws(new WeightStore());
  ws->cfg_ = cfg;
  ws->synthetic_ = true;
  ws->layer_tier_.assign(cfg.n_layers, Tier::kHost);
  ws->source_ = std::string(kSyntheticPrefix) + preset + " (generated)";

  struct Job {
    std::string name;
    int64_t fan_in;
    bool is_norm;
    TensorView* view;
    std::vector<int64_t> shape;
  };
  std::vector<Job> jobs;
  const auto gspecs = global_tensor_specs(cfg);
  ws->layers_.resize(cfg.n_layers);
  for (int g = 0; g < kGlobalTensorCount; ++g) {
    if (gspecs[g].name.empty()) continue;
    const SyntheticInfo info = ws->synthetic_info(-1, g);
    jobs.push_back({info.name, info.fan_in, info.is_norm, &ws->globals_.t[g], gspecs[g].shape});
  }
  for (int64_t il = 0; il < cfg.n_layers; ++il) {
    const auto specs = layer_tensor_specs(cfg, il);
    for (int t = 0; t < kLayerTensorCount; ++t) {
      if (specs[t].name.empty()) continue;
      const SyntheticInfo info = ws->synthetic_info(il, t);
      jobs.push_back({info.name, info.fan_in, info.is_norm, &ws->layers_[il].t[t], specs[t].shape});
    }
  }
  for (auto& j : jobs) {
    int64_t numel = 1;
    for (int64_t d : j.shape) numel *= d;
    if (!host) {
      *j.view = TensorView::contiguous(nullptr, DType::kBF16, j.shape);  // shapes only: generated where used
      continue;
    }
    HostBuffer buf(static_cast<size_t>(numel) * 2);
    if (buf.data() == nullptr)
      return out_of_memory(strprintf("synthetic:%s: cannot allocate %lld bytes of host memory for '%s'", preset.c_str(),
                                     static_cast<long long>(numel * 2), j.name.c_str()));
    uint16_t* out = buf.as<uint16_t>();
    const std::string name = j.name;
    const int64_t fan_in = j.fan_in;
    const bool is_norm = j.is_norm;
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, numel, 1 << 16), [&](const tbb::blocked_range<int64_t>& r) {
      synthetic_fill_bf16(name, fan_in, is_norm, r.begin(), r.end() - r.begin(), out + r.begin());
    });
    *j.view = TensorView::contiguous(buf.data(), DType::kBF16, j.shape);
    ws->owned_.push_back(std::move(buf));
  }
  if (cfg.tie_word_embeddings) ws->globals_.t[kLmHead] = ws->globals_.t[kTokEmbd];
  return ws;
}

}  // namespace ferry

namespace ferry {

WeightStore::~WeightStore() = default;

Expected<std::unique_ptr<WeightStore>> WeightStore::from_packed(const ModelConfig& cfg, const std::string& dir, const DiskReaderOptions& opts) {
  std::unique_ptr<WeightStore> ws(new WeightStore());
  ws->cfg_ = cfg;
  ws->source_ = dir + " (packed store, every layer read from disk)";
  FERRY_ASSIGN_OR_RETURN(PackedManifest m, open_store(dir, cfg));
  ws->manifest_ = std::make_unique<PackedManifest>(std::move(m));
  FERRY_ASSIGN_OR_RETURN(ws->reader_, DiskReader::open(*ws->manifest_, opts));
  const auto& blocks = ws->manifest_->blocks;
  // Globals: read once, kept.
  HostBuffer g(blocks[0].padded_bytes, kPackAlign);
  if (g.data() == nullptr) return out_of_memory(strprintf("%s: cannot allocate %llu bytes for the globals", dir.c_str(), (unsigned long long)blocks[0].padded_bytes));
  FERRY_RETURN_IF_ERROR(ws->reader_->submit(0, 0, g.data()));
  FERRY_RETURN_IF_ERROR(ws->reader_->wait(0));
  auto view_of = [](uint8_t* base, const PackedTensor& t) { return TensorView::contiguous(base ? base + t.offset : nullptr, t.dtype, t.shape); };
  for (const auto& t : blocks[0].tensors) ws->globals_.t[t.slot] = view_of(g.as<uint8_t>(), t);
  if (cfg.tie_word_embeddings) ws->globals_.t[kLmHead] = ws->globals_.t[kTokEmbd];
  ws->owned_.push_back(std::move(g));
  // Layers: shapes known, bytes on disk; two slots of the largest layer.
  uint64_t largest = 0;
  for (size_t b = 1; b < blocks.size(); ++b) largest = std::max(largest, blocks[b].padded_bytes);
  for (auto& slot : ws->slots_) {
    slot = HostBuffer(largest, kPackAlign);
    if (slot.data() == nullptr) return out_of_memory(strprintf("%s: cannot allocate two %llu-byte layer slots", dir.c_str(), (unsigned long long)largest));
  }
  ws->layers_.resize(cfg.n_layers);
  ws->layer_tier_.assign(cfg.n_layers, Tier::kDisk);
  ws->store_reads_.assign(cfg.n_layers, true);
  for (int64_t il = 0; il < cfg.n_layers; ++il)
    for (const auto& t : blocks[il + 1].tensors) {
      TensorView v = view_of(nullptr, t);
      v.data = nullptr;
      v.tier = Tier::kDisk;
      ws->layers_[il].t[t.slot] = v;
    }
  return ws;
}

Status WeightStore::prefetch(int64_t il) {
  const int s = static_cast<int>(il % 2);
  if (slot_layer_[s] == il) return Status::Ok();
  FERRY_CHECK(!slot_pending_[s]);
  FERRY_RETURN_IF_ERROR(reader_->submit(s, il + 1, slots_[s].data()));
  slot_layer_[s] = il;
  slot_pending_[s] = true;
  return Status::Ok();
}

Expected<const LayerWeights*> WeightStore::acquire(int64_t il, int64_t next_layer) {
  if (store_reads_.empty() || !store_reads_[il]) return &layers_[il];
  const int s = static_cast<int>(il % 2);
  if (slot_layer_[s] != il) {
    if (slot_pending_[s]) {  // a prefetch of another layer is in flight there: let it land first
      Status st = reader_->wait(s);
      slot_pending_[s] = false;
      if (!st.ok()) slot_layer_[s] = -1;
    }
    FERRY_RETURN_IF_ERROR(prefetch(il));
  }
  if (slot_pending_[s]) {
    Status st = reader_->wait(s);
    slot_pending_[s] = false;
    if (!st.ok()) {
      slot_layer_[s] = -1;
      return st;
    }
  }
  // The next layer (wrapping to layer 0 for the next step) goes into the other slot now.
  const int64_t next = next_layer >= 0 ? next_layer % cfg_.n_layers : (il + 1) % cfg_.n_layers;
  if (next % 2 != s) FERRY_RETURN_IF_ERROR(prefetch(next));
  LayerWeights& v = slot_views_[s];
  uint8_t* base = slots_[s].as<uint8_t>();
  for (const auto& t : manifest_->blocks[il + 1].tensors) {
    v.t[t.slot] = layers_[il].t[t.slot];
    v.t[t.slot].data = base + t.offset;
    v.t[t.slot].tier = Tier::kHost;
  }
  return &v;
}

}  // namespace ferry

namespace ferry {

Status WeightStore::quantize(DType q, bool shapes_only) {
  FERRY_CHECK(is_quantized(q));
  const ModelConfig& c = cfg_;
  const std::string qname(weight_format_info(weight_format_of(q)).name);  // as --quant spells it
  if (manifest_) {
    if (linear_dtype(layers_[0]) == q) return Status::Ok();
    return invalid_argument(strprintf("--quant %s: the packed store %s holds %s weights; pack it with --quant %s (ferry pack)", qname.c_str(),
                                      manifest_->dir.c_str(), std::string(dtype_name(linear_dtype(layers_[0]))).c_str(), qname.c_str()));
  }
  if (const DType have = linear_dtype(layers_[0]); is_quantized(have)) {  // a bitsandbytes checkpoint, read as stored
    if (have == q) return Status::Ok();
    return invalid_argument(strprintf("--quant %s: %s is a bitsandbytes %s checkpoint (config.json quantization_config): run it without --quant",
                                      qname.c_str(), ckpt_ ? ckpt_->dir().c_str() : source_.c_str(),
                                      std::string(weight_format_info(weight_format_of(have)).name).c_str()));
  }
  const int64_t mult = quant_col_multiple(q);
  const auto specs = layer_tensor_specs(c, 0);
  for (LayerTensor t : {kWq, kWo, kWDown}) {
    const int64_t cols = specs[t].shape[1];
    if (cols % mult != 0)
      return invalid_argument(strprintf("--quant %s: tensor '%s' has %lld input columns, not a multiple of %lld (the format's block)",
                                        qname.c_str(), specs[t].name.c_str(), static_cast<long long>(cols),
                                        static_cast<long long>(mult)));
  }
  if (shapes_only || layers_[0][kWq].data == nullptr) {  // shapes only: the executor generates and quantises
    for (int64_t il = 0; il < c.n_layers; ++il) layers_[il] = layer_layout(c, il, q).views(nullptr, Tier::kHost);
    source_ += ", quantised to " + qname + " at load";
    return Status::Ok();
  }
  FERRY_RETURN_IF_ERROR(build_quant_layers(q, "--quant", [&](int64_t il, int t, uint8_t* dst, int64_t R, int64_t K) {
    // The source weights stacked as this (possibly fused) weight's rows.
    const LayerWeights& src = layers_[il];
    std::vector<const TensorView*> parts;
    if (t == kWqkv) parts = {&src[kWq], &src[kWk], &src[kWv]};
    else if (t == kWGateUp) parts = {&src[kWGate], &src[kWUp]};
    else parts = {&src.t[t]};
    std::vector<float> stage(static_cast<size_t>(quant_stage_floats(q, R, K)));  // NF4-DQ's fp32 absmax
    std::vector<float> rows;
    constexpr int64_t kChunk = 64;
    int64_t r = 0;
    std::vector<int64_t> part_rows;
    for (const TensorView* p : parts) {
      part_rows.push_back(p->shape[0]);
      for (int64_t pr = 0; pr < p->shape[0]; pr += kChunk) {
        const int64_t n = std::min(kChunk, p->shape[0] - pr);
        rows.resize(static_cast<size_t>(n * K));
        const uint8_t* from = static_cast<const uint8_t*>(p->data) + pr * K * static_cast<int64_t>(dtype_size(p->dtype));
        convert_to_f32(from, p->dtype, rows.data(), static_cast<size_t>(n * K));
        quantize_rows(q, rows.data(), R, K, r + pr, r + pr + n, dst, stage.data());
      }
      r += p->shape[0];
    }
    FERRY_CHECK(r == R);
    finish_quant(q, R, K, stage.data(), dst, part_rows);
  }));
  source_ += ", quantised to " + qname + " at load";
  return Status::Ok();
}

Status WeightStore::quantize_head(DType q, bool shapes_only) {
  const std::string qname(weight_format_info(weight_format_of(q)).name);
  if (q != DType::kQ8 && q != DType::kNF4)
    return invalid_argument(strprintf("--quant-head %s: the lm_head can be int8 or nf4", qname.c_str()));
  if (cfg_.tie_word_embeddings)
    return invalid_argument(strprintf("--quant-head %s: this model's lm_head is its token embedding (tie_word_embeddings), which stays BF16", qname.c_str()));
  if (manifest_)
    return invalid_argument(strprintf("--quant-head %s: the packed store %s holds a BF16 lm_head; run without --disk to quantise it", qname.c_str(),
                                      manifest_->dir.c_str()));
  const int64_t V = cfg_.n_vocab, E = cfg_.n_embd;
  if (E % quant_col_multiple(q) != 0)
    return invalid_argument(strprintf("--quant-head %s: 'lm_head.weight' has %lld input columns, not a multiple of %lld (the format's block)",
                                      qname.c_str(), static_cast<long long>(E), static_cast<long long>(quant_col_multiple(q))));
  const TensorView src = globals_.t[kLmHead];
  if (src.data == nullptr || shapes_only) {
    globals_.t[kLmHead] = TensorView::contiguous(nullptr, q, {V, E}, Tier::kHost);
    return Status::Ok();
  }
  HostBuffer b(static_cast<size_t>(quant_layout(q, V, E).bytes));
  if (b.data() == nullptr)
    return out_of_memory(strprintf("--quant-head: cannot allocate %llu bytes of host memory for the lm_head",
                                   static_cast<unsigned long long>(quant_layout(q, V, E).bytes)));
  uint8_t* dst = b.as<uint8_t>();
  quantize_stored_weight(q, src.data, src.dtype, V, E, dst);
  globals_.t[kLmHead] = TensorView::contiguous(dst, q, {V, E}, Tier::kHost);
  owned_.push_back(std::move(b));
  source_ += ", lm_head quantised to " + qname + " at load";
  return Status::Ok();
}

}  // namespace ferry
