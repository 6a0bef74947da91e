#!/usr/bin/env python3
"""Does peft load an adapter `ferry finetune` wrote, and compute what ferry computes with it?

Loads MODEL_DIR with transformers (float32), the adapter with peft's PeftModel.from_pretrained, and
compares the logits of --ids with LOGITS (from `ferry logits -m MODEL_DIR --lora ADAPTER --ids ...
--out LOGITS`). Prints max |diff| / max |ref| and top-1 agreement; exits 1 above --tol.

  python3 bench/baselines/peft_check.py MODEL_DIR ADAPTER_DIR LOGITS.safetensors --ids 1,5,9 [--tol 1e-4]

Needs torch, transformers, peft and safetensors (the GPU host has them; CPU math is used).
"""
import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("adapter")
    ap.add_argument("logits")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    ids = torch.tensor([[int(x) for x in a.ids.split(",")]])
    base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        ref = model(ids).logits[0].float()
    got = load_file(a.logits)["logits"].float()
    if got.shape != ref.shape:
        print(f"shape: ferry {tuple(got.shape)}, peft {tuple(ref.shape)}")
        return 1
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"peft loaded {n_lora} LoRA tensors; ferry vs peft logits: max|diff|/max|ref| {rel:.3e}, top-1 agreement {top1:.3f}")
    with model.disable_adapter(), torch.no_grad():
        off = model(ids).logits[0].float()
    moved = ((off - ref).abs().max() / ref.abs().max()).item()
    print(f"the adapter moves peft's logits by {moved:.3e} (so the comparison is not of the base alone)")
    return 0 if rel <= a.tol and moved > 10 * rel else 1


if __name__ == "__main__":
    sys.exit(main())
