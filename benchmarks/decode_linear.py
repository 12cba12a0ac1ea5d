"""The bf16 decode linear kernel (arwkv/ops/linear) vs PyTorch's fp32 and bf16 matmul at decode shapes.

For each weight shape of the SmolLM2-135M student (and rows of x = batch), the time per call with the
weights streamed from memory (a pool of distinct weight matrices larger than the caches, as in a decode step
that reads every layer once), one thread, CPU clock:

    python benchmarks/decode_linear.py [--rows 1 4 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from arwkv.ops.linear import linear_bf16, native_linear_available

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): r/k/v/o, gate/up, down, lm_head


def per_call(fn, weights: list[torch.Tensor], repeats: int = 3) -> float:
    fn(weights[0])
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        for w in weights:
            fn(w)
        best = min(best, (time.process_time() - c0) / len(weights))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--pool-mb", type=int, default=256, help="bf16 megabytes of distinct weights per shape")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not native_linear_available():
        print("the native linear kernel is unavailable here (no g++?)")
        return 1
    torch.set_num_threads(1)
    rows_out = []
    with torch.inference_mode():
        for O, I in SHAPES:
            n = max(2, args.pool_mb * 2**20 // (O * I * 2))
            wb = [torch.randn(O, I).bfloat16() for _ in range(n)]
            wf = [w.float() for w in wb]
            for rows in args.rows:
                x = torch.randn(rows, I)
                t_native = per_call(lambda w, x=x: linear_bf16(x, w), wb)
                xb = x.bfloat16()
                t_bf16 = per_call(lambda w, xb=xb: F.linear(xb, w), wb)
                t_fp32 = per_call(lambda w, x=x: F.linear(x, w), wf)
                rows_out.append(
                    dict(
                        out=O, inp=I, rows=rows,
                        native_us=round(t_native * 1e6, 1), torch_bf16_us=round(t_bf16 * 1e6, 1),
                        torch_fp32_us=round(t_fp32 * 1e6, 1),
                        native_gb_s=round(O * I * 2 / t_native / 1e9, 2),
                        fp32_gb_s=round(O * I * 4 / t_fp32 / 1e9, 2),
                        native_over_fp32=round(t_fp32 / t_native, 2),
                    )
                )  # fmt: skip
    header = f"{'out x in':>12s} {'rows':>4s} {'native us':>10s} {'torch bf16 us':>14s}"
    header += f" {'torch fp32 us':>14s} {'native GB/s':>11s} {'fp32 GB/s':>10s} {'native / fp32':>13s}"
    print(header)
    for r in rows_out:
        print(
            f"{r['out']:>6d}x{r['inp']:<5d} {r['rows']:4d} {r['native_us']:10.1f} {r['torch_bf16_us']:14.1f} "
            f"{r['torch_fp32_us']:14.1f} {r['native_gb_s']:11.2f} {r['fp32_gb_s']:10.2f} "
            f"{r['native_over_fp32']:12.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"threads": 1, "rows": rows_out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
