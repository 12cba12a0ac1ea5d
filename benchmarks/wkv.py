"""Time the RWKV-7 WKV operator on CPU: the C++ kernel, the chunked PyTorch kernel, the per-token PyTorch
recurrence and causal softmax attention (SDPA), at the same shapes.

    python benchmarks/wkv.py [--quick] [--threads 1 --clock cpu] [--batch 4 --heads 9] [--json out.json]

Forward timings run under torch.no_grad (inference); forward+backward ("fwd+bwd") under autograd with
o.sum() as the loss (for SDPA the same q, k, v shapes, [B, H, T, N], is_causal=True). Every figure is the best
of several runs (wall clock). Combinations too slow to run are measured at a smaller T and scaled linearly
(both the recurrence and its autograd are exactly linear in T): such cells are marked `~` in the table and
carry "extrapolated_from" in the JSON. Compare ratios measured in the same run; absolute times depend on load.

FLOPs of the chunked forward (multiply-adds x 2, per head, per chunk of C tokens, head size d, as computed by
arwkv/ops/wkv7/chunked.py): intra-chunk 9·C²·d (the 2C x 2C product, A_ak·V, T·[Ã | A_ak·V], A_qk·V, A_qb·U),
state terms 4·C·d² (K̂ᵀV, W·h, B̂ᵀU, R̃·h) and the UT inverse (2·ceil(log2 C)−2)·C³ for C ≤ 16 (blocks of 16
for longer chunks). Element-wise work is not counted. FLOPs of the native forward (arwkv/ops/wkv7/
wkv7_cpu.cpp, per token and head): the state read hᵀa (2·d²), the update diag(w)h + kvᵀ + buᵀ (5·d²) and the
output hᵀr (2·d²), 9·d² in all. "matmul" is a square fp32 matmul of size 1024 timed in the same run;
"% matmul" is a forward's achieved GFLOP/s relative to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

from arwkv.ops.wkv7 import CHUNK_SIZE_DEFAULT
from arwkv.ops.wkv7.chunked import wkv7_chunked
from arwkv.ops.wkv7.naive import wkv7_recurrent
from arwkv.ops.wkv7.native import native_problem, wkv7_native

CHUNKS = (16, 32, 64)
# largest T measured directly; beyond it the linear extrapolation is used
REC_FWD_MAX_T = 2048
REC_BWD_MAX_T = 512


def inv_macs(C: int) -> int:
    """Multiply-adds of chunked._wkv7_inv_unit_lower for one C x C matrix."""
    if C <= 16:
        return 2 * max(0, (C - 1).bit_length() - 1) * C**3
    nb = -(-C // 16)
    return nb * inv_macs(16) + sum(16 * (i * 16) ** 2 + 16 * 16 * i * 16 for i in range(1, nb))


def chunked_flops(B: int, T: int, H: int, d: int, C: int) -> float:
    chunks = B * H * math.ceil(T / C)
    return 2.0 * chunks * (9 * C * C * d + 4 * C * d * d + inv_macs(C))


def native_flops(B: int, T: int, H: int, d: int) -> float:
    return 9.0 * B * T * H * d * d


def make_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, generator=g)
    kappa = F.normalize(rnd(), dim=-1)
    eta = torch.rand(B, T, H, N, generator=g)
    w = -math.exp(-0.5) * torch.sigmoid(2 * rnd())  # log-decay inside RWKV-7's clamp, kept fp32
    xs = [
        rnd().to(dtype),
        w,
        (0.5 * rnd()).to(dtype),
        rnd().to(dtype),
        (-kappa).to(dtype),
        (kappa * eta).to(dtype),
    ]
    return [x.requires_grad_(grad) for x in xs]


CLOCK = time.perf_counter


def best_ms(fn, reps: int, warmup: bool = True) -> float:
    if warmup:  # allocator, kernels
        fn()
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return 1e3 * min(times)


def fwd(fn):
    def run():
        with torch.no_grad():
            fn()

    return run


def fwd_bwd(fn, leaves):
    def run():
        for x in leaves:
            x.grad = None  # as in training: no accumulation into earlier gradients
        out = fn()
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    return run


def matmul_gflops(reps: int) -> float:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / (best_ms(lambda: a @ b, reps) * 1e-3) / 1e9


def bench(args) -> dict:
    B, H, N = args.batch, args.heads, args.head_size
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = []

    def record(dtype_name, T, impl, mode, ms, measured_T):
        row = dict(dtype=dtype_name, T=T, impl=impl, mode=mode, ms=ms * T / measured_T)
        if measured_T != T:
            row["extrapolated_from"] = measured_T
        results.append(row)
        mark = "~" if measured_T != T else " "
        print(f"  {dtype_name} T={T:5d} {impl:10s} {mode:7s} {mark}{row['ms']:10.1f} ms", flush=True)

    matmul = matmul_gflops(args.reps)
    print(f"matmul fp32 1024^3: {matmul:.1f} GFLOP/s", flush=True)
    for dname in args.dtypes:
        dtype = dtypes[dname]
        for T in args.T:
            xs = make_inputs(B, T, H, N, dtype, grad=False)
            xg = make_inputs(B, T, H, N, dtype, grad=True)
            if native_problem() is None:
                record(dname, T, "native", "fwd", best_ms(fwd(lambda xs=xs: wkv7_native(*xs)), args.reps), T)
                record(
                    dname,
                    T,
                    "native",
                    "fwd+bwd",
                    best_ms(fwd_bwd(lambda xg=xg: wkv7_native(*xg), xg), args.reps),
                    T,
                )
            for C in CHUNKS:
                record(
                    dname,
                    T,
                    f"chunk{C}",
                    "fwd",
                    best_ms(fwd(lambda C=C, xs=xs: wkv7_chunked(*xs, chunk_size=C)), args.reps),
                    T,
                )
                record(
                    dname,
                    T,
                    f"chunk{C}",
                    "fwd+bwd",
                    best_ms(fwd_bwd(lambda C=C, xg=xg: wkv7_chunked(*xg, chunk_size=C), xg), args.reps),
                    T,
                )
            q, qg = (
                torch.randn(B, H, T, N, dtype=dtype),
                torch.randn(B, H, T, N, dtype=dtype, requires_grad=True),
            )
            long = T >= 8192  # one run, no warm-up: seconds to a minute each (bf16 backward on CPU is slow)
            sdpa_reps = 1 if long else args.reps
            record(
                dname,
                T,
                "sdpa",
                "fwd",
                best_ms(
                    fwd(lambda q=q: F.scaled_dot_product_attention(q, q, q, is_causal=True)),
                    sdpa_reps,
                    not long,
                ),
                T,
            )
            record(
                dname,
                T,
                "sdpa",
                "fwd+bwd",
                best_ms(
                    fwd_bwd(lambda qg=qg: F.scaled_dot_product_attention(qg, qg, qg, is_causal=True), [qg]),
                    sdpa_reps,
                    not long,
                ),
                T,
            )
            Tf = min(T, REC_FWD_MAX_T)
            xs_r = [x[:, :Tf] for x in xs]
            record(dname, T, "recurrent", "fwd", best_ms(fwd(lambda xs_r=xs_r: wkv7_recurrent(*xs_r)), 1), Tf)
            Tb = min(T, REC_BWD_MAX_T)
            xg_r = [x[:, :Tb].detach().requires_grad_() for x in xg]
            record(
                dname,
                T,
                "recurrent",
                "fwd+bwd",
                best_ms(fwd_bwd(lambda xg_r=xg_r: wkv7_recurrent(*xg_r), xg_r), 1),
                Tb,
            )
    for row in results:
        if row["mode"] != "fwd" or not (row["impl"].startswith("chunk") or row["impl"] == "native"):
            continue
        if row["impl"] == "native":
            flops = native_flops(B, row["T"], H, N)
        else:
            flops = chunked_flops(B, row["T"], H, N, int(row["impl"][5:]))
        gf = flops / (row["ms"] * 1e-3) / 1e9
        row["gflops"], row["matmul_fraction"] = gf, gf / matmul
    return dict(
        config=dict(
            B=B,
            H=H,
            N=N,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            cpu=platform.processor() or platform.machine(),
            cores=os.cpu_count(),
            loadavg_start=args.load0,
            loadavg_end=os.getloadavg(),
            reps=args.reps,
            default_chunk=CHUNK_SIZE_DEFAULT,
            clock=args.clock,
        ),
        matmul_gflops=matmul,
        results=results,
    )


def table(report: dict) -> str:
    res = {(r["dtype"], r["T"], r["impl"], r["mode"]): r for r in report["results"]}
    impls = ["recurrent", *(f"chunk{C}" for C in CHUNKS), "native", "sdpa"]
    lines = []
    for dtype in sorted({r["dtype"] for r in report["results"]}, reverse=True):
        for mode in ("fwd", "fwd+bwd"):
            lines.append(f"\n{dtype} {mode} (ms; ~ = extrapolated linearly from a shorter T)")
            lines.append(
                "     T "
                + "".join(f"{i:>12s}" for i in impls)
                + "  sdpa/native sdpa/chunk"
                + str(CHUNK_SIZE_DEFAULT)
            )
            for T in sorted({r["T"] for r in report["results"]}):
                cells, row = [], {i: res.get((dtype, T, i, mode)) for i in impls}
                for i in impls:
                    r = row[i]
                    cells.append(
                        f"{'~' if r and 'extrapolated_from' in r else ''}{r['ms']:.1f}" if r else "-"
                    )
                ratios = "".join(
                    f"{row['sdpa']['ms'] / row[i]['ms']:11.2f}x" if row[i] else f"{'-':>12s}"
                    for i in ("native", f"chunk{CHUNK_SIZE_DEFAULT}")
                )
                lines.append(f"{T:6d} " + "".join(f"{x:>12s}" for x in cells) + " " + ratios)
    lines.append(f"\nforward GFLOP/s (fp32 matmul: {report['matmul_gflops']:.1f} GFLOP/s)")
    for r in report["results"]:
        if "gflops" in r and r["dtype"] == "fp32":
            lines.append(
                f"  T={r['T']:5d} {r['impl']:8s} {r['gflops']:6.1f} GFLOP/s = "
                f"{100 * r['matmul_fraction']:4.1f}% of matmul"
            )
    return "\n".join(lines)


def targets(report: dict) -> str:
    """Issue 15's acceptance ratios (fp32, the kernel `auto` picks on CPU), where this run measured them."""
    res = {(r["dtype"], r["T"], r["impl"], r["mode"]): r for r in report["results"]}
    impl = (
        "native"
        if ("fp32", report["config"]["Ts"][0], "native", "fwd") in res
        else f"chunk{CHUNK_SIZE_DEFAULT}"
    )
    out = []

    def check(name, T, mode, need):
        a, b = res.get(("fp32", T, "sdpa", mode)), res.get(("fp32", T, impl, mode))
        if a and b:
            ratio = a["ms"] / b["ms"]
            out.append(f"  {name}: {ratio:.2f}x (need >= {need}x) {'MET' if ratio >= need else 'NOT MET'}")

    for T, need in ((512, 1), (2048, 2), (8192, 8)):
        check(f"fwd sdpa/{impl} T={T}", T, "fwd", need)
    check(f"fwd+bwd sdpa/{impl} T=512", 512, "fwd+bwd", 1)
    if report["config"]["B"] * report["config"]["H"] >= 36:  # the training shape
        for T in report["config"]["Ts"]:
            r = res.get(("fp32", T, impl, "fwd"))
            if r and "matmul_fraction" in r:
                f = r["matmul_fraction"]
                verdict = "MET" if f >= 0.4 else "NOT MET"
                out.append(f"  {impl} T={T} at {100 * f:.0f}% of matmul (need >= 40%) {verdict}")
    return f"targets (fp32, {impl}):\n" + "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T in {512, 2048}, fp32 only, fewer repetitions")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 256 512 2048 8192)")
    p.add_argument(
        "--dtypes", nargs="+", choices=["fp32", "bf16"], help="default fp32 (and bf16 unless --quick)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement (best is kept)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time (robust on a shared machine with --threads 1; sums all threads)",
    )
    args = p.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    args.T = args.T or ([512, 2048] if args.quick else [256, 512, 2048, 8192])
    args.dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    args.reps = args.reps or (2 if args.quick else 5)
    args.load0 = os.getloadavg()
    print(
        f"B={args.batch} H={args.heads} N={args.head_size} threads={args.threads} clock={args.clock} "
        f"load={args.load0}"
    )
    report = bench(args)
    report["config"]["Ts"] = args.T
    print(table(report))
    print(targets(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
