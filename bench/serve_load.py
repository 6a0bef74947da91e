#!/usr/bin/env python3
"""Load for `ferry serve`: N requests, C at a time, each a prompt of P random token ids and exactly G
generated tokens (ignore_eos), streamed. Prints (and with --json writes) requests/s, generated tok/s,
time to first token and the time between tokens; with --reference, the same requests as a JSONL file
for throughput mode (`ferry run --prompts`), the engine without HTTP, to put the two side by side.

    ferry serve -m synthetic:llama-2-7b --layers 2 --batch 8 --ctx 512 --port 8080 &
    python3 bench/serve_load.py --url http://127.0.0.1:8080 --requests 32 --concurrency 8 --prompt-tokens 64 --max-tokens 64

Standard library only.
"""
import argparse
import json
import random
import statistics
import sys
import threading
import time
import urllib.request


def one(url, ids, max_tokens, out):
    body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, stamps, usage = None, [], None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            j = json.loads(line[6:])
            if "error" in j:
                raise RuntimeError(j["error"]["message"])
            if j.get("usage"):
                usage = j["usage"]
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
            stamps.append(now)
    out.append({"ttft_s": first, "latency_s": time.perf_counter() - t0, "tokens": usage["completion_tokens"] if usage else None,
                "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])]})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt ids are drawn from [3, vocab)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared-prefix", type=int, default=0, help="the first N prompt ids are the same in every request (a system prompt)")
    ap.add_argument("--reference", help="also write the requests as JSONL for `ferry run --prompts`")
    ap.add_argument("--json", help="write the summary as JSON")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    shared = [rng.randrange(3, a.vocab) for _ in range(min(a.shared_prefix, a.prompt_tokens))]
    prompts = [shared + [rng.randrange(3, a.vocab) for _ in range(a.prompt_tokens - len(shared))] for _ in range(a.requests)]
    if a.reference:
        with open(a.reference, "w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"id": i, "ids": p, "max_tokens": a.max_tokens}) + "\n")
    results, errors, lock = [], [], threading.Lock()
    todo = list(range(a.requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                one(a.url, prompts[i], a.max_tokens, results)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        print("errors:", errors[:3], file=sys.stderr)
        sys.exit(1)
    gen = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps_s"])
    s = {"requests": a.requests, "concurrency": a.concurrency, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens, "shared_prefix": len(shared),
         "wall_s": wall, "requests_per_s": a.requests / wall, "generated_tok_per_s": gen / wall,
         "ttft_ms": {"mean": 1e3 * statistics.mean(ttft), "p50": 1e3 * ttft[len(ttft) // 2], "p90": 1e3 * ttft[min(len(ttft) - 1, len(ttft) * 9 // 10)]},
         "inter_token_ms": {"p50": 1e3 * gaps[len(gaps) // 2], "p90": 1e3 * gaps[min(len(gaps) - 1, len(gaps) * 9 // 10)]} if gaps else None}
    print("%d requests (%d at a time, %d prompt (%d shared) + %d generated tokens each) in %.2f s: %.2f req/s, %.1f generated tok/s; "
          "TTFT mean %.0f ms p50 %.0f p90 %.0f; between tokens p50 %.1f ms p90 %.1f" %
          (a.requests, a.concurrency, a.prompt_tokens, len(shared), a.max_tokens, wall, s["requests_per_s"], s["generated_tok_per_s"], s["ttft_ms"]["mean"],
           s["ttft_ms"]["p50"], s["ttft_ms"]["p90"], s["inter_token_ms"]["p50"] if gaps else 0, s["inter_token_ms"]["p90"] if gaps else 0))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
