"""Perplexity of text files at a chosen context length, per-position loss, and teacher–student agreement.

Windows follow lm-eval's rolling loglikelihood: the token stream gets the prefix token (BOS, else EOS) in
front, every token is predicted exactly once, and each window holds `context_length` inputs. With
`stride < context_length` a window re-reads `context_length - stride` earlier tokens as context and scores
only its last `stride` targets (the strided evaluation of the transformers perplexity guide).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from arwkv.errors import DataError
from arwkv.eval.loglik import model_device, prefix_token_id
from arwkv.eval.stats import mean_stderr
from arwkv.ops.divergence import kl_from_log_probs, shared_log_probs


@dataclass
class Window:
    inputs: list[int]
    targets: list[int]
    first: int  # index in `inputs` whose logits predict targets[0]


def windows(tokens: list[int], prefix: int, context_length: int, stride: int | None = None) -> list[Window]:
    """Cut [prefix] + tokens into windows that predict every token once (see module docstring)."""
    stride = stride or context_length
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must be in 1..context_length ({context_length}); got {stride}")
    seq = [prefix, *tokens]
    out = []
    for t0 in range(1, len(seq), stride):
        t1 = min(t0 + stride, len(seq))
        start = max(0, t1 - 1 - context_length)
        out.append(Window(seq[start : t1 - 1], seq[t0:t1], t0 - 1 - start))
    return out


def _batches(ws: list[Window], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Window]]]:
    for i in range(0, len(ws), batch_size):
        chunk = ws[i : i + batch_size]
        T = max(len(w.inputs) for w in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, w in enumerate(chunk):
            ids[b, : len(w.inputs)] = torch.tensor(w.inputs)
            mask[b, : len(w.inputs)] = 1
        yield ids, mask, chunk


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = model_device(model)
    # An all-ones mask is dropped so that HF attention can take its fast causal path.
    am = None if bool(mask.all()) else mask.to(device)
    return model(input_ids=ids.to(device), attention_mask=am).logits


def _tokens(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not tokens:
        raise DataError("the text to score is empty")
    return tokens[:max_tokens] if max_tokens else tokens


@dataclass
class PerplexityResult:
    nll_sum: float
    n_tokens: int
    n_bytes: int
    context_length: int
    per_position_loss: list[float] = field(default_factory=list)  # mean loss of predictions at each position
    per_position_count: list[int] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.n_bytes


@torch.inference_mode()
def text_perplexity(
    model,
    tokenizer,
    text: str,
    *,
    context_length: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Token perplexity (and bits per UTF-8 byte, comparable across tokenizers) of `text`."""
    tokens = _tokens(tokenizer, text, max_tokens)
    ws = windows(tokens, prefix_token_id(tokenizer), context_length, stride)[:max_windows]
    n_scored = sum(len(w.targets) for w in ws)
    loss_sum = np.zeros(context_length)
    count = np.zeros(context_length, dtype=np.int64)
    nll = 0.0
    bar = tqdm(total=len(ws), desc=f"ppl@{context_length}", disable=not progress, leave=False)
    for ids, mask, chunk in _batches(ws, batch_size):
        logits = _logits(model, ids, mask)
        for b, w in enumerate(chunk):
            pos = torch.arange(w.first, w.first + len(w.targets))
            losses = (
                F.cross_entropy(
                    logits[b, pos].float(), torch.tensor(w.targets, device=logits.device), reduction="none"
                )
                .double()
                .cpu()
                .numpy()
            )
            nll += float(losses.sum())
            np.add.at(loss_sum, pos.numpy(), losses)
            np.add.at(count, pos.numpy(), 1)
        bar.update(len(chunk))
    bar.close()
    # Bytes of exactly the scored tokens, so bits/byte stays exact under max_tokens / max_windows.
    n_bytes = len(tokenizer.decode(tokens[:n_scored]).encode("utf-8"))
    curve = np.divide(loss_sum, count, out=np.full(context_length, np.nan), where=count > 0)
    return PerplexityResult(nll, n_scored, n_bytes, context_length, curve.tolist(), count.tolist())


@dataclass
class AgreementResult:
    kl: float  # mean forward KL(teacher || student) per token, nats
    kl_stderr: float
    top1_agreement: float
    top1_agreement_confident: float  # on positions where the teacher's top token has p >= threshold
    confident_fraction: float
    n_tokens: int
    threshold: float


@torch.inference_mode()
def teacher_student_kl(
    teacher,
    student,
    tokenizer,
    text: str,
    *,
    context_length: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    threshold: float = 0.5,
    progress: bool = True,
) -> AgreementResult:
    """Per-token KL(p_teacher || p_student) and top-1 agreement on held-out text (same tokenizer)."""
    tokens = _tokens(tokenizer, text, max_tokens)
    ws = windows(tokens, prefix_token_id(tokenizer), context_length)[:max_windows]
    kls, agree, confident = [], [], []
    bar = tqdm(total=len(ws), desc="kl", disable=not progress, leave=False)
    for ids, mask, chunk in _batches(ws, batch_size):
        lt, ls = _logits(teacher, ids, mask), _logits(student, ids, mask)
        for b, w in enumerate(chunk):
            pos = torch.arange(w.first, w.first + len(w.targets))
            logp_s, logp_t = shared_log_probs(ls[b, pos].to(lt.device), lt[b, pos])
            kls.append(kl_from_log_probs(logp_s, logp_t).cpu())
            agree.append((logp_t.argmax(-1) == logp_s.argmax(-1)).cpu())
            confident.append((logp_t.max(-1).values.exp() >= threshold).cpu())
        bar.update(len(chunk))
    bar.close()
    kl, ag, conf = torch.cat(kls).double(), torch.cat(agree), torch.cat(confident)
    return AgreementResult(
        kl=float(kl.mean()),
        kl_stderr=mean_stderr(kl.numpy()),
        top1_agreement=float(ag.float().mean()),
        top1_agreement_confident=float(ag[conf].float().mean()) if conf.any() else float("nan"),
        confident_fraction=float(conf.float().mean()),
        n_tokens=len(kl),
        threshold=threshold,
    )


def _metric(value: float, higher: bool, n: int, stderr: float = float("nan")) -> dict:
    return {"value": value, "stderr": stderr, "n": n, "higher_is_better": higher}


def as_metrics(r: PerplexityResult | AgreementResult) -> dict[str, dict]:
    """Score dicts in the harness's format (token-level stderrs ignore correlation within a text)."""
    if isinstance(r, PerplexityResult):
        return {
            "perplexity": _metric(r.perplexity, False, r.n_tokens),
            "bits_per_byte": _metric(r.bits_per_byte, False, r.n_tokens),
        }
    return {
        "kl": _metric(r.kl, False, r.n_tokens, r.kl_stderr),
        "top1_agreement": _metric(r.top1_agreement, True, r.n_tokens),
        "top1_agreement_confident": _metric(r.top1_agreement_confident, True, r.n_tokens),
        "confident_fraction": _metric(r.confident_fraction, True, r.n_tokens),
    }
