"""Batched log-likelihood of (context, continuation) pairs, with lm-evaluation-harness conventions.

Model-agnostic: anything whose `forward(input_ids=, attention_mask=)` returns `.logits` works (HF causal LMs,
the arwkv student, the sliding-window baseline). Requests are tokenized the way lm-eval 0.4.13's `HFLM` does
it: the tokenizer's own special-token default (a BOS for Llama-2 tokenizers, none for Qwen2/SmolLM2); trailing
whitespace of the context moves to the continuation; the continuation tokens are
`tok(context + continuation)[len(tok(context)):]`; an empty context becomes the prefix token (BOS, else EOS)
in front of the continuation encoded without special tokens.
Sequences are right-padded (safe for causal and recurrent models alike) and sorted longest first.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from arwkv.errors import DataError
from arwkv.loading import pad_token_id


@dataclass(frozen=True)
class LoglikResult:
    """Summed log-probability of the continuation, and whether greedy decoding would produce it exactly."""

    logprob: float
    is_greedy: bool
    n_tokens: int


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval puts in front of an empty context: BOS if the tokenizer has one, else EOS."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise DataError("tokenizer has neither a BOS nor an EOS token; an empty context cannot be scored")
    return int(tid)


def _encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    if add_special_tokens is None:
        bos = tokenizer.bos_token
        # Text that already starts with the BOS string must not get a second one (lm-eval's has_bos_prefix).
        add_special_tokens = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's `loglikelihood` / `_encode_pair` produce them."""
    if context == "":
        cont = _encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    # Trailing spaces belong to the continuation: BPE tokenizers glue a space to the following word.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    # Encoding the whole string keeps the boundary merge the tokenizer would make in running text.
    return ctx, whole[len(ctx) :]


def model_max_length(model, default: int = 2048) -> int:
    """lm-eval's rule: the first of n_positions / max_position_embeddings / n_ctx in the config, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# fp32 matmuls round a row differently when the whole product has few rows (the CPU BLAS takes another kernel
# below ~12 rows; any row count above that gives bit-identical rows). The teacher passes that 1e-7 through, an
# undertrained student amplifies it to ~4e-3 nats on short BLiMP sentences, so every batch is right-padded
# (causal models: changes nothing) to at least this many token rows, and a request scores the same alone or in
# any batch.
MIN_MATMUL_ROWS = 64


@torch.inference_mode()
def score_tokens(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "loglik",
) -> list[LoglikResult]:
    """Score already-tokenized (context, continuation) pairs; results come back in input order."""
    max_length = max_length or model_max_length(model)
    device = model_device(model)
    use_keep = accepts_logits_to_keep(model)
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise DataError(f"request {i}: the continuation encodes to no tokens")
        # lm-eval truncates from the left and never feeds the last continuation token.
        inp = (ctx + cont)[-(max_length + 1) :][:-1]
        rows.append((i, inp, cont))
    rows.sort(key=lambda r: (-len(r[1]), r[0]))
    out: list[LoglikResult | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        floor = -(-MIN_MATMUL_ROWS // len(batch))  # rows per sequence that give the batch MIN_MATMUL_ROWS
        T = max(len(batch[0][1]), min(floor, max_length))
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, (_, inp, _) in enumerate(batch):
            ids[b, : len(inp)] = torch.tensor(inp)
            mask[b, : len(inp)] = 1
        # First logit position any row needs: skipping the LM head elsewhere saves ~20% on small models.
        first = min(len(inp) - len(cont) for _, inp, cont in batch)
        kwargs = {"logits_to_keep": min(T, max(T - first, floor))} if use_keep else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        offset = T - logits.shape[1]
        for b, (i, inp, cont) in enumerate(batch):
            lo = len(inp) - len(cont) - offset
            sl = logits[b, lo : lo + len(cont)].float().log_softmax(-1)
            target = torch.tensor(cont, device=sl.device)
            lp = sl.gather(-1, target[:, None]).sum().item()
            greedy = bool((sl.argmax(-1) == target).all().item())
            out[i] = LoglikResult(lp, greedy, len(cont))
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def loglikelihood(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "loglik",
) -> list[LoglikResult]:
    """Log-likelihood of each continuation given its context (lm-eval `loglikelihood` semantics)."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    pad = pad_token_id(tokenizer)
    return score_tokens(
        model, pairs, batch_size=batch_size, max_length=max_length, pad_id=pad, progress=progress, desc=desc
    )
