"""Long context: passkey retrieval and loss as a function of position, for teacher and student, with a plot.

Passkey (Mohtashami & Jaggi 2023, the RADLADS/ARWKV long-context check): a random number is hidden at a
chosen depth of repetitive filler text, and the prompt ends "What is the pass key? The pass key is". The
score is exact match under greedy decoding, computed teacher-forced in one forward pass: greedy decoding
emits the key iff the argmax at every key position is the key's next token (the `is_greedy` flag of
`loglik.score_tokens`), so it equals generation without needing a cache in every model kind (the
sink+window baseline included). The key's log-likelihood is kept too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from arwkv.eval.loglik import score_tokens
from arwkv.eval.perplexity import text_perplexity

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    tokens: list[int]
    answer: list[int]  # tokens of " <key>", scored after `tokens`
    key: str
    depth: float  # requested
    needle_start: int  # token index where the needle sentence begins


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of about `n_tokens` tokens (within one filler sentence) with the needle at `depth` ∈ [0, 1].

    Built from token lists, not one string, so the needle's token position is exact and filler repeats
    tokenize identically wherever they sit.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1]; got {depth}")
    intro, filler = _ids(tokenizer, INTRO), _ids(tokenizer, FILLER)
    needle, question = _ids(tokenizer, NEEDLE.format(key=key)), _ids(tokenizer, QUESTION)
    n_fill = max(0, (n_tokens - len(intro) - len(needle) - len(question)) // len(filler))
    before = round(depth * n_fill)
    tokens = intro + filler * before
    start = len(tokens)
    tokens += needle + filler * (n_fill - before) + question
    return PasskeyPrompt(tokens, _ids(tokenizer, " " + key), key, depth, start)


@dataclass(frozen=True)
class PasskeyResult:
    length: int  # prompt tokens
    target_length: int
    depth: float
    key: str
    correct: bool
    logprob: float


def passkey(
    model,
    tokenizer,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 1,
    digits: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> list[PasskeyResult]:
    """Exact-match passkey retrieval over a grid of prompt lengths × needle depths (`trials` keys each)."""
    rng = random.Random(seed)  # the same keys for every model given the same seed
    out = []
    for n in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randrange(10 ** (digits - 1), 10**digits))
                p = passkey_prompt(tokenizer, n, depth, key)
                (r,) = score_tokens(
                    model, [(p.tokens, p.answer)], batch_size=1, max_length=len(p.tokens) + 1, progress=False
                )
                out.append(PasskeyResult(len(p.tokens), n, depth, key, r.is_greedy, r.logprob))
                if progress:
                    print(
                        f"passkey len={n} depth={depth:.2f} key={key} correct={r.is_greedy} "
                        f"logprob={r.logprob:.2f}",
                        flush=True,
                    )
    return out


def accuracy_by_length(results: Sequence[PasskeyResult]) -> dict[int, float]:
    by: dict[int, list[bool]] = {}
    for r in results:
        by.setdefault(r.target_length, []).append(r.correct)
    return {n: float(np.mean(v)) for n, v in sorted(by.items())}


def loss_by_position(
    model,
    tokenizer,
    text: str,
    *,
    context_length: int = 2048,
    max_windows: int | None = 8,
    batch_size: int = 1,
    progress: bool = True,
) -> list[float]:
    """Mean next-token loss at each position 0..context_length-1 over non-overlapping windows of `text`."""
    r = text_perplexity(
        model,
        tokenizer,
        text,
        context_length=context_length,
        max_windows=max_windows,
        batch_size=batch_size,
        progress=progress,
    )
    return r.per_position_loss


def smooth(curve: Sequence[float], bins: int = 48) -> tuple[list[float], list[float]]:
    """Average a per-position curve over log-spaced position bins (single positions are noisy)."""
    y = np.asarray(curve, dtype=np.float64)
    edges = np.unique(np.geomspace(1, len(y), bins + 1).astype(int))
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        seg = y[a - 1 : b - 1]
        seg = seg[~np.isnan(seg)]
        if len(seg):
            xs.append(float((a + b) / 2))
            ys.append(float(seg.mean()))
    return xs, ys


def plot(data: dict[str, dict], path: str | Path) -> Path:
    """Two panels: passkey accuracy vs prompt length; loss vs position (log x). `data[model]` holds
    "passkey" (list of PasskeyResult dicts) and/or "loss_by_position" (list of floats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in data.items():
        if d.get("passkey"):
            acc = accuracy_by_length([PasskeyResult(**r) for r in d["passkey"]])
            ax1.plot(list(acc), [100 * a for a in acc.values()], marker="o", label=name)
        if d.get("loss_by_position"):
            ax2.plot(*smooth(d["loss_by_position"]), label=name)
    ax1.set(
        xscale="log",
        xlabel="prompt length (tokens)",
        ylabel="passkey exact match (%)",
        ylim=(-5, 105),
        title="Passkey retrieval",
    )
    ax2.set(
        xscale="log",
        xlabel="position in window (tokens)",
        ylabel="next-token loss (nats)",
        title="Loss by position",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_long_context(
    models: dict[str, tuple[object, object]],
    out_dir: str | Path,
    *,
    text: str | None = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    trials: int = 1,
    context_length: int = 2048,
    max_windows: int | None = 4,
    progress: bool = True,
) -> dict:
    """Passkey grid + loss-by-position for every model; writes long_context.{json,md,png} in `out_dir`."""
    data: dict[str, dict] = {}
    for name, (model, tok) in models.items():
        d: dict = {
            "passkey": [
                asdict(r)
                for r in passkey(model, tok, lengths=lengths, depths=depths, trials=trials, progress=progress)
            ]
        }
        if text:
            d["loss_by_position"] = loss_by_position(
                model, tok, text, context_length=context_length, max_windows=max_windows, progress=progress
            )
        data[name] = d
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "long_context.json").write_text(json.dumps(data, indent=1))
    plot(data, out_dir / "long_context.png")
    lines = [
        "| model | " + " | ".join(f"passkey@{n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name, d in data.items():
        acc = accuracy_by_length([PasskeyResult(**r) for r in d["passkey"]])
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[n]:.0f}%" for n in lengths) + " |")
    (out_dir / "long_context.md").write_text("\n".join(lines) + "\n")
    return data
