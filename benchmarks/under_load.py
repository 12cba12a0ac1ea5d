"""The CPU WKV kernels and a short distillation when another process keeps one core busy.

    python benchmarks/under_load.py [--json out.json] [--quick]

A shared machine is the common case (data loading, a second job, a browser), and thread barriers make
fine-grained parallel code collapse there: a thread that the OS deschedules stalls every op. Measured:

1. The WKV-7 forward (B=1, H=12, N=64, fp32) of the native C++ kernel and of the chunked PyTorch kernel at
   T = 2048 and 8192: idle with one torch thread, and with one busy-loop process running at torch's default
   thread count (one per core). Wall clock, best of several runs. Target: loaded within 1.5x of idle.
2. Distillation tokens/s (`benchmarks/distill_throughput.py --stages distill`, a stories260K-shaped teacher:
   5 layers, 64 wide, 8 heads, vocab 512) idle and loaded, at the default thread count, for the native and
   the chunked kernel, and for the native kernel with the training loop's thread tuning (recipe key
   `thread_tuning: true`, arwkv/train/threads.py; its first probe is left out of the timing, its later ones
   cost about 4 of every 104 steps). Target: loaded loses at most 2x.

The busy process is this script's own child (`python -c "while True: pass"`), killed when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wkv import make_inputs  # noqa: E402

from arwkv.ops.wkv7.chunked import wkv7_chunked  # noqa: E402
from arwkv.ops.wkv7.native import native_problem, wkv7_native  # noqa: E402

KERNELS = {"native": wkv7_native, "chunked": wkv7_chunked}
STORIES260K = ["--layers", "5", "--hidden", "64", "--intermediate", "172", "--heads", "8", "--kv-heads", "4"]


class BusyCore:
    """One process spinning on a core for the duration of a `with` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let the scheduler place it
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def best_wall_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def kernel_rows(Ts: list[int], reps: int, default_threads: int) -> list[dict]:
    rows = []
    for T in Ts:
        xs = make_inputs(1, T, 12, 64, torch.float32, grad=False)
        for name, fn in KERNELS.items():
            if name == "native" and native_problem() is not None:
                continue

            def call(fn=fn, xs=xs):
                with torch.no_grad():
                    fn(*xs)

            torch.set_num_threads(1)
            idle = best_wall_ms(call, reps)
            torch.set_num_threads(default_threads)
            idle_default = best_wall_ms(call, reps)
            with BusyCore():
                loaded = best_wall_ms(call, reps)
            row = dict(kernel=name, T=T, idle_1thread_ms=idle, idle_default_ms=idle_default, loaded_ms=loaded)
            row["loaded_over_idle_1thread"] = loaded / idle
            rows.append(row)
            print(
                f"  {name:8s} T={T:5d}: idle 1 thread {idle:8.1f} ms, idle {default_threads} threads "
                f"{idle_default:8.1f} ms, loaded {loaded:8.1f} ms = {loaded / idle:5.2f}x idle",
                flush=True,
            )
    return rows


def distill_rows(threads: int, steps: int) -> list[dict]:
    rows = []
    script = Path(__file__).resolve().parent / "distill_throughput.py"
    for backend, tuning in (("native", False), ("native", True), ("chunked", False)):
        if backend == "native" and native_problem() is not None:
            continue
        result = {}
        for state in ("idle", "loaded"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                cmd = [sys.executable, str(script), "--stages", "distill", "--vocab", "512", *STORIES260K]
                cmd += ["--seq-len", "256", "--batch", "8", "--steps", str(steps), "--device", "cpu"]
                cmd += ["--threads", str(threads), "--wkv-backend", backend, "--json", str(out)]
                cmd += ["--thread-tuning", "--warmup", "4"] if tuning else []
                if state == "loaded":
                    with BusyCore():
                        subprocess.run(cmd, check=True, capture_output=True)
                else:
                    subprocess.run(cmd, check=True, capture_output=True)
                result[state] = json.loads(out.read_text())["stages"]["distill"]["tok_per_s"]
        row = dict(backend=backend, thread_tuning=tuning, idle_tok_per_s=result["idle"])
        row["loaded_tok_per_s"] = result["loaded"]
        row["idle_over_loaded"] = result["idle"] / result["loaded"]
        rows.append(row)
        name = backend + (" + thread tuning" if tuning else "")
        print(
            f"  distill {name:24s}: idle {result['idle']:8.0f} tok/s, loaded {result['loaded']:8.0f} tok/s "
            f"(loses {row['idle_over_loaded']:.2f}x)",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T=2048 only, fewer repetitions and steps")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    default_threads = torch.get_num_threads()
    load0 = os.getloadavg()
    print(f"default torch threads {default_threads}, cores {os.cpu_count()}, load {load0}", flush=True)
    kernels = kernel_rows([2048] if args.quick else [2048, 8192], 3 if args.quick else 5, default_threads)
    distill = distill_rows(default_threads, 3 if args.quick else 6)
    print("\ntargets:")
    for r in kernels:
        ratio = r["loaded_over_idle_1thread"]
        ok = "MET" if ratio <= 1.5 else "NOT MET"
        print(f"  {r['kernel']} T={r['T']}: loaded {ratio:.2f}x idle (need <= 1.5x) {ok}")
    for r in distill:
        ok = "MET" if r["idle_over_loaded"] <= 2 else "NOT MET"
        name = r["backend"] + (" + thread tuning" if r["thread_tuning"] else "")
        print(f"  distill {name}: loses {r['idle_over_loaded']:.2f}x (need <= 2x) {ok}")
    if args.json:
        report = dict(
            default_threads=default_threads,
            cores=os.cpu_count(),
            torch=torch.__version__,
            loadavg_start=load0,
            kernels=kernels,
            distill=distill,
        )
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
