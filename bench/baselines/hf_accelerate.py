# Hugging Face accelerate baseline for `ferry sweep` (run on the GPU host):
#   python3 bench/baselines/hf_accelerate.py --model llama-2-7b --gpu-mem 8,16 --batch 1 [--new-tokens 16] [--out FILE.json]
# A Llama-shaped model with random BF16 weights (initialised on the GPU, then moved to host memory),
# dispatched by accelerate's device_map="auto" under max_memory={0: BUDGET, "cpu": ...}: the layers that
# do not fit stay in host memory and accelerate's hooks copy them to the GPU at every forward (the
# offload users get from `from_pretrained(..., device_map="auto", max_memory=...)`). Greedy generate;
# prints decode tokens/s and the peak GPU memory torch saw, and appends JSON lines to --out.
import argparse, json, time
import torch, transformers, accelerate
from accelerate import dispatch_model, infer_auto_device_map
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="llama-2-7b", choices=SHAPES)
ap.add_argument("--gpu-mem", default="8", help="GiB, comma-separated")
ap.add_argument("--batch", default="1")
ap.add_argument("--new-tokens", type=int, default=16)
ap.add_argument("--out", default="")
a = ap.parse_args()

cfg = LlamaConfig(max_position_embeddings=4096, torch_dtype="bfloat16", **SHAPES[a.model])
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
model = model.to("cpu")  # the checkpoint's place before dispatch
torch.cuda.empty_cache()
print("transformers", transformers.__version__, "accelerate", accelerate.__version__, "torch", torch.__version__, flush=True)

for gib in [float(x) for x in a.gpu_mem.split(",")]:
    dm = infer_auto_device_map(model, max_memory={0: f"{gib}GiB", "cpu": "110GiB"}, no_split_module_classes=["LlamaDecoderLayer"])
    on_gpu = sum(1 for k, v in dm.items() if "layers." in k and v == 0)
    m = dispatch_model(model, device_map=dm)
    for bs in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(3, cfg.vocab_size, (bs, 16), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            torch.cuda.synchronize(); t0 = time.time()
            m.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            torch.cuda.synchronize(); t_prefill = time.time() - t0
            t0 = time.time()
            out = m.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
            torch.cuda.synchronize(); t = time.time() - t0
        n = out.shape[1] - ids.shape[1]
        tps = bs * (n - 1) / max(t - t_prefill, 1e-9)
        peak = torch.cuda.max_memory_allocated() / 2**30
        r = dict(model=a.model, gpu_mem_gib=gib, batch=bs, layers_on_gpu=on_gpu, decode_tok_s=tps, prefill_s=t_prefill, torch_peak_gib=peak)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    accelerate.hooks.remove_hook_from_submodules(m)
    model = m.to("cpu")
    torch.cuda.empty_cache()
