#include "cpu/lora_train.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "cpu/gemm.h"
#include "cpu/ops.h"

namespace ferry::cpu {

namespace {

// A layer's frozen weights in float32. q | k | v rows form one [Q + 2 KV, E] matrix and gate | up one
// [2 F, E], as a quantised layer stores them fused: one product each way.
struct BaseF32 {
  std::vector<float> qkv;        // [Q + 2 KV, E]
  std::vector<float> o;          // [E, Q]
  std::vector<float> gu;         // [2 F, E]
  std::vector<float> down;       // [E, F]
  std::vector<float> attn_norm;  // [E]
  std::vector<float> ffn_norm;   // [E]
  std::vector<float> bias;       // [Q + 2 KV] (q, k, v biases), or empty
};

// W [N, K] (any weight dtype) into dst [N, K] float32.
void weight_to_f32(const TensorView& W, float* dst) {
  const int64_t N = W.shape[0], K = W.shape[1];
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, N, 16), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t n = r.begin(); n < r.end(); ++n) row_to_f32(W, n, dst + n * K);
  });
}

std::vector<float> vec_f32(const TensorView& v) {
  std::vector<float> out(static_cast<size_t>(v.numel()));
  convert_to_f32(v.data, v.dtype, out.data(), out.size());
  return out;
}

// Fills `b` (its buffers reused from layer to layer and step to step: fresh ones cost page faults
// and zeroing, 12% of a Llama-2-7B step here).
void base_f32(const ModelConfig& c, const LayerWeights& w, BaseF32& b) {
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim(), F = c.n_ff;
  b.qkv.resize(static_cast<size_t>((Q + 2 * KV) * E));
  if (is_fused_qkv(w)) {
    weight_to_f32(w[kWqkv], b.qkv.data());
  } else {
    weight_to_f32(w[kWq], b.qkv.data());
    weight_to_f32(w[kWk], b.qkv.data() + Q * E);
    weight_to_f32(w[kWv], b.qkv.data() + (Q + KV) * E);
  }
  b.gu.resize(static_cast<size_t>(2 * F * E));
  if (is_fused_gate_up(w)) {
    weight_to_f32(w[kWGateUp], b.gu.data());
  } else {
    weight_to_f32(w[kWGate], b.gu.data());
    weight_to_f32(w[kWUp], b.gu.data() + F * E);
  }
  b.o.resize(static_cast<size_t>(E * Q));
  weight_to_f32(w[kWo], b.o.data());
  b.down.resize(static_cast<size_t>(E * F));
  weight_to_f32(w[kWDown], b.down.data());
  b.attn_norm = vec_f32(w[kAttnNorm]);
  b.ffn_norm = vec_f32(w[kFfnNorm]);
  b.bias.clear();
  if (!w[kBq].empty()) {
    b.bias.resize(static_cast<size_t>(Q + 2 * KV));
    convert_to_f32(w[kBq].data, w[kBq].dtype, b.bias.data(), Q);
    convert_to_f32(w[kBk].data, w[kBk].dtype, b.bias.data() + Q, KV);
    convert_to_f32(w[kBv].data, w[kBv].dtype, b.bias.data() + Q + KV, KV);
  }
}

// out[t] = x[t] * inv[t] * w, inv[t] = 1 / sqrt(mean(x[t]^2) + eps), as transformers' LlamaRMSNorm.
void rms_fwd(const float* x, const std::vector<float>& w, double eps, int64_t T, int64_t E, float* out, float* inv) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, T), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      const float* xi = x + t * E;
      double ss = 0;
      for (int64_t j = 0; j < E; ++j) ss += static_cast<double>(xi[j]) * xi[j];
      const float iv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(E)) + static_cast<float>(eps));
      inv[t] = iv;
      for (int64_t j = 0; j < E; ++j) out[t * E + j] = w[j] * (xi[j] * iv);
    }
  });
}

// dx[t] += d rms_fwd / d x[t] applied to dy[t]: w * dy * inv - x * inv^3 * sum(w * dy * x) / E.
void rms_bwd(const float* x, const float* inv, const std::vector<float>& w, const float* dy, int64_t T, int64_t E, float* dx) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, T), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      const float* xi = x + t * E;
      const float* gi = dy + t * E;
      double dot = 0;
      for (int64_t j = 0; j < E; ++j) dot += static_cast<double>(w[j]) * gi[j] * xi[j];
      const float iv = inv[t], c = static_cast<float>(dot / static_cast<double>(E)) * iv * iv * iv;
      for (int64_t j = 0; j < E; ++j) dx[t * E + j] += w[j] * gi[j] * iv - xi[j] * c;
    }
  });
}

// The pass's dimensions, bound once: rows x len tokens (T), n_embd (E), q_dim (Q), kv_dim (KV),
// n_ff (F), heads (H), KV heads (KVH), head_dim (hd), LoRA rank (r) and scale (s).
struct Shape {
  int64_t rows, len, T, E, Q, KV, F, H, KVH, hd, r;
  float s;
};

// A Linear's adapter, forward: u = x A^T [T, r]; y (columns of a [T, ldy] matrix) += s u B^T.
void lora_fwd(const Shape& d, const LoraPair& p, const float* x, float* u, float* y, int64_t ldy) {
  sgemm(false, true, d.T, d.r, p.in, 1.0f, x, p.in, p.a.data(), p.in, 0.0f, u, d.r);
  sgemm(false, true, d.T, p.out, d.r, d.s, u, d.r, p.b.data(), d.r, 1.0f, y, ldy);
}

// Backward of lora_fwd given dy (columns of a [T, ldy] matrix): gB += s dy^T u, du = s dy B,
// gA += du^T x, dx += du A.
void lora_bwd(const Shape& d, const LoraPair& p, const float* x, const float* u, const float* dy, int64_t ldy, LoraPair& g, float* dx,
              std::vector<float>& du) {
  du.resize(static_cast<size_t>(d.T * d.r));
  sgemm(true, false, p.out, d.r, d.T, d.s, dy, ldy, u, d.r, 1.0f, g.b.data(), d.r);
  sgemm(false, false, d.T, d.r, p.out, d.s, dy, ldy, p.b.data(), d.r, 0.0f, du.data(), d.r);
  sgemm(true, false, d.r, p.in, d.T, 1.0f, du.data(), d.r, x, p.in, 1.0f, g.a.data(), p.in);
  sgemm(false, false, d.T, p.in, d.r, 1.0f, du.data(), d.r, p.a.data(), p.in, 1.0f, dx, p.in);
}

// One layer's activations, kept between its recomputed forward and its backward.
// T = rows * len tokens; E, Q, KV, F as in Shape.
struct Acts {
  std::vector<float> xn1;    // [T, E] attention norm's output
  std::vector<float> inv1;   // [T] its 1 / rms
  std::vector<float> qkv;    // [T, Q + 2 KV] before RoPE, biases and LoRA added
  std::vector<float> q;      // [T, H, hd] after RoPE
  std::vector<float> k;      // [T, KVH, hd] after RoPE
  std::vector<float> v;      // [T, KVH, hd]
  std::vector<float> att;    // [T, Q] attention output (the o projection's input)
  std::vector<float> x_mid;  // [T, E] residual after the attention block
  std::vector<float> xn2;    // [T, E] MLP norm's output
  std::vector<float> inv2;   // [T]
  std::vector<float> gu;     // [T, 2 F] gate | up before SwiGLU
  std::vector<float> act;    // [T, F] silu(gate) * up (the down projection's input)
  std::vector<float> tmp;    // [T, E] a block's output before the residual add
  std::array<std::vector<float>, kLayerTensorCount> u;  // [T, r] x A^T of each targeted Linear
};


int64_t window_first(int64_t i, int64_t window) { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }

// Causal attention within each row of the batch: q [T, H, hd], k / v [T, KVH, hd] -> out [T, H, hd].
// Per (row, head) the scores are one [len, len] product on oneDNN's sgemm (the masked upper half
// computed and discarded: twice the FLOPs at sgemm's rate beat scalar loops by far), the softmax a
// pass over its rows, and the output a second product. `p` ([len, len]) holds the probabilities.
void attn_probs(const Shape& d, int64_t window, const float* q, const float* k, int64_t b, int64_t h, float* p) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  const int64_t g = h / (d.H / d.KVH);
  sgemm(false, true, d.len, d.len, d.hd, scale, q + (b * d.len * d.H + h) * d.hd, d.H * d.hd, k + (b * d.len * d.KVH + g) * d.hd, d.KVH * d.hd, 0.0f,
        p, d.len);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, d.len, 16), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t i = r.begin(); i < r.end(); ++i) {
      float* pi = p + i * d.len;
      const int64_t j0 = window_first(i, window);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = j0; j <= i; ++j) m = std::max(m, pi[j]);
      float sum = 0;
      for (int64_t j = j0; j <= i; ++j) sum += (pi[j] = std::exp(pi[j] - m));
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < d.len; ++j) pi[j] = j >= j0 && j <= i ? pi[j] * inv : 0.0f;
    }
  });
}

void attn_fwd(const Shape& d, int64_t window, const float* q, const float* k, const float* v, float* out, std::vector<float>& p) {
  p.resize(static_cast<size_t>(d.len * d.len));
  for (int64_t b = 0; b < d.rows; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t g = h / (d.H / d.KVH);
      attn_probs(d, window, q, k, b, h, p.data());
      sgemm(false, false, d.len, d.hd, d.len, 1.0f, p.data(), d.len, v + (b * d.len * d.KVH + g) * d.hd, d.KVH * d.hd, 0.0f,
            out + (b * d.len * d.H + h) * d.hd, d.H * d.hd);
    }
}

// Its backward, the probabilities recomputed: dP = dO V^T, dS = P (dP - rowsum(P dP)) / sqrt(hd),
// dQ = dS K, dK += dS^T Q, dV += P^T dO (a GQA group's heads add into their K / V head).
void attn_bwd(const Shape& d, int64_t window, const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk, float* dv,
              std::vector<float>& p, std::vector<float>& dp) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  p.resize(static_cast<size_t>(d.len * d.len));
  dp.resize(p.size());
  std::fill(dk, dk + d.T * d.KV, 0.0f);
  std::fill(dv, dv + d.T * d.KV, 0.0f);
  const int64_t lq = d.H * d.hd, lk = d.KVH * d.hd;
  for (int64_t b = 0; b < d.rows; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t g = h / (d.H / d.KVH);
      const float* qh = q + (b * d.len * d.H + h) * d.hd;
      const float* doh = dout + (b * d.len * d.H + h) * d.hd;
      const float* kg = k + (b * d.len * d.KVH + g) * d.hd;
      const float* vg = v + (b * d.len * d.KVH + g) * d.hd;
      attn_probs(d, window, q, k, b, h, p.data());
      sgemm(false, true, d.len, d.len, d.hd, 1.0f, doh, lq, vg, lk, 0.0f, dp.data(), d.len);
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, d.len, 16), [&](const tbb::blocked_range<int64_t>& r) {
        for (int64_t i = r.begin(); i < r.end(); ++i) {
          const float* pi = p.data() + i * d.len;
          float* di = dp.data() + i * d.len;
          float D = 0;
          for (int64_t j = 0; j <= i; ++j) D += pi[j] * di[j];
          for (int64_t j = 0; j < d.len; ++j) di[j] = pi[j] * (di[j] - D) * scale;  // 0 where masked (p = 0)
        }
      });
      sgemm(false, false, d.len, d.hd, d.len, 1.0f, dp.data(), d.len, kg, lk, 0.0f, dq + (b * d.len * d.H + h) * d.hd, lq);
      sgemm(true, false, d.len, d.hd, d.len, 1.0f, dp.data(), d.len, qh, lq, 1.0f, dk + (b * d.len * d.KVH + g) * d.hd, lk);
      sgemm(true, false, d.len, d.hd, d.len, 1.0f, p.data(), d.len, doh, lq, 1.0f, dv + (b * d.len * d.KVH + g) * d.hd, lk);
    }
}

// The backward's buffers, kept from step to step (LoraTrainer::Work).
struct Scratch {
  std::vector<float> dact, dgu, dxn, datt, dq, dk, dv, dqkv, du, p, dp;
};

class Trainer {
 public:
  Trainer(const ModelConfig& c, const LoraAdapter& w, const TrainBatch& b, Scratch& sc)
      : c_(c), w_(w), b_(b), inv_freq_(rope_inv_freq(c)), sc_(sc) {
    d_ = Shape{b.rows, b.len, b.rows * b.len, c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.n_heads, c.n_kv_heads, c.head_dim, w.cfg.rank, w.cfg.scale()};
    pos_.resize(static_cast<size_t>(d_.T));
    neg_.resize(pos_.size());
    for (int64_t t = 0; t < d_.T; ++t) pos_[t] = static_cast<int32_t>(t % b.len), neg_[t] = -pos_[t];
  }

  // Layer il's forward from x (overwritten with its output), its activations in `a`.
  void forward(int64_t il, const BaseF32& W, float* x, Acts& a) {
    const Shape& d = d_;
    const int64_t T = d.T, E = d.E, Q = d.Q, KV = d.KV, F = d.F, NQKV = Q + 2 * KV;
    const auto& L = w_.layers[il];
    auto sz = [](int64_t n) { return static_cast<size_t>(n); };
    a.xn1.resize(sz(T * E)), a.inv1.resize(sz(T)), a.qkv.resize(sz(T * NQKV)), a.q.resize(sz(T * Q)), a.k.resize(sz(T * KV)), a.v.resize(sz(T * KV));
    a.att.resize(sz(T * Q)), a.x_mid.resize(sz(T * E)), a.xn2.resize(sz(T * E)), a.inv2.resize(sz(T)), a.gu.resize(sz(T * 2 * F)), a.act.resize(sz(T * F));
    a.tmp.resize(sz(T * E));
    for (LayerTensor t : w_.cfg.targets) a.u[t].resize(sz(T * d.r));
    // Attention.
    rms_fwd(x, W.attn_norm, c_.rms_norm_eps, T, E, a.xn1.data(), a.inv1.data());
    sgemm(false, true, T, NQKV, E, 1.0f, a.xn1.data(), E, W.qkv.data(), E, 0.0f, a.qkv.data(), NQKV);
    if (!W.bias.empty())
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < NQKV; ++n) a.qkv[t * NQKV + n] += W.bias[n];
    const int64_t off[kLayerTensorCount] = {0, 0, Q, Q + KV};
    for (LayerTensor t : {kWq, kWk, kWv})
      if (!L[t].empty()) lora_fwd(d, L[t], a.xn1.data(), a.u[t].data(), a.qkv.data() + off[t], NQKV);
    take_cols(a.qkv.data(), T, NQKV, 0, Q, a.q.data());
    take_cols(a.qkv.data(), T, NQKV, Q, KV, a.k.data());
    take_cols(a.qkv.data(), T, NQKV, Q + KV, KV, a.v.data());
    rope(a.q.data(), T, d.H, d.hd, pos_.data(), inv_freq_.data());
    rope(a.k.data(), T, d.KVH, d.hd, pos_.data(), inv_freq_.data());
    attn_fwd(d, c_.sliding_window, a.q.data(), a.k.data(), a.v.data(), a.att.data(), sc_.p);
    sgemm(false, true, T, E, Q, 1.0f, a.att.data(), Q, W.o.data(), Q, 0.0f, a.tmp.data(), E);
    if (!L[kWo].empty()) lora_fwd(d, L[kWo], a.att.data(), a.u[kWo].data(), a.tmp.data(), E);
    for (int64_t i = 0; i < T * E; ++i) a.x_mid[i] = x[i] + a.tmp[i];
    // MLP.
    rms_fwd(a.x_mid.data(), W.ffn_norm, c_.rms_norm_eps, T, E, a.xn2.data(), a.inv2.data());
    sgemm(false, true, T, 2 * F, E, 1.0f, a.xn2.data(), E, W.gu.data(), E, 0.0f, a.gu.data(), 2 * F);
    if (!L[kWGate].empty()) lora_fwd(d, L[kWGate], a.xn2.data(), a.u[kWGate].data(), a.gu.data(), 2 * F);
    if (!L[kWUp].empty()) lora_fwd(d, L[kWUp], a.xn2.data(), a.u[kWUp].data(), a.gu.data() + F, 2 * F);
    tbb::parallel_for(int64_t{0}, T, [&](int64_t t) {
      for (int64_t n = 0; n < F; ++n) {
        const float g = a.gu[t * 2 * F + n], u = a.gu[t * 2 * F + F + n];
        a.act[t * F + n] = g / (1.0f + std::exp(-g)) * u;
      }
    });
    sgemm(false, true, T, E, F, 1.0f, a.act.data(), F, W.down.data(), F, 0.0f, a.tmp.data(), E);
    if (!L[kWDown].empty()) lora_fwd(d, L[kWDown], a.act.data(), a.u[kWDown].data(), a.tmp.data(), E);
    for (int64_t i = 0; i < T * E; ++i) x[i] = a.x_mid[i] + a.tmp[i];
  }

  // Layer il's backward: dx holds d loss / d its output and becomes d loss / d its input x_in;
  // the adapter's gradients are added into g.
  void backward(int64_t il, const BaseF32& W, const float* x_in, const Acts& a, float* dx, LoraAdapter& g) {
    const Shape& d = d_;
    const int64_t T = d.T, E = d.E, Q = d.Q, KV = d.KV, F = d.F, NQKV = Q + 2 * KV;
    const auto& L = w_.layers[il];
    auto& G = g.layers[il];
    auto sz = [](int64_t n) { return static_cast<size_t>(n); };
    // MLP: dx is also the down projection's output gradient.
    sc_.dact.resize(sz(T * F));
    sgemm(false, false, T, F, E, 1.0f, dx, E, W.down.data(), F, 0.0f, sc_.dact.data(), F);
    if (!L[kWDown].empty()) lora_bwd(d, L[kWDown], a.act.data(), a.u[kWDown].data(), dx, E, G[kWDown], sc_.dact.data(), sc_.du);
    sc_.dgu.resize(sz(T * 2 * F));
    tbb::parallel_for(int64_t{0}, T, [&](int64_t t) {
      for (int64_t n = 0; n < F; ++n) {
        const float gt = a.gu[t * 2 * F + n], u = a.gu[t * 2 * F + F + n], da = sc_.dact[t * F + n];
        const float sig = 1.0f / (1.0f + std::exp(-gt)), silu = gt * sig;
        sc_.dgu[t * 2 * F + n] = da * u * sig * (1.0f + gt * (1.0f - sig));
        sc_.dgu[t * 2 * F + F + n] = da * silu;
      }
    });
    sc_.dxn.resize(sz(T * E));
    sgemm(false, false, T, E, 2 * F, 1.0f, sc_.dgu.data(), 2 * F, W.gu.data(), E, 0.0f, sc_.dxn.data(), E);
    if (!L[kWGate].empty()) lora_bwd(d, L[kWGate], a.xn2.data(), a.u[kWGate].data(), sc_.dgu.data(), 2 * F, G[kWGate], sc_.dxn.data(), sc_.du);
    if (!L[kWUp].empty()) lora_bwd(d, L[kWUp], a.xn2.data(), a.u[kWUp].data(), sc_.dgu.data() + F, 2 * F, G[kWUp], sc_.dxn.data(), sc_.du);
    rms_bwd(a.x_mid.data(), a.inv2.data(), W.ffn_norm, sc_.dxn.data(), T, E, dx);  // dx: now d / d x_mid
    // Attention: dx is the o projection's output gradient.
    sc_.datt.resize(sz(T * Q));
    sgemm(false, false, T, Q, E, 1.0f, dx, E, W.o.data(), Q, 0.0f, sc_.datt.data(), Q);
    if (!L[kWo].empty()) lora_bwd(d, L[kWo], a.att.data(), a.u[kWo].data(), dx, E, G[kWo], sc_.datt.data(), sc_.du);
    sc_.dq.resize(sz(T * Q)), sc_.dk.resize(sz(T * KV)), sc_.dv.resize(sz(T * KV));
    attn_bwd(d, c_.sliding_window, a.q.data(), a.k.data(), a.v.data(), sc_.datt.data(), sc_.dq.data(), sc_.dk.data(), sc_.dv.data(), sc_.p, sc_.dp);
    // RoPE is a rotation: its backward rotates by the opposite angle.
    rope(sc_.dq.data(), T, d.H, d.hd, neg_.data(), inv_freq_.data());
    rope(sc_.dk.data(), T, d.KVH, d.hd, neg_.data(), inv_freq_.data());
    sc_.dqkv.resize(sz(T * NQKV));
    put_cols(sc_.dq.data(), T, Q, sc_.dqkv.data(), NQKV, 0);
    put_cols(sc_.dk.data(), T, KV, sc_.dqkv.data(), NQKV, Q);
    put_cols(sc_.dv.data(), T, KV, sc_.dqkv.data(), NQKV, Q + KV);
    sgemm(false, false, T, E, NQKV, 1.0f, sc_.dqkv.data(), NQKV, W.qkv.data(), E, 0.0f, sc_.dxn.data(), E);
    const int64_t off[kLayerTensorCount] = {0, 0, Q, Q + KV};
    for (LayerTensor t : {kWq, kWk, kWv})
      if (!L[t].empty()) lora_bwd(d, L[t], a.xn1.data(), a.u[t].data(), sc_.dqkv.data() + off[t], NQKV, G[t], sc_.dxn.data(), sc_.du);
    rms_bwd(x_in, a.inv1.data(), W.attn_norm, sc_.dxn.data(), T, E, dx);
  }

  const Shape& shape() const { return d_; }

 private:
  const ModelConfig& c_;
  const LoraAdapter& w_;
  const TrainBatch& b_;
  std::vector<float> inv_freq_;
  Shape d_{};
  std::vector<int32_t> pos_, neg_;
  Scratch& sc_;
};

}  // namespace

struct LoraTrainer::Work {
  BaseF32 base;
  Acts acts;
  Scratch scratch;
  std::vector<float> head, xo;
  const void* head_of = nullptr;
  std::vector<std::vector<float>> xs;
};

LoraTrainer::LoraTrainer(WeightStore& ws) : store_(ws), work_(std::make_unique<Work>()) {}
LoraTrainer::~LoraTrainer() = default;

Expected<LossResult> lora_loss(WeightStore& ws, const LoraAdapter& w, const TrainBatch& batch, LoraAdapter* grad) {
  LoraTrainer t(ws);
  return t.loss(w, batch, grad);
}

Expected<LossResult> LoraTrainer::loss(const LoraAdapter& w, const TrainBatch& batch, LoraAdapter* grad) {
  WeightStore& ws = store_;
  Work& ws_ = *work_;
  const ModelConfig& c = ws.config();
  const int64_t V = c.n_vocab, E = c.n_embd;
  if (batch.rows < 1 || batch.len < 2 || static_cast<int64_t>(batch.ids.size()) != batch.rows * batch.len ||
      batch.labels.size() != batch.ids.size())
    return invalid_argument(strprintf("training batch: %lld rows of %lld tokens need as many ids and labels (got %zu, %zu) and at least 2 tokens a row",
                                      static_cast<long long>(batch.rows), static_cast<long long>(batch.len), batch.ids.size(), batch.labels.size()));
  if (static_cast<int64_t>(w.layers.size()) != c.n_layers)
    return invalid_argument(strprintf("adapter has %zu layers; the model %lld", w.layers.size(), static_cast<long long>(c.n_layers)));
  if (c.n_ctx_max > 0 && batch.len > c.n_ctx_max)
    return invalid_argument(strprintf("training rows of %lld tokens exceed the model's %lld positions (max_position_embeddings)",
                                      static_cast<long long>(batch.len), static_cast<long long>(c.n_ctx_max)));
  int64_t n_valid = 0;
  for (int64_t i = 0; i < batch.rows * batch.len; ++i) {
    if (batch.ids[i] < 0 || batch.ids[i] >= V)
      return invalid_argument(strprintf("training batch: token id %d at row %lld, position %lld is outside the vocabulary [0, %lld)", batch.ids[i],
                                        static_cast<long long>(i / batch.len), static_cast<long long>(i % batch.len), static_cast<long long>(V)));
    const int32_t l = batch.labels[i];
    if (l != kIgnoreLabel && (l < 0 || l >= V))
      return invalid_argument(strprintf("training batch: label %d at row %lld, position %lld is outside the vocabulary (and not -100)", l,
                                        static_cast<long long>(i / batch.len), static_cast<long long>(i % batch.len)));
    if (i % batch.len != 0 && l != kIgnoreLabel) ++n_valid;
  }
  if (n_valid == 0) return invalid_argument("training batch: no position is trained on (every label after the first token is -100)");

  Trainer tr(c, w, batch, ws_.scratch);
  const Shape& d = tr.shape();
  const int64_t T = d.T;
  auto sz = [](int64_t n) { return static_cast<size_t>(n); };
  // Forward: each layer's input is kept (gradient checkpointing).
  std::vector<std::vector<float>>& xs = ws_.xs;
  xs.resize(sz(c.n_layers));
  std::vector<float> x(sz(T * E));
  embedding(ws.globals()[kTokEmbd], batch.ids.data(), T, x.data());
  Acts& acts = ws_.acts;
  for (int64_t il = 0; il < c.n_layers; ++il) {
    // Up the layers; after the last, the backward's first layer to read is il - 1 (the last one's
    // weights stay in ws_.base).
    FERRY_ASSIGN_OR_RETURN(const LayerWeights* lw, ws.acquire(il, il + 1 < c.n_layers ? il + 1 : (grad ? il - 1 : 0)));
    base_f32(c, *lw, ws_.base);
    if (grad) xs[il] = x;
    tr.forward(il, ws_.base, x.data(), acts);
  }
  // Head and loss, over chunks of rows so [rows, n_vocab] logits never exist at once.
  const std::vector<float> out_norm = vec_f32(ws.globals()[kOutNorm]);
  std::vector<float> xn(sz(T * E)), inv(sz(T)), dxn(grad ? sz(T * E) : 0);
  rms_fwd(x.data(), out_norm, c.rms_norm_eps, T, E, xn.data(), inv.data());
  const TensorView& head = ws.globals()[kLmHead];
  std::vector<float>& wh = ws_.head;
  if (wh.size() != sz(V * E) || ws_.head_of != head.data) {  // the lm_head in float32, once
    wh.resize(sz(V * E));
    weight_to_f32(head, wh.data());
    ws_.head_of = head.data;
  }
  constexpr int64_t kChunk = 64;
  std::vector<float> logits(sz(std::min(T, kChunk) * V));
  double total = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0);
    sgemm(false, true, n, V, E, 1.0f, xn.data() + t0 * E, E, wh.data(), E, 0.0f, logits.data(), V);
    std::vector<double> row_loss(sz(n), 0.0);
    tbb::parallel_for(int64_t{0}, n, [&](int64_t i) {
      const int64_t t = t0 + i;
      float* lg = logits.data() + i * V;
      const bool trained = t % batch.len != batch.len - 1 && batch.labels[t + 1] != kIgnoreLabel;
      if (!trained) {
        if (grad) std::fill(lg, lg + V, 0.0f);
        return;
      }
      const int32_t y = batch.labels[t + 1];
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t v = 0; v < V; ++v) m = std::max(m, lg[v]);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v] - m));
      const double lse = std::log(sum) + m;
      row_loss[i] = lse - lg[y];
      if (grad) {
        for (int64_t v = 0; v < V; ++v) lg[v] = static_cast<float>(std::exp(lg[v] - lse) / static_cast<double>(n_valid));
        lg[y] -= static_cast<float>(1.0 / static_cast<double>(n_valid));
      }
    });
    for (double l : row_loss) total += l;
    if (grad) sgemm(false, false, n, E, V, 1.0f, logits.data(), V, wh.data(), E, 0.0f, dxn.data() + t0 * E, E);
  }
  LossResult res{total / static_cast<double>(n_valid), n_valid};
  if (!std::isfinite(res.loss)) return invalid_argument("training: the loss is not finite (NaN or infinity in the forward pass)");
  if (!grad) return res;
  // Backward, last layer first, each recomputed from its input.
  *grad = LoraAdapter::zeros(c, w.cfg);
  std::vector<float> dx(sz(T * E), 0.0f);
  rms_bwd(x.data(), inv.data(), out_norm, dxn.data(), T, E, dx.data());
  for (int64_t il = c.n_layers - 1; il >= 0; --il) {
    // The last layer's weights and activations are still those of the forward; the others are
    // recomputed from their input. Down the layers a disk-tier store reads layer il - 1 while this
    // one computes (after layer 0, layer 0 again: the next step's forward starts there).
    if (il != c.n_layers - 1) {
      FERRY_ASSIGN_OR_RETURN(const LayerWeights* lw, ws.acquire(il, il > 0 ? il - 1 : 0));
      base_f32(c, *lw, ws_.base);
      ws_.xo = xs[il];
      tr.forward(il, ws_.base, ws_.xo.data(), acts);
    }
    tr.backward(il, ws_.base, xs[il].data(), acts, dx.data(), *grad);
  }
  return res;
}

}  // namespace ferry::cpu
