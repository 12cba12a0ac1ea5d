"""The GPU path in one short window: fla warm-up, parity, throughput, a SmolLM2-135M conversion, evaluation.

Run through `benchmarks/gpu_convert.sh` (which installs the carried wheels and rejoins the teacher first):

    python benchmarks/gpu_convert.py {part1,part2,all} --out DIR [--minutes M] [--teacher F.gguf] [--dry-run]

part1 (needs no teacher): environment and fla version check, warm-up of the fla kernels (bounded), the GPU
parity tests, throughput (SmolLM2-135M shape: align / distill tokens/s and peak memory; WKV fwd+bwd vs SDPA
at 2k-16k). part2: the conversion, sized by `budget.minutes` to the minutes left, then teacher / SWA / student
evaluated on the GPU (LAMBADA, the short tasks, WikiText-2 at 2048, passkey to 8k). all = part1 + part2.
Every step runs as its own process with its own time limit inside the --minutes of the whole part, and a
failed step stops the part (fail fast); the summary is written either way.

The output folder holds at most 8 files: report.md, summary.json, log.txt, gpu_summary.png and, after a
conversion, heldout_curve.png, convert_report.md, eval.md, long_context.png. Intermediate files live in
--work (kept between part1 and part2, which reads part1's results from it).

--dry-run runs the same steps on CPU at toy size with a tiny random teacher (Qwen2 tokenizer from
--tokenizer): what needs CUDA is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "gpu" / "smollm2-135m-gpu.yaml"
MAX_LOG_BYTES = 15 * 2**20  # the output folder's files come back only up to 16 MiB each
OUT_FILES = (
    "report.md",
    "summary.json",
    "log.txt",
    "gpu_summary.png",
    "heldout_curve.png",
    "convert_report.md",
    "eval.md",
    "long_context.png",
)
TASKS = "lambada_openai,arc_easy,piqa,winogrande,hellaswag,blimp,wikitext"
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.minutes * 60
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / f"log_{args.part}.txt"
        self.log_path.write_text("")
        self.summary: dict[str, Any] = {"part": args.part, "dry_run": args.dry_run, "steps": {}}
        self.failed: str | None = None
        self.python = sys.executable

    # ---------------------------------------------------------------------------------------------- utils
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, line: str) -> None:
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def skip(self, step: str, why: str) -> None:
        self.say(f"[{step}] skipped: {why}")
        self.summary["steps"][step] = {"status": "skipped", "why": why}

    def run(self, step: str, cmd: list[str], limit_s: float, env: dict[str, str] | None = None) -> int:
        """Run one step as a process with a time limit; its output goes to the log, its tail to stdout."""
        limit_s = max(5.0, min(limit_s, self.left() - 5))
        self.say(f"[{step}] {' '.join(cmd)}  (limit {limit_s:.0f} s)")
        t = time.monotonic()
        full_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=limit_s,
            )
            rc, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            rc = 124
            output = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "") + (
                f"\n[{step}] stopped at its {limit_s:.0f} s limit\n"
            )
        dt = time.monotonic() - t
        with self.log_path.open("a") as f:
            f.write(output)
        tail = "\n".join(output.rstrip().splitlines()[-6:])
        print(tail, flush=True)
        status = "ok" if rc == 0 else ("timeout" if rc == 124 else "failed")
        self.summary["steps"][step] = {"status": status, "rc": rc, "wall_s": round(dt, 1)}
        self.say(f"[{step}] {status} in {dt:.1f} s")
        if rc != 0 and self.failed is None:
            self.failed = step
        return rc

    def with_pins(self, *target: str) -> list[str]:
        return [self.python, "-m", "arwkv.ops.wkv7.with_pins", *target]

    def compile_env(self, step: str) -> dict[str, str]:
        return {"ARWKV_FLA_COMPILE_LOG": str(self.work / f"compile_{step}.json")}

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    # ---------------------------------------------------------------------------------------------- steps
    def env_step(self) -> bool:
        import platform

        import torch

        info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
        for mod in ("transformers", "triton"):
            try:
                info[mod] = __import__(mod).__version__
            except Exception:
                info[mod] = None
        from arwkv.ops.wkv7.fla import FlaVersionError, check_fla, fla_version

        info["fla"] = fla_version()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["device"] = torch.cuda.get_device_name()
            info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        for var in ("ARWKV_FLA_PIN", "TRITON_CACHE_DIR", "TRITON_F32_DEFAULT", "ARWKV_EVAL_DIR"):
            info[var] = os.environ.get(var)
        self.summary["env"] = info
        self.say("[env] " + ", ".join(f"{k} {v}" for k, v in info.items()))
        if self.args.dry_run:
            self.say("[env] dry run: CUDA and fla are not required; the steps that need them are skipped")
            return True
        if not info["cuda"]:
            self.say(
                "[env] no CUDA device here: run on a GPU machine, or add --dry-run to check the script on CPU"
            )
            self.failed = "env"
            return False
        try:
            check_fla()
        except FlaVersionError as e:
            self.say(f"[env] {e}")
            self.failed = "env"
            return False
        return True

    def warmup_step(self) -> None:
        if self.args.dry_run:
            return self.skip("warmup", "needs CUDA and fla (dry run)")
        path = self.work / "warmup.json"
        cmd = [
            self.python,
            "-m",
            "arwkv.recipes.fla_warmup",
            "--budget-s",
            str(self.args.warmup_s),
            "--json",
            str(path),
        ]
        self.run("warmup", cmd, self.args.warmup_s + 30)
        self.summary["warmup"] = self.read_json(path)

    def parity_step(self) -> None:
        path = self.work / "parity.txt"
        cmd = self.with_pins(
            "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu", "tests/ops/test_wkv7_fla.py"
        )
        env = {**self.compile_env("parity"), "ARWKV_PARITY_LOG": str(path)}
        rc = self.run("parity", cmd, self.args.parity_s, env=env)
        lines = path.read_text().splitlines() if path.is_file() else []
        errors = [json.loads(x) for x in lines if x.startswith("{")]
        log_tail = self.log_path.read_text().splitlines()[-40:]
        result = next((x for x in reversed(log_tail) if re.search(r"\d+ (passed|skipped|failed)", x)), "")
        self.summary["parity"] = {"result": result.strip("= "), "errors": errors, "rc": rc}
        if self.args.dry_run and rc == 0:
            self.say("[parity] dry run: the fla tests skip without CUDA (the chunked-on-CUDA test too)")

    def throughput_step(self) -> None:
        path = self.work / "distill_throughput.json"
        if self.args.dry_run:
            shape = [
                "--device",
                "cpu",
                "--layers",
                "2",
                "--hidden",
                "128",
                "--intermediate",
                "256",
                "--heads",
                "2",
            ]
            shape += ["--kv-heads", "1", "--vocab", "512", "--seq-len", "64", "--batch", "2", "--steps", "1"]
        else:
            shape = ["--device", "cuda", "--bf16", "--seq-len", "2048", "--batch", "16", "--steps", "3"]
        cmd = self.with_pins("benchmarks/distill_throughput.py", *shape, "--warmup", "1", "--json", str(path))
        self.run("throughput", cmd, self.args.throughput_s, env=self.compile_env("throughput"))
        self.summary["throughput"] = self.read_json(path)
        if self.failed:
            return
        if self.args.dry_run:
            return self.skip("wkv_vs_sdpa", "needs CUDA (dry run)")
        path = self.work / "wkv_cuda.json"
        cmd = self.with_pins(
            "benchmarks/wkv_cuda.py",
            *("--lengths", "2048,4096,8192,16384", "--tokens", "32768", "--heads", "9"),
            *("--backends", "fla", "--reps", "5", "--json", str(path)),
        )
        self.run("wkv_vs_sdpa", cmd, self.args.wkv_s, env=self.compile_env("wkv_vs_sdpa"))
        self.summary["wkv_vs_sdpa"] = self.read_json(path)

    def teacher(self) -> str:
        if self.args.teacher:
            return self.args.teacher
        if not self.args.dry_run:
            raise SystemExit("part2/all needs --teacher FILE.gguf (gpu_convert.sh passes the rejoined GGUF)")
        return str(self.tiny_teacher())

    def tiny_teacher(self) -> Path:
        """A random 2-layer Llama (head size 64) with the real Qwen2 tokenizer, which has a chat template."""
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        folder = self.work / "tiny_teacher"
        if (folder / "config.json").is_file():
            return folder
        tok = AutoTokenizer.from_pretrained(self.args.tokenizer)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
        )
        import torch

        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        self.say(
            f"[convert] dry run: tiny random teacher in {folder} (hidden 128, 2 heads of 64, Qwen2 tokenizer)"
        )
        return folder

    def convert_step(self, teacher: str) -> None:
        run_dir = self.work / "run"
        eval_reserve = self.args.eval_s + 20
        overhead = self.args.convert_overhead_s
        minutes = (self.left() - eval_reserve - overhead - 15) / 60
        if minutes < 0.5 and not self.args.dry_run:
            self.say(f"[convert] only {minutes:.2f} training minutes would be left: not converting")
            self.failed = self.failed or "convert"
            self.summary["steps"]["convert"] = {"status": "failed", "why": "no time left"}
            return
        if self.args.dry_run:
            minutes = 0.1  # ~6 s of training: the toy run only has to pass through every phase
            toy = [
                "device=cpu",
                "bf16=false",
                "threads=1",
                "data.data_free.num_sequences=8",
                "data.data_free.seq_len=64",
                "data.data_free.batch_size=8",
                "data.heldout.num_sequences=4",
                "data.heldout.seq_len=64",
                "data.heldout.batch_size=4",
                "align.seq_len=64",
                "align.batch_size=2",
                "distill.seq_len=64",
                "distill.batch_size=2",
                "distill.eval_interval=2",
            ]
        else:
            toy = []
        self.say(f"[convert] budget.minutes={minutes:.2f} (training), sized for the {self.left():.0f} s left")
        cmd = self.with_pins(
            "-m",
            "arwkv",
            "convert",
            "--recipe",
            str(RECIPE),
            f"teacher.path={teacher}",
            f"out_dir={run_dir}",
            f"budget.minutes={minutes:.3f}",
            *toy,
            *self.args.overrides,
        )
        self.run("convert", cmd, self.left() - eval_reserve, env=self.compile_env("convert"))
        self.summary["convert"] = {
            "budget_minutes": round(minutes, 3),
            "summary": self.read_json(run_dir / "summary.json"),
            "budget": self.read_json(run_dir / "budget.json"),
        }

    def eval_step(self, teacher: str) -> None:
        run_dir = self.work / "run"
        eval_dir = self.work / "eval"
        if self.args.dry_run:
            text = ROOT.parent / "shared" / "assets" / "tinystories-samples" / "tinystories_sample.txt"
            opts = [
                "--tasks",
                "arc_easy,wikitext",
                "--limit",
                "3",
                "--context-length",
                "256",
                "--passkey",
                "256",
            ]
            opts += ["--text-file", str(text)]
        else:
            opts = ["--tasks", TASKS, "--limit", str(self.args.eval_limit), "--context-length", "2048"]
            opts += ["--passkey", "1024,4096,8192"]
        cmd = self.with_pins(
            "-m",
            "arwkv",
            "eval",
            f"teacher={teacher}",
            f"swa=swa:{teacher}",
            f"student={run_dir / 'final'}",
            *opts,
            "--out",
            str(eval_dir),
        )
        self.run("eval", cmd, self.left() - 15, env=self.compile_env("eval"))
        self.summary["eval"] = {
            "results": (self.read_json(eval_dir / "eval.json") or {}).get("results"),
            "long_context": self.read_json(eval_dir / "long_context.json"),
        }

    # --------------------------------------------------------------------------------------------- report
    def collect_compile_logs(self) -> None:
        logs = {}
        for path in sorted(self.work.glob("compile_*.json")):
            logs[path.stem.removeprefix("compile_")] = self.read_json(path)
        self.summary["compile_logs"] = logs

    def finish(self) -> int:
        self.collect_compile_logs()
        self.summary["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.summary["failed_step"] = self.failed
        if self.args.part == "part2":  # part1's results were kept in the work folder
            first = self.read_json(self.work / "summary_part1.json") or {}
            for key in ("env", "warmup", "parity", "throughput", "wkv_vs_sdpa"):
                if key in first and key not in self.summary:
                    self.summary[key] = first[key]
            self.summary["steps"] = {**first.get("steps", {}), **self.summary["steps"]}
        (self.work / f"summary_{self.args.part}.json").write_text(json.dumps(self.summary, indent=2))
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        from gpu_report import plot, render  # beside this file

        (self.out / "report.md").write_text(render(self.summary))
        plot(self.summary, self.out / "gpu_summary.png")
        run_dir, eval_dir = self.work / "run", self.work / "eval"
        for src, name in (
            (run_dir / "heldout_curve.png", "heldout_curve.png"),
            (run_dir / "report.md", "convert_report.md"),
            (eval_dir / "eval.md", "eval.md"),
            (eval_dir / "long_context.png", "long_context.png"),
        ):
            if src.is_file():
                shutil.copyfile(src, self.out / name)
        logs = [self.work / "log_part1.txt"] if self.args.part == "part2" else []
        text = "".join(p.read_text() for p in [*logs, self.log_path] if p.is_file())
        (self.out / "log.txt").write_text(text[-MAX_LOG_BYTES:])
        extra = sorted(p.name for p in self.out.iterdir() if p.name not in OUT_FILES)
        listing = ", ".join(sorted(p.name for p in self.out.iterdir()))
        self.say(f"output in {self.out}: {listing}" + (f" (not ours: {extra})" if extra else ""))
        if self.failed:
            self.say(f"stopped: step {self.failed!r} failed (see log.txt); the report holds what ran")
            return EXIT_FAILED
        self.say(f"done in {self.summary['wall_s']:.0f} s")
        return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("part1", "part2", "all"))
    p.add_argument("--out", required=True, help="output folder (at most 8 files)")
    p.add_argument("--work", help="intermediate files, kept between part1 and part2 (default: OUT/../work)")
    p.add_argument("--minutes", type=float, default=None, help="wall minutes of this part (4.5 / 5 / 9)")
    p.add_argument("--teacher", help="the teacher GGUF (part2/all on the GPU)")
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "assets" / "qwen2-tokenizer"))
    p.add_argument("--dry-run", action="store_true", help="CPU, toy size: skip what needs CUDA")
    p.add_argument("--warmup-s", type=float, default=90.0)
    p.add_argument("--parity-s", type=float, default=60.0)
    p.add_argument("--throughput-s", type=float, default=50.0)
    p.add_argument("--wkv-s", type=float, default=35.0)
    p.add_argument("--eval-s", type=float, default=100.0, help="time kept for the evaluation")
    p.add_argument("--eval-limit", type=int, default=300, help="examples per task")
    p.add_argument(
        "--convert-overhead-s", type=float, default=100.0, help="teacher load, sampling, held-out evals"
    )
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides for the conversion")
    args = p.parse_intermixed_args(argv)  # recipe overrides may follow options
    if args.minutes is None:
        args.minutes = {"part1": 4.5, "part2": 5.0, "all": 9.0}[args.part]
    if args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"recipe overrides are key=value; got {bad}")
    if args.part != "part1" and not args.dry_run and not args.teacher:
        p.error(f"{args.part} on the GPU needs --teacher FILE.gguf")
    if args.teacher and not Path(args.teacher).exists():
        p.error(f"--teacher {args.teacher} does not exist")
    if args.dry_run and args.part != "part1" and not args.teacher and not Path(args.tokenizer).is_dir():
        p.error(
            f"--dry-run builds a tiny teacher with the --tokenizer folder, and {args.tokenizer} is missing"
        )
    args.work = args.work or str(Path(args.out).resolve().parent / "work")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    d = Driver(args)
    d.say(f"gpu_convert {args.part}{' --dry-run' if args.dry_run else ''}: {args.minutes:g} min, out {d.out}")
    if d.env_step() and args.part in ("part1", "all"):
        for step in (d.warmup_step, d.parity_step, d.throughput_step):
            if d.failed:
                break
            step()
    if not d.failed and args.part in ("part2", "all"):
        teacher = d.teacher()
        d.convert_step(teacher)
        if not d.failed:
            d.eval_step(teacher)
    return d.finish()


if __name__ == "__main__":
    sys.exit(main())
