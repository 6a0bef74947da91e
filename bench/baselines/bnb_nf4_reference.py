#!/usr/bin/env python3
"""Writes tests/data/bnb_nf4_dq.safetensors: bitsandbytes' NF4 with double quantisation
(quantize_4bit(blocksize=64, quant_type='nf4', compress_statistics=True), QLoRA's format) of a
deterministic 64 x 320 weight, for the test that holds ferry's codec to it byte for byte.

The input is a formula both sides compute exactly (integers, one division in double, rounded to
float32), so the file holds only bitsandbytes' outputs. Needs torch and bitsandbytes (CPU is enough):
    pip install torch bitsandbytes && python3 bench/baselines/bnb_nf4_reference.py
"""
import os
import sys

import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.numpy import save_file

ROWS, COLS = 64, 320  # 20480 elements: 320 absmax blocks, so a full and a partial block of 256


def weight():
    i = np.arange(ROWS * COLS, dtype=np.int64)
    u = ((i * 2654435761) % 1000003).astype(np.float64) / 1000003.0 - 0.5  # in [-0.5, 0.5)
    # A few rows 8x larger and one all zero: the absmax values spread, and a zero block.
    scale = np.where((i // COLS) % 9 == 4, 0.4, 0.05)
    w = (u * scale).astype(np.float32).reshape(ROWS, COLS)
    w[7, :] = 0.0
    return w


def main():
    w = weight()
    q, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert st.nested and st.state2.blocksize == 256
    absmax_f32 = F.dequantize_blockwise(st.absmax, st.state2) + st.offset  # what dequantize_4bit uses
    out = {
        "codes": q.numpy().reshape(-1).astype(np.uint8),              # two codes a byte, the first in the high nibble
        "absmax_codes": st.absmax.numpy().astype(np.uint8),           # the double-quantised absmax
        "absmax2": st.state2.absmax.numpy().astype(np.float32),       # one per 256 absmax values
        "offset": np.array([float(st.offset)], dtype=np.float32),    # their mean
        "code2": st.state2.code.numpy().astype(np.float32),           # the signed dynamic map
        "absmax": absmax_f32.numpy().astype(np.float32),             # the absmax dequantised
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data", "bnb_nf4_dq.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(out, path, metadata={"bitsandbytes": bnb.__version__, "torch": torch.__version__, "rows": str(ROWS), "cols": str(COLS)})
    print(f"wrote {os.path.normpath(path)} (bitsandbytes {bnb.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
