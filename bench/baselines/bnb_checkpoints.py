#!/usr/bin/env python3
"""Writes tests/data/bnb4-*/ and bnb8/: tiny Llama checkpoints as transformers saves a model loaded in 4
bits (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")) or 8 bits by bitsandbytes,
with reference logits, for the test that loads them into ferry.

  bnb4-nf4-dq  double-quantised absmax (bnb_4bit_use_double_quant=True, QLoRA's recipe); every Linear's
               absmax count a multiple of 256, so ferry keeps the 8-bit absmax codes as they are
  bnb4-nf4     fp32 absmax
  bnb4-gqa-dq  double-quantised, 2 K/V heads: k_proj / v_proj hold 128 absmax (not a multiple of
               256), so ferry expands the absmax to fp32 (exactly) and runs NF4
  bnb8         8-bit (load_in_8bit, LLM.int8's stored form: int8 rows and their absmax, SCB), which
               ferry runs as its int8 format (a scale a row, SCB / 127)

Each directory: config.json (with quantization_config), model.safetensors (the bnb tensors: packed
codes, absmax, quant_map, nested_absmax, nested_quant_map, quant_state.bitsandbytes__nf4; embeddings,
norms and lm_head float32 holding BF16 values), ref.safetensors (input_ids I32 [8]; logits F32 [8,
vocab]: transformers in float32 over the weights bitsandbytes' dequantize_4bit gives; logits_bnb: its
4-bit forward on the CPU). Needs torch, bitsandbytes, transformers, accelerate (CPU is enough):
    pip install torch bitsandbytes transformers accelerate && python3 bench/baselines/bnb_checkpoints.py
"""
import os
import sys
import tempfile

import torch
import bitsandbytes as bnb
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data")
IDS = [1, 17, 5, 42, 9, 33, 60, 2]


def make(name, kv_heads, double_quant, bits=4):
    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=64, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for n, p in base.named_parameters():  # random norms too, so a missing multiply shows
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in n else 0.08) + (1.0 if "norm" in n else 0.0))
            p.copy_(p.to(torch.bfloat16).float())  # BF16 values (ferry's quantised layers keep norms in BF16)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        m = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map="cpu", dtype=torch.float32)
    out = os.path.normpath(os.path.join(OUT, name))
    m.save_pretrained(out)
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    # The reference: float32 math over the weights bitsandbytes dequantises (dequantize_4bit); and, for
    # information, what transformers' own 4-bit forward gives on the CPU (bitsandbytes' CPU kernels do not
    # keep float32 precision: ~1e-2 from the first here).
    f32 = LlamaForCausalLM(cfg).to(torch.float32)
    quantised = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    sd = {n: p.data.float() for n, p in m.named_parameters() if not isinstance(dict(m.named_modules()).get(n.rsplit(".", 1)[0]), quantised)}
    for n, mod in m.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            sd[n + ".weight"] = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        elif isinstance(mod, bnb.nn.Linear8bitLt):  # int8 rows, SCB their absmax: w = q * SCB / 127
            sd[n + ".weight"] = mod.weight.data.float() * mod.weight.SCB.float()[:, None] / 127.0
    f32.load_state_dict(sd, strict=True)
    with torch.no_grad():
        logits = f32(torch.tensor([IDS])).logits[0].contiguous()
        logits_bnb = m(torch.tensor([IDS])).logits[0].to(torch.float32).contiguous()
    save_file({"input_ids": torch.tensor(IDS, dtype=torch.int32), "logits": logits, "logits_bnb": logits_bnb}, os.path.join(out, "ref.safetensors"),
              metadata={"bitsandbytes": bnb.__version__, "transformers": transformers.__version__, "torch": torch.__version__})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    make("bnb4-nf4-dq", 4, True)
    make("bnb4-nf4", 4, False)
    make("bnb4-gqa-dq", 2, True)
    make("bnb8", 2, False, bits=8)
