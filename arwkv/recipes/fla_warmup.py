"""Compile fla's RWKV-7 kernels for exactly the signatures a conversion and decoding use, within a budget.

    python -m arwkv.recipes.fla_warmup [--heads 9] [--budget-s 150] [--json warmup.json] [--no-model]

Triton compiles one binary per kernel and signature (dtypes, constexpr shapes such as H, K and the chunk size,
flags such as "has an initial state" or "packed sequences"), and caches it on disk under $TRITON_CACHE_DIR
(keep that one absolute path, and one environment — TRITON_F32_DEFAULT is part of the key — for every later
step). With $ARWKV_FLA_PIN=1 (`fla_pin.py`) each kernel compiles once per signature instead of being
autotuned over up to 135 configs.

Signatures warmed, head size 64, bf16 inputs with an fp32 log-decay: the op with and without an initial state,
with packed sequences (`cu_seqlens`), forward + backward, and with the dtype mix the student hands fla under
bf16 autocast (`MODEL_DTYPES`: r, v bf16; w, k, a, b fp32); a no-grad prefill; the fused recurrent decode
step. Then (unless --no-model) a one-layer student of the teacher's width
built like the recipes build it, forward + backward under bf16 autocast, with documents packed in a row, and
two greedily decoded tokens: the dtypes the model itself hands to fla.

Prints one line per signature and per compiled kernel (seconds), writes --json, and exits 0. If the budget
runs out first it prints one line naming the kernels compiled so far and the one still compiling, writes
the JSON with "over_budget": true and exits 3 (a watchdog thread: a Triton compile cannot be interrupted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

EXIT_OVER_BUDGET = 3
EXIT_NO_FLA = 2


class Warmup:
    """Runs the signatures one by one and keeps the record the JSON and the over-budget line are made of."""

    def __init__(self, budget_s: float, json_path: str | None) -> None:
        from arwkv.ops.wkv7 import fla_pin

        self.budget_s, self.json_path = budget_s, json_path
        self.t0 = time.perf_counter()
        self.log = fla_pin.CompileLog()
        self.record: dict[str, Any] = {"budget_s": budget_s, "signatures": [], "over_budget": False}
        self.current: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def compiled_line(self) -> str:
        done = [f"{k.kernel} ({k.compile_s:.1f} s)" for k in self.log.compiled()]
        return ", ".join(done) if done else "nothing"

    def write(self) -> None:
        from arwkv.ops.wkv7 import fla_pin

        with self._lock:
            self.record["elapsed_s"] = self.elapsed()
            self.record["kernels"] = self.log.as_dict()
            self.record["compile_s_total"] = sum(k.compile_s for k in self.log.kernels.values())
            try:
                self.record["autotuned"] = fla_pin.autotuned_kernels()
            except Exception:  # triton missing: nothing was tuned
                self.record["autotuned"] = []
            if self.json_path:
                Path(self.json_path).write_text(json.dumps(self.record, indent=2))

    def watchdog(self) -> None:
        """Stop the process when the budget is spent: Triton's compiler holds the main thread meanwhile."""
        if self._done.wait(self.budget_s):
            return
        running = self.log.current or "-"
        print(
            f"warm-up over its {self.budget_s:g} s budget after {self.elapsed():.0f} s, in signature "
            f"{self.current!r} (kernel {running} still compiling); compiled so far: {self.compiled_line()}",
            flush=True,
        )
        self.record["over_budget"] = True
        self.record["running"] = {"signature": self.current, "kernel": running}
        self.write()
        os._exit(EXIT_OVER_BUDGET)

    def run(self, name: str, fn) -> None:
        self.current = name
        before = {k: v.compile_s for k, v in self.log.kernels.items()}
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        new = [
            f"{k} {v.compile_s - before.get(k, 0.0):.1f} s"
            for k, v in self.log.kernels.items()
            if v.compile_s > before.get(k, 0.0)
        ]
        self.record["signatures"].append({"name": name, "wall_s": dt, "compiled": new})
        print(f"  {name}: {dt:.1f} s" + (f" — compiled {', '.join(new)}" if new else ""), flush=True)
        self.current = None

    def finish(self) -> None:
        self._done.set()
        self.write()


# dtypes of r, w, k, v, a, b the student passes under bf16 autocast (measured: Linear outputs r and v are
# bf16; k, a, b come out fp32 from their fp32 parameters; the log-decay is computed in fp32)
MODEL_DTYPES = (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32)


def op_inputs(B: int, T: int, H: int, grad: bool, seed: int = 0, dtypes=None) -> list[torch.Tensor]:
    """bf16 r, k, v, a, b and an fp32 log-decay inside RWKV-7's clamp, on CUDA (as benchmarks/wkv_cuda.py)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, 64, device="cuda", generator=g)  # noqa: E731
    kappa = torch.nn.functional.normalize(rnd(), dim=-1)
    eta = torch.rand(B, T, H, 64, device="cuda", generator=g)
    w = -math.exp(-0.5) * torch.sigmoid(2 * rnd())
    xs = [rnd(), w, rnd(), rnd(), -kappa, kappa * eta]
    dtypes = dtypes or (torch.bfloat16, torch.float32, *[torch.bfloat16] * 4)
    return [x.to(dt).requires_grad_(grad) for x, dt in zip(xs, dtypes, strict=True)]


def op_signatures(w: Warmup, H: int) -> None:
    from arwkv.ops import wkv7

    def fwd_bwd(B: int, T: int, h0: bool, cu: torch.Tensor | None = None, dtypes=None) -> None:
        xs = op_inputs(B, T, H, grad=True, dtypes=dtypes)
        n = B if cu is None else len(cu) - 1
        state = torch.zeros(n, H, 64, 64, device="cuda", requires_grad=True) if h0 else None
        o, hT = wkv7(*xs, initial_state=state, output_final_state=True, cu_seqlens=cu, backend="fla")
        (o.float().square().mean() + hT.square().mean()).backward()

    def prefill() -> None:
        with torch.no_grad():
            wkv7(*op_inputs(2, 64, H, grad=False), output_final_state=True, backend="fla")

    def decode() -> None:
        state = torch.zeros(2, H, 64, 64, device="cuda")
        with torch.no_grad():
            wkv7(*op_inputs(2, 1, H, grad=False), initial_state=state, output_final_state=True, backend="fla")

    cu = torch.tensor([0, 100, 101, 300, 512], device="cuda")
    w.run(f"op chunk fwd+bwd H={H}, final state", lambda: fwd_bwd(2, 256, h0=False))
    w.run(f"op chunk fwd+bwd H={H}, initial + final state", lambda: fwd_bwd(2, 256, h0=True))
    w.run(f"op chunk fwd+bwd H={H}, cu_seqlens, initial state", lambda: fwd_bwd(1, 512, h0=True, cu=cu))
    w.run(
        f"op chunk fwd+bwd H={H}, the model's dtype mix", lambda: fwd_bwd(2, 256, False, dtypes=MODEL_DTYPES)
    )
    w.run(f"op chunk prefill (no grad) H={H}", prefill)
    w.run(f"op fused recurrent decode step H={H}", decode)


def model_signatures(w: Warmup, args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from arwkv.convert import build_student

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.heads * 64,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).cuda().eval()
    student = build_student(
        teacher, init="copy", untie_embeddings=True, use_group_norm=True, wkv_backend="fla"
    )
    student = student.cuda().train()
    ids = torch.randint(3, args.vocab, (2, 256), device="cuda")

    def train_step(position_ids: torch.Tensor | None) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = student(input_ids=ids, position_ids=position_ids, use_cache=False)
        out.logits.float().logsumexp(-1).mean().backward()
        student.zero_grad(set_to_none=True)

    packed = torch.cat([torch.arange(100), torch.arange(156)]).expand(2, -1).to("cuda")

    def decode() -> None:
        student.eval()
        with torch.no_grad():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                student.generate(ids[:1, :32], max_new_tokens=2, do_sample=False)
            # and in fp32, as `arwkv eval` without --bf16 decodes
            student.generate(ids[:1, :32], max_new_tokens=2, do_sample=False)
        student.train()

    w.run(f"model fwd+bwd bf16 autocast H={args.heads}", lambda: train_step(None))
    w.run(f"model fwd+bwd packed documents H={args.heads}", lambda: train_step(packed))
    w.run(f"model greedy decode H={args.heads}", decode)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=9, help="H of the student (SmolLM2-135M: 576 / 64 = 9)")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=512, help="small: the vocabulary does not reach fla")
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--json", help="write the record here")
    p.add_argument("--no-model", action="store_true", help="only the op-level signatures")
    args = p.parse_args(argv)

    from arwkv.ops.wkv7 import fla_pin
    from arwkv.ops.wkv7.fla import fla_problem, fla_version

    problem = fla_problem()
    if problem is not None:
        print(f"warm-up: {problem}", file=sys.stderr)
        return EXIT_NO_FLA
    w = Warmup(args.budget_s, args.json)
    pinned = fla_pin.pinned_count() > 0
    w.record.update(
        fla=fla_version(),
        torch=torch.__version__,
        device=torch.cuda.get_device_name(),
        pinned=bool(pinned),
        triton_cache_dir=os.environ.get("TRITON_CACHE_DIR", ""),
        triton_f32_default=os.environ.get("TRITON_F32_DEFAULT", ""),
    )
    mode = "pinned configs" if pinned else "Triton autotuning (ARWKV_FLA_PIN unset)"
    print(
        f"warm-up: fla {w.record['fla']} on {w.record['device']}, {mode}, budget {args.budget_s:g} s",
        flush=True,
    )
    w.log.instrument(fla_pin.load_table()["modules"])
    threading.Thread(target=w.watchdog, daemon=True).start()
    op_signatures(w, args.heads)
    if not args.no_model:
        model_signatures(w, args)
    w.finish()
    total = w.record["compile_s_total"]
    print(f"warm-up done in {w.elapsed():.1f} s ({total:.1f} s compiling): {w.compiled_line()}")
    if w.record["autotuned"]:
        print(f"warm-up: these kernels were autotuned (not pinned): {', '.join(w.record['autotuned'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
