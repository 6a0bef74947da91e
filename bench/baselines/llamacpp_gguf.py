#!/usr/bin/env python3
"""Writes a synthetic GGUF for the llama.cpp peer (issue 19): a Llama-shaped model with random
quantised weights, laid out and typed the way llama.cpp's own `llama-quantize` lays out a real
checkpoint, so `llama-bench` times it exactly as it would time the real thing.

    python3 bench/baselines/llamacpp_gguf.py --preset llama-3-70b --type q4_0   --out /tmp/70b-q4_0.gguf
    python3 bench/baselines/llamacpp_gguf.py --preset llama-3-70b --type q4_k_m --out /tmp/70b-q4_k_m.gguf

No real weights can reach the GPU host, and llama.cpp cannot random-initialise a model, so this file
is the peer's stand-in for `convert_hf_to_gguf.py` + `llama-quantize`. Needs only numpy.

- Tensor types follow llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) for the two file types:
  Q4_0: every Linear Q4_0, output.weight Q6_K, token_embd Q4_0, norms F32.
  Q4_K_M: Linears Q4_K; ffn_down Q6_K on the layers use_more_bits picks (the first and last eighth,
  every third between), otherwise Q4_K; attn_v Q6_K on those layers, otherwise Q5_K (the 70B rule
  and Q4_K_M's, which bump a Q4_K attn_v); output.weight Q6_K; token_embd Q4_K.
- Quant blocks are random bytes with every fp16 scale set to a small finite value, so decoding gives
  finite weights and the kernels see ordinary data (speed does not depend on the values).
- The vocabulary is a placeholder SentencePiece one of the right size (llama-bench feeds random token
  ids and never tokenises text): <unk> <s> </s>, the 256 byte tokens, then "t<i>".
"""
import argparse
import os
import struct
import sys

import numpy as np

PRESETS = {
    "tiny": (2, 256, 512, 4, 2, 1000, 10000.0, 512),  # for checking the writer
    # n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, rope_theta, n_ctx_train
    "llama-2-7b": (32, 4096, 11008, 32, 32, 32000, 10000.0, 4096),
    "llama-3-8b": (32, 4096, 14336, 32, 8, 128256, 500000.0, 8192),
    "llama-3-70b": (80, 8192, 28672, 64, 8, 128256, 500000.0, 8192),
}

# ggml type id: (elements per block, bytes per block, [(byte offset of an fp16 scale in the block)])
F32, Q4_0, Q4_K, Q5_K, Q6_K = 0, 2, 12, 13, 14
BLOCK = {
    Q4_0: (32, 18, [0]),          # d, qs[16]
    Q4_K: (256, 144, [0, 2]),     # d, dmin, scales[12], qs[128]
    Q5_K: (256, 176, [0, 2]),     # d, dmin, scales[12], qh[32], qs[128]
    Q6_K: (256, 210, [208]),      # ql[128], qh[64], scales[16], d
}
FILE_TYPE = {"q4_0": 2, "q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q4_0, LLAMA_FTYPE_MOSTLY_Q4_K_M
ALIGN = 32

# GGUF metadata value types
U32, I32, F32V, STR, ARR = 4, 5, 6, 8, 9


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gstr(key) + struct.pack("<I", vtype)
    if vtype == U32:
        return out + struct.pack("<I", value)
    if vtype == F32V:
        return out + struct.pack("<f", value)
    if vtype == STR:
        return out + gstr(value)
    etype, items = value
    out += struct.pack("<IQ", etype, len(items))
    if etype == STR:
        return out + b"".join(gstr(x) for x in items)
    return out + np.asarray(items, dtype={F32V: "<f4", I32: "<i4"}[etype]).tobytes()


def tensors(preset, ftype):
    L, E, FF, H, HKV, V, _, _ = PRESETS[preset]
    kvd = E // H * HKV
    lin = Q4_0 if ftype == "q4_0" else Q4_K
    yield "token_embd.weight", (E, V), lin
    for i in range(L):
        more = use_more_bits(i, L)
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (E,), F32
        yield p + "attn_q.weight", (E, E), lin
        yield p + "attn_k.weight", (E, kvd), lin
        v = lin if ftype == "q4_0" else (Q6_K if more else (Q5_K if preset == "llama-3-70b" else Q4_K))
        yield p + "attn_v.weight", (E, kvd), v
        yield p + "attn_output.weight", (E, E), lin
        yield p + "ffn_norm.weight", (E,), F32
        yield p + "ffn_gate.weight", (E, FF), lin
        yield p + "ffn_up.weight", (E, FF), lin
        yield p + "ffn_down.weight", (FF, E), (Q6_K if (ftype == "q4_k_m" and more) else lin)
    yield "output_norm.weight", (E,), F32
    yield "output.weight", (E, V), Q6_K


def nbytes(shape, t):
    n = int(np.prod(shape))
    if t == F32:
        return 4 * n
    per, size, _ = BLOCK[t]
    assert shape[0] % per == 0, (shape, t)
    return n // per * size


def pattern(t, rng, size=64 << 20):
    """A buffer of whole blocks: random bytes, each fp16 scale a small finite value."""
    if t == F32:
        return np.ones(size // 4, dtype="<f4").tobytes()
    per, bsz, scales = BLOCK[t]
    blocks = rng.integers(0, 256, size=(size // bsz, bsz), dtype=np.uint8)
    for off in scales:
        d = (rng.random(blocks.shape[0]) * 2e-3 + 1e-3).astype("<f2").view(np.uint8).reshape(-1, 2)
        blocks[:, off:off + 2] = d
    return blocks.tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="llama-3-70b")
    ap.add_argument("--type", choices=FILE_TYPE, default="q4_0")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    L, E, FF, H, HKV, V, theta, ctx = PRESETS[a.preset]

    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"t{i}" for i in range(len(toks), V)]
    ttype = [2, 3, 3] + [6] * 256 + [1] * (V - 259)  # UNKNOWN, CONTROL, BYTE, NORMAL
    meta = [
        kv("general.architecture", STR, "llama"),
        kv("general.name", STR, f"synthetic {a.preset} {a.type}"),
        kv("general.file_type", U32, FILE_TYPE[a.type]),
        kv("general.alignment", U32, ALIGN),
        kv("llama.context_length", U32, ctx),
        kv("llama.embedding_length", U32, E),
        kv("llama.block_count", U32, L),
        kv("llama.feed_forward_length", U32, FF),
        kv("llama.attention.head_count", U32, H),
        kv("llama.attention.head_count_kv", U32, HKV),
        kv("llama.rope.freq_base", F32V, theta),
        kv("llama.rope.dimension_count", U32, E // H),
        kv("llama.attention.layer_norm_rms_epsilon", F32V, 1e-5),
        kv("llama.vocab_size", U32, V),
        kv("tokenizer.ggml.model", STR, "llama"),
        kv("tokenizer.ggml.tokens", ARR, (STR, toks)),
        kv("tokenizer.ggml.scores", ARR, (F32V, [-float(i) for i in range(V)])),
        kv("tokenizer.ggml.token_type", ARR, (I32, ttype)),
        kv("tokenizer.ggml.unknown_token_id", U32, 0),
        kv("tokenizer.ggml.bos_token_id", U32, 1),
        kv("tokenizer.ggml.eos_token_id", U32, 2),
    ]
    ts = list(tensors(a.preset, a.type))
    infos, off = [], 0
    for name, shape, t in ts:
        infos.append(gstr(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                     + struct.pack("<IQ", t, off))
        off += (nbytes(shape, t) + ALIGN - 1) // ALIGN * ALIGN
    head = b"GGUF" + struct.pack("<IQQ", 3, len(ts), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * (-len(head) % ALIGN)

    rng = np.random.default_rng(19)
    pats = {t: pattern(t, rng) for t in {t for _, _, t in ts}}
    tmp = a.out + ".part"
    with open(tmp, "wb") as f:
        f.write(head)
        for name, shape, t in ts:
            n, pat = nbytes(shape, t), memoryview(pats[t])
            while n > 0:
                k = min(n, len(pat))
                f.write(pat[:k])
                n -= k
            f.write(b"\0" * (-nbytes(shape, t) % ALIGN))
    os.replace(tmp, a.out)
    params = sum(int(np.prod(s)) for _, s, _ in ts)
    print(f"wrote {a.out}: {a.preset} {a.type}, {len(ts)} tensors, {params / 1e9:.2f} B params, "
          f"{os.path.getsize(a.out) / 2**30:.2f} GiB", file=sys.stderr)


if __name__ == "__main__":
    main()
