"""Training throughput of the conversion stages, on CPU or GPU, for a teacher of a given shape.

    python benchmarks/distill_throughput.py [--device cuda] [--bf16] [--seq-len 2048] [--batch 8] [--json F]

The teacher is a randomly initialised Llama of the chosen shape (default: SmolLM2-135M's) and the student is
built from it by `build_student` (copy init, GroupNorm, untied head as in the recipes). Weights do not change
the cost, so no checkpoint is needed. Each stage is timed over `--steps` optimizer steps after `--warmup`
steps, with the same `AlignTask` / `DistillTask` modules the recipes train:

- align:   teacher forward (no grad) + every RWKV mixer on the captured attention inputs, MSE, AdamW on mixers
- distill: teacher forward (no grad) + full student forward/backward, chunked KL over the vocabulary, AdamW
- teacher: the teacher's forward alone, no grad (the baseline measured in the same run: stage costs are also
  reported as multiples of it)

Printed: tokens/s per stage, its cost relative to a teacher forward, peak memory, and the hours that 100M
and 500M tokens of each stage would take at this rate. JSON beside the table with --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from arwkv.train.threads import ThreadTuner


def build(args: argparse.Namespace, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from arwkv.convert import build_student

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 2048),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).to(device).eval()
    student = build_student(
        teacher, init="copy", untie_embeddings=True, use_group_norm=True, wkv_backend=args.wkv_backend
    ).train()
    return teacher, student


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: torch.device, warmup: int, steps: int, tuning: bool = False) -> float:
    """Seconds per step. With `tuning`, every step runs at the thread count the training loop's ThreadTuner
    picks (its first probe of 1 thread vs the default takes 4 steps: give --warmup 4 to keep it untimed)."""
    tuner = ThreadTuner() if tuning else None

    def one() -> None:
        if tuner is None:
            return step()
        tuner.before_step()
        t = time.perf_counter()
        step()
        tuner.after_step(time.perf_counter() - t, 1)

    for _ in range(warmup):
        one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    if tuner is not None:
        print(f"  thread tuning: {tuner.rates} tok/step/s -> {tuner.current} threads", flush=True)
        tuner.restore()
    return (time.perf_counter() - t0) / steps


def stage_step(task: torch.nn.Module, params: list[torch.Tensor], batch: dict, bf16: bool, device):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total, count, _ = task(batch)
        loss = total / count
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} in the throughput run")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> dict:
    from arwkv.recipes.align import AlignTask
    from arwkv.recipes.distill import DistillTask
    from arwkv.train.params import mixer_layers

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    teacher, student = build(args, device)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids.to(device)}
    tokens = ids.numel()
    results: dict[str, dict] = {}

    def record(name: str, seconds: float) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        results[name] = {"s_per_step": seconds, "tok_per_s": tokens / seconds, "peak_gib": peak}
        print(f"  {name}: {tokens / seconds:,.0f} tok/s ({seconds * 1e3:.1f} ms/step)", flush=True)

    def reset_peak() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    reset_peak()

    @torch.no_grad()
    def teacher_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            teacher.model(input_ids=batch["input_ids"], use_cache=False)

    record("teacher", time_steps(teacher_step, device, args.warmup, args.steps))
    if "align" in args.stages:
        reset_peak()
        task = AlignTask(student, teacher, loss="mse")
        mixers = [p for i in mixer_layers(student) for p in student.model.layers[i].self_attn.parameters()]
        record(
            "align",
            time_steps(stage_step(task, mixers, batch, args.bf16, device), device, args.warmup, args.steps),
        )
    if "distill" in args.stages:
        reset_peak()
        student.gradient_checkpointing_enable() if args.grad_checkpointing else None
        task = DistillTask(student, teacher, chunk_size=1024)
        params = [p for p in student.parameters() if p.requires_grad]
        record(
            "distill",
            time_steps(
                stage_step(task, params, batch, args.bf16, device),
                device,
                args.warmup,
                args.steps,
                args.thread_tuning,
            ),
        )
    base = results["teacher"]["s_per_step"]
    for r in results.values():
        r["x_teacher_forward"] = r["s_per_step"] / base
        r["hours_per_100M_tokens"] = 1e8 / r["tok_per_s"] / 3600
        r["hours_per_500M_tokens"] = 5e8 / r["tok_per_s"] / 3600
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "bf16": args.bf16,
        "shape": {
            k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")
        },
        "batch": args.batch,
        "seq_len": args.seq_len,
        "teacher_params_M": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "student_params_M": sum(p.numel() for p in student.parameters()) / 1e6,
        "stages": results,
        "thread_tuning": args.thread_tuning,
    }


def table(report: dict) -> str:
    lines = [
        f"device {report['device']}, torch {report['torch']}, bf16={report['bf16']}, "
        f"batch {report['batch']} x {report['seq_len']}, teacher {report['teacher_params_M']:.1f}M, "
        f"student {report['student_params_M']:.1f}M",
        "",
        "| stage | tok/s | ms/step | x teacher fwd | peak GiB | h / 100M tok | h / 500M tok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["stages"].items():
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {name} | {r['tok_per_s']:,.0f} | {r['s_per_step'] * 1e3:.1f} | "
            f"{r['x_teacher_forward']:.2f} | "
            f"{peak} | {r['hours_per_100M_tokens']:.2f} | {r['hours_per_500M_tokens']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay fp32)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stages", default="align,distill")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--wkv-backend",
        default="auto",
        choices=["auto", "chunked", "native", "fla", "recurrent"],
        help="auto: fla on CUDA when installed (Triton autotuning takes minutes on first use)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument(
        "--thread-tuning", action="store_true", help="distill steps at the thread count ThreadTuner picks"
    )
    # SmolLM2-135M's shape
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    report = run(args)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
