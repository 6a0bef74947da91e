# Hugging Face transformers baseline (run on the GPU host: python3 bench/baselines/hf_generate.py): a Llama-2-7B-shaped model (random weights, initialised on the
# GPU), BF16, greedy generate at batch 1 and 16. Prints decode tokens/s.
import time, torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, torch_dtype="bfloat16")
torch.set_default_device("cuda")
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
print("transformers", transformers.__version__, "torch", torch.__version__)
for bs in (1, 16):
    ids = torch.randint(3, 32000, (bs, 27), device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize(); t0 = time.time()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize(); t_prefill = time.time() - t0
        t0 = time.time()
        out = model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
        torch.cuda.synchronize(); t = time.time() - t0
    n = out.shape[1] - ids.shape[1]
    print(f"HF generate bs={bs}: {n} new tokens each in {t:.2f} s -> decode ~{bs*(n-1)/(t - t_prefill):.1f} tok/s (prefill {t_prefill*1e3:.0f} ms)")
