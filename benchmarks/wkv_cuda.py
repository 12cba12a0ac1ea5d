"""Time RWKV-7 WKV on a CUDA GPU: fla's Triton kernel vs arwkv's chunked kernel vs softmax attention.

    python benchmarks/wkv_cuda.py [--tokens 32768] [--heads 16] [--json out.json]

Each row keeps B x T = --tokens, so the columns compare equal work per token as the context grows. Inputs are
bf16 (the log-decay w fp32), head size 64. "fwd" runs under no_grad; "fwd+bwd" backpropagates o.sum() (and
the final state for the WKV kernels). The baseline measured in the same run is causal
`scaled_dot_product_attention` (flash attention on Hopper) with the same [B, H, T, 64] q, k, v. Figures are
medians of CUDA-event timings after warm-up (Triton compiles and autotunes during the warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from arwkv.ops import wkv7  # noqa: E402


def inputs(B: int, T: int, H: int, N: int, grad: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, device="cuda", generator=g)  # noqa: E731
    kappa = F.normalize(rnd(), dim=-1)
    eta = torch.rand(B, T, H, N, device="cuda", generator=g)
    w = -math.exp(-0.5) * torch.sigmoid(2 * rnd())
    xs = [
        rnd().bfloat16(),
        w,
        rnd().bfloat16(),
        rnd().bfloat16(),
        (-kappa).bfloat16(),
        (kappa * eta).bfloat16(),
    ]
    return [x.requires_grad_(grad) for x in xs]


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def wkv_case(backend: str, B: int, T: int, H: int, N: int, grad: bool, reps: int) -> float:
    xs = inputs(B, T, H, N, grad)

    def step():
        if grad:
            o, hT = wkv7(*xs, output_final_state=True, backend=backend)
            (o.float().sum() + hT.sum()).backward()
        else:
            with torch.no_grad():
                wkv7(*xs, output_final_state=True, backend=backend)

    return median_ms(step, reps)


def sdpa_case(B: int, T: int, H: int, N: int, grad: bool, reps: int) -> float:
    q, k, v = (
        torch.randn(B, H, T, N, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)
    )

    def step():
        if grad:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
        else:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return median_ms(step, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768, help="B x T of every row")
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--backends", default="fla,chunked")
    p.add_argument("--json")
    args = p.parse_args()
    N, H = 64, args.heads
    rows = []
    for T in [int(t) for t in args.lengths.split(",")]:
        B = max(1, args.tokens // T)
        row = {"B": B, "T": T, "H": H}
        for grad, tag in ((False, "fwd"), (True, "fwd+bwd")):
            row[f"sdpa {tag}"] = sdpa_case(B, T, H, N, grad, args.reps)
            for be in args.backends.split(","):
                reps = args.reps if be == "fla" else max(2, args.reps // 3)
                row[f"{be} {tag}"] = wkv_case(be, B, T, H, N, grad, reps)
        rows.append(row)
        print(row, flush=True)
    cols = [c for c in rows[0] if c not in ("B", "T", "H")]
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, head size 64, H={H}, ms (x SDPA)"
    )
    print("| B x T | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            base = r["sdpa " + c.split(" ", 1)[1]]
            cells.append(f"{r[c]:.2f} ({r[c] / base:.2f}x)")
        print(f"| {r['B']} x {r['T']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
