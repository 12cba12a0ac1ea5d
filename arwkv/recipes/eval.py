"""`arwkv eval`: benchmark tasks and passkey retrieval for models given as specs (arwkv.eval.harness)."""

from __future__ import annotations

from pathlib import Path

from arwkv.errors import ArwkvError


def cli_eval(args) -> int:
    import torch

    from arwkv.ops.precision import bf16_is_fast, cpu_features

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.bf16 and not bf16_is_fast(torch.device(device)):
        print(
            f"[arwkv] warning: --bf16 on a device without native bf16 matmuls ({device}, {cpu_features()}): "
            "PyTorch emulates bf16 there, several times slower than fp32; leave --bf16 out",
            flush=True,
        )
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
        return _eval(args)


def _check_eval_args(args) -> None:
    """Refuse bad settings and unreadable inputs before any model is loaded."""
    if args.fp64 and args.bf16:
        raise ArwkvError("--fp64 and --bf16 exclude each other: pick one precision")
    if args.limit is not None and args.limit < 1:
        raise ArwkvError(
            f"--limit must be at least 1 (got {args.limit}); leave it out to score every example"
        )
    for name in ("batch_size", "context_length", "swa_window"):
        if getattr(args, name) < 1:
            raise ArwkvError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.swa_sinks < 0:
        raise ArwkvError(f"--swa-sinks must be ≥ 0 (got {args.swa_sinks})")
    if args.text_file is not None:
        path = Path(args.text_file)
        if not path.is_file():
            raise ArwkvError(f"--text-file {path}: no such file")
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ArwkvError(
                f"--text-file {path} is not UTF-8 text (byte {e.start}); convert it first"
            ) from None
        except OSError as e:
            raise ArwkvError(f"--text-file {path} cannot be read: {e.strerror}") from None


def _eval(args) -> int:
    import torch

    from arwkv.eval.harness import DEFAULT_TASKS, run_eval

    _check_eval_args(args)
    names, specs = [], []
    for item in args.models:
        name, sep, spec = item.partition("=")
        labelled = bool(sep) and ":" not in name and "/" not in name
        names.append(name if labelled else None)
        specs.append(spec if labelled else item)
    tasks = tuple(t for t in args.tasks.split(",") if t) if args.tasks else DEFAULT_TASKS
    if args.passkey:
        from arwkv.eval.harness import run_long_context_eval

        try:
            lengths = tuple(int(n) for n in args.passkey.split(","))
        except ValueError:
            raise ArwkvError(f"--passkey takes comma-separated token counts, got {args.passkey!r}") from None
        run_long_context_eval(
            specs,
            args.out,
            names=names if all(names) else None,
            lengths=lengths,
            context_length=max(lengths),
            max_windows=2,
            swa_window=args.swa_window,
            swa_sinks=args.swa_sinks,
        )
        print(f"long context: {Path(args.out) / 'long_context.md'}")
    if tasks == ("none",):
        return 0
    run_eval(
        specs,
        tasks,
        limit=args.limit,
        out_dir=args.out,
        names=names if all(names) else None,
        reference=args.reference,
        batch_size=args.batch_size,
        swa_window=args.swa_window,
        swa_sinks=args.swa_sinks,
        text_file=args.text_file,
        context_length=args.context_length,
        dtype=torch.float64 if args.fp64 else torch.float32,
    )
    print(f"results: {Path(args.out) / 'eval.md'}")
    return 0
