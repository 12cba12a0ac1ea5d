"""Preference pairs for DPO (stage 3): read from jsonl files, or written data-free by teacher and student.

A pair is one prompt with two completions. Each completion is stored as its own row, prompt + completion,
right-padded, with the prompt length and the real length, so the loss can score completion tokens only:

* files: one JSON object per line, `{"prompt", "chosen", "rejected"}` or `{"messages", "chosen", "rejected"}`
  (`messages` = the conversation before the reply; a completion is a string or an assistant message). With a
  chat template the prompt is rendered as a user turn (or the messages) and each completion as the assistant
  reply, end-of-turn marker included, exactly as `arwkv.data.chat` renders SFT data; without one, plain text
  (the tokenizer's BOS before the prompt, its EOS after the completion). A teacher without a tokenizer
  (llama2.c) takes token-id lists for all three fields.
* data-free (`data_free_preferences`): for varied prompts the teacher's reply is `chosen` and the student's
  own greedy reply is `rejected`, so DPO moves the student toward the teacher where it still disagrees. Pairs
  whose two replies are identical carry no gradient and are dropped (their number is kept in `meta`). Made
  once and cached like the teacher corpus: `<cache_dir>/preferences-<hash>.safetensors`, the hash covering
  teacher and student weights, prompts, lengths and sampling settings, written atomically.

`PreferenceSet.batch(rows)` gives the 2b rows of b pairs (chosen first, then rejected) with `loss_mask` on the
completion tokens; it has the `len` / `batch` / `fingerprint` interface of a `PackedCorpus`, so
`PackedLoader` streams it (shuffling, DDP sharding, exact resume).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from arwkv.atomic import write_file
from arwkv.errors import DataError

FORMAT_VERSION = 1
_FIELDS = ("chosen", "rejected", "chosen_prompt", "rejected_prompt", "chosen_len", "rejected_len")


@dataclass
class PreferenceSet:
    """`chosen` / `rejected` [N, W] int64 rows (prompt + completion, right-padded with `pad_id`);
    `*_prompt` [N] prompt lengths and `*_len` [N] real lengths (the completion is [prompt, len))."""

    chosen: Tensor
    rejected: Tensor
    chosen_prompt: Tensor
    rejected_prompt: Tensor
    chosen_len: Tensor
    rejected_len: Tensor
    pad_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    @property
    def seq_len(self) -> int:
        return int(max(self.chosen.shape[1], self.rejected.shape[1]))

    @property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for f in _FIELDS:
            h.update(getattr(self, f).to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def batch(self, idx: np.ndarray | list[int]) -> dict[str, Tensor]:
        """Rows of pairs `idx`: [2b, T] with the chosen rows first, T = the longest row of the batch."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        lens = torch.cat([self.chosen_len[idx], self.rejected_len[idx]])
        prompt = torch.cat([self.chosen_prompt[idx], self.rejected_prompt[idx]])
        t = int(lens.max())
        ids = torch.cat([self.chosen[idx, :t], self.rejected[idx, :t]])
        pos = torch.arange(t)[None].expand_as(ids)
        real = pos < lens[:, None]
        return {
            "input_ids": ids.contiguous(),
            "attention_mask": real.long(),
            "position_ids": pos.contiguous(),
            "loss_mask": (real & (pos >= prompt[:, None])).long(),
        }

    def tensors(self) -> dict[str, Tensor]:
        return self.batch(list(range(len(self))))

    def subset(self, idx: np.ndarray | list[int]) -> PreferenceSet:
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return PreferenceSet(
            **{f: getattr(self, f)[idx] for f in _FIELDS}, pad_id=self.pad_id, meta=dict(self.meta)
        )

    def split(self, heldout: int, seed: int = 0) -> tuple[PreferenceSet, PreferenceSet]:
        """(training pairs, `heldout` pairs drawn with `seed`); the held-out ones are never trained on."""
        if heldout >= len(self):
            raise DataError(
                f"{len(self)} preference pairs cannot spare {heldout} held-out pairs and still train; "
                "lower dpo.heldout_pairs or give more pairs"
            )
        perm = np.random.Generator(np.random.PCG64(seed)).permutation(len(self))
        return self.subset(np.sort(perm[heldout:])), self.subset(np.sort(perm[:heldout]))

    def fit(self, seq_len: int, where: str = "") -> PreferenceSet:
        """Cut rows to `seq_len` tokens (completions lose their end); a prompt with no room left for a single
        completion token is a DataError."""
        for side in ("chosen", "rejected"):
            prompt = getattr(self, f"{side}_prompt")
            bad = (prompt >= seq_len).nonzero()
            if len(bad):
                i = int(bad[0])
                raise DataError(
                    f"{where or 'preference pair'} {i}: the prompt is {int(prompt[i])} tokens, not shorter "
                    f"than the context dpo.seq_len={seq_len}, so no completion token fits; shorten the "
                    "prompt or raise dpo.seq_len"
                )
        cut = {
            f: getattr(self, f)[:, :seq_len] if f in ("chosen", "rejected") else getattr(self, f)
            for f in _FIELDS
        }
        cut["chosen_len"] = cut["chosen_len"].clamp(max=seq_len)
        cut["rejected_len"] = cut["rejected_len"].clamp(max=seq_len)
        truncated = int((self.chosen_len > seq_len).sum() + (self.rejected_len > seq_len).sum())
        return PreferenceSet(**cut, pad_id=self.pad_id, meta={**self.meta, "truncated": truncated})


def from_pairs(
    pairs: list[tuple[list[int], list[int], list[int], list[int]]], pad_id: int = 0, meta: dict | None = None
) -> PreferenceSet:
    """From (chosen prompt ids, chosen completion ids, rejected prompt ids, rejected completion ids)."""
    if not pairs:
        raise DataError("no preference pairs")
    width = max(max(len(a) + len(b), len(c) + len(d)) for a, b, c, d in pairs)
    out = {f: [] for f in _FIELDS}
    for cp, cc, rp, rc in pairs:
        for side, p, c in (("chosen", cp, cc), ("rejected", rp, rc)):
            row = torch.full((width,), pad_id, dtype=torch.long)
            row[: len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
            out[side].append(row)
            out[f"{side}_prompt"].append(len(p))
            out[f"{side}_len"].append(len(p) + len(c))
    return PreferenceSet(
        chosen=torch.stack(out["chosen"]),
        rejected=torch.stack(out["rejected"]),
        **{f: torch.tensor(out[f], dtype=torch.long) for f in _FIELDS[2:]},
        pad_id=pad_id,
        meta=meta or {},
    )


# ------------------------------------------------------------------------------------------------ files


def _files(sources: list[str] | str) -> list[Path]:
    out = []
    for s in [sources] if isinstance(sources, str) else sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise DataError(f"preference folder {p} has no .jsonl files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"preference file {p} does not exist (dpo.data lists jsonl files or folders)")
    return out


def _completion_text(value: Any, name: str, where: str) -> str:
    if isinstance(value, dict):  # an assistant message
        value = value.get("content")
    if not isinstance(value, str):
        raise DataError(
            f"{where}: '{name}' must be a string or an assistant message, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataError(f"{where}: '{name}' is empty; every pair needs two non-empty completions")
    return value


def _token_ids(value: Any, name: str, where: str, vocab: int | None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(
            f"{where}: '{name}' must be a list of token ids (this teacher has no tokenizer, so text cannot "
            "be tokenized)"
        )
    if vocab is not None and any(not 0 <= v < vocab for v in value):
        raise DataError(f"{where}: '{name}' has token ids outside the vocabulary 0..{vocab - 1}")
    return list(value)


def _render_reply(tokenizer, history: list[dict[str, Any]], reply: str) -> list[list[int]]:
    """[prompt ids, completion ids]: the prompt exactly as generation sees it (the history plus the generation
    prompt), the completion = what the template writes for the reply after it (end of turn included, trailing
    whitespace dropped). Templates that render the history differently once a reply follows fall back to the
    located assistant span of `render_chat`."""
    from arwkv.data.chat import render_chat, render_template

    asked = render_template(tokenizer, history, add_generation_prompt=True)
    full = render_template(tokenizer, [*history, {"role": "assistant", "content": reply}])
    if full.startswith(asked) and full[len(asked) :].strip():
        enc = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        return [enc(asked), enc(full[len(asked) :].rstrip())]
    ids, mask = render_chat(tokenizer, [*history, {"role": "assistant", "content": reply}])
    if not any(mask):
        return [ids, []]
    start = _last_run(mask)
    return [ids[:start], ids[start:]]


def _last_run(mask: list[int]) -> int:
    """Start of the final run of ones in `mask` (the last assistant turn)."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def encode_pair(
    record: dict[str, Any], tokenizer, where: str = "pair", vocab: int | None = None
) -> tuple[list[int], list[int], list[int], list[int]]:
    """One jsonl record → (chosen prompt, chosen completion, rejected prompt, rejected completion) ids."""
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object with prompt/chosen/rejected, got {type(record).__name__}"
        )
    has_prompt, has_messages = "prompt" in record, "messages" in record
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if not (has_prompt or has_messages):
        missing.insert(0, "prompt")
    if missing:
        raise DataError(
            f"{where}: missing field {', '.join(repr(m) for m in missing)}; each line needs prompt, chosen "
            "and rejected (or messages, chosen and rejected)"
        )
    if tokenizer is None:
        if has_messages:
            raise DataError(f"{where}: chat 'messages' need the teacher's tokenizer; this teacher has none")
        prompt = _token_ids(record["prompt"], "prompt", where, vocab)
        out = []
        for name in ("chosen", "rejected"):
            ids = _token_ids(record[name], name, where, vocab)
            if not ids:
                raise DataError(f"{where}: '{name}' is empty; every pair needs two non-empty completions")
            out += [prompt, ids]
        return out[0], out[1], out[2], out[3]

    texts = {n: _completion_text(record[n], n, where) for n in ("chosen", "rejected")}
    template = getattr(tokenizer, "chat_template", None)
    if has_messages or template:
        if has_messages:
            history = record["messages"]
            if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
                raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        else:
            if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                raise DataError(f"{where}: 'prompt' must be a non-empty string")
            history = [{"role": "user", "content": record["prompt"]}]
        out = []
        for name in ("chosen", "rejected"):
            try:
                out += _render_reply(tokenizer, history, texts[name])
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if not out[-1]:
                raise DataError(f"{where}: the chat template left no assistant tokens for '{name}'")
        return out[0], out[1], out[2], out[3]
    if not isinstance(record["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be a string")
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    c = tokenizer(texts["chosen"], add_special_tokens=False)["input_ids"] + eos
    r = tokenizer(texts["rejected"], add_special_tokens=False)["input_ids"] + eos
    return prompt, c, prompt, r


def load_preferences(
    sources: list[str] | str, tokenizer=None, seq_len: int = 1024, pad_id: int = 0, vocab: int | None = None
) -> PreferenceSet:
    """Every pair of the jsonl files, fitted to `seq_len`; bad lines are DataErrors naming file and line."""
    pairs, where_of = [], []
    for path in _files(sources):
        with path.open(encoding="utf-8", errors="strict") as f:
            try:
                lines = list(f)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); one JSON object per line") from None
            pair = encode_pair(record, tokenizer, where, vocab)
            for side, prompt in (("chosen", pair[0]), ("rejected", pair[2])):
                if len(prompt) >= seq_len:
                    raise DataError(
                        f"{where}: the prompt is {len(prompt)} tokens, not shorter than the context "
                        f"dpo.seq_len={seq_len}, so no {side} token fits; shorten the prompt or raise "
                        "dpo.seq_len"
                    )
            pairs.append(pair)
            where_of.append(where)
    if not pairs:
        raise DataError(f"the preference files {', '.join(map(str, _files(sources)))} hold no pairs")
    sets = from_pairs(pairs, pad_id, meta={"source": [str(p) for p in _files(sources)]})
    return sets.fit(seq_len)


# ------------------------------------------------------------------------------------------- data-free

Mode = Literal["bos", "chat"]


def _student_replies(student, prompts: list[list[int]], reply_len: int, eos_ids: list[int], pad_id: int):
    """The student's greedy continuation of each prompt (batched, left-padded, constant-memory generate)."""
    from transformers import GenerationConfig

    device = next(student.parameters()).device
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, x in enumerate(prompts):
        ids[i, p - len(x) :], attn[i, p - len(x) :] = torch.tensor(x), 1
    gc = GenerationConfig(
        max_new_tokens=reply_len,
        do_sample=False,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
    )
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = student.generate(ids.to(device), attention_mask=attn.to(device), generation_config=gc)
    finally:
        student.train(was)
    return [_cut(out[i, p:].cpu().tolist(), eos_ids) for i in range(len(prompts))]


def _cut(reply: list[int], eos_ids: list[int]) -> list[int]:
    """Up to and including the first EOS (the model chose to stop there)."""
    for j, t in enumerate(reply):
        if t in eos_ids:
            return reply[: j + 1]
    return reply


def _make_split(teacher, student, tokenizer, n: int, seed: int, s: dict[str, Any], bar) -> tuple[list, int]:
    from arwkv.data.teacher_corpus import chat_prompts, sample_sequences

    device = next(teacher.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    pairs, same = [], 0
    for start in range(0, n, s["batch_size"]):
        b = min(s["batch_size"], n - start)
        if s["mode"] == "bos":  # BOS + a teacher-written prefix of varied length: varied prompts, no text
            prefix, _, _ = sample_sequences(
                teacher, [[s["bos_id"]]] * b, 1 + s["prompt_max"], temperature=1.0, generator=gen
            )
            lengths = rng.integers(s["prompt_min"], s["prompt_max"] + 1, size=b)
            prompts = [prefix[i, : 1 + int(lengths[i])].tolist() for i in range(b)]
        else:
            prompts = chat_prompts(tokenizer, b, rng, s["prompts"], {})
        p = max(len(x) for x in prompts)
        full, lens, _ = sample_sequences(
            teacher,
            prompts,
            p + s["reply_len"],
            temperature=s["teacher_temperature"],
            eos_ids=tuple(s["eos_ids"]),
            pad_id=s["pad_id"],
            generator=gen,
        )
        teacher_replies = [
            full[i, len(x) : min(int(lens[i]), len(x) + s["reply_len"])].tolist()
            for i, x in enumerate(prompts)
        ]
        student_replies = _student_replies(student, prompts, s["reply_len"], s["eos_ids"], s["pad_id"])
        for x, c, r in zip(prompts, teacher_replies, student_replies, strict=True):
            if c == r or not c or not r:  # identical replies: no preference to learn
                same += 1
                continue
            pairs.append((x, c, x, r))
        bar.update(b)
    return pairs, same


def data_free_preferences(
    teacher,
    student,
    tokenizer=None,
    *,
    num_pairs: int,
    num_heldout: int = 0,
    mode: Literal["auto", "bos", "chat"] = "auto",
    prompt_min: int = 4,
    prompt_max: int = 32,
    reply_len: int = 64,
    teacher_temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[PreferenceSet, PreferenceSet | None]:
    """(training pairs, held-out pairs or None): the teacher's reply is chosen, the student's greedy reply
    rejected. Training and held-out prompts come from different seeds. Cached in `cache_dir`."""
    from arwkv.data.teacher_corpus import DEFAULT_PROMPTS, teacher_fingerprint

    if mode == "auto":
        mode = "chat" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "bos"
    config = teacher.config
    bos = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else None
    bos = config.bos_token_id if bos is None else bos
    if mode == "bos" and bos is None:
        raise DataError("data-free preferences in 'bos' mode need a BOS token; this teacher has none")
    if mode == "chat" and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise DataError(
            "data-free preferences in 'chat' mode need the teacher's tokenizer with a chat template; use "
            "dpo.data_free.prompts=bos"
        )
    eos_ids: list[int] = []
    if mode == "chat":
        gen_eos = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
        for e in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
            if e is not None and int(e) not in eos_ids:
                eos_ids.append(int(e))
    pad = next(
        (
            int(i)
            for i in (getattr(tokenizer, "pad_token_id", None), config.pad_token_id, *eos_ids[:1])
            if i is not None
        ),
        0,
    )
    settings = {
        "format": FORMAT_VERSION,
        "mode": mode,
        "num_pairs": int(num_pairs),
        "num_heldout": int(num_heldout),
        "prompt_min": int(prompt_min),
        "prompt_max": int(prompt_max),
        "reply_len": int(reply_len),
        "teacher_temperature": float(teacher_temperature),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "bos_id": None if bos is None else int(bos),
        "eos_ids": eos_ids,
        "pad_id": pad,
        "teacher": teacher_fingerprint(teacher),
        "student": teacher_fingerprint(student),
        "prompts": DEFAULT_PROMPTS if mode == "chat" else [],
        "template": str(getattr(tokenizer, "chat_template", "")) if mode == "chat" else "",
        **({"autocast": "bfloat16"} if torch.is_autocast_enabled("cpu") else {}),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"preferences-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return _load(path, settings)
    was = teacher.training
    teacher.eval()
    sets: dict[str, PreferenceSet | None] = {}
    with tqdm(
        total=num_pairs + num_heldout, desc="teacher and student write preference pairs", disable=not progress
    ) as bar:
        for split, n, sd in (("train", num_pairs, 2 * seed), ("heldout", num_heldout, 2 * seed + 1)):
            if n == 0:
                sets[split] = None
                continue
            pairs, same = _make_split(teacher, student, tokenizer, n, sd, settings, bar)
            if not pairs:
                raise DataError(
                    f"the student's greedy replies equal the teacher's on all {n} {split} prompts: there is "
                    "nothing for DPO to learn (use longer replies, dpo.data_free.reply_len, or sampled "
                    "teacher replies, dpo.data_free.teacher_temperature)"
                )
            sets[split] = from_pairs(pairs, pad, meta={**settings, "split": split, "dropped_identical": same})
    teacher.train(was)
    if path is not None:
        _save(path, sets)
    return sets["train"], sets["heldout"]


def _save(path: Path, sets: dict[str, PreferenceSet | None]) -> None:
    tensors, meta = {}, {}
    for split, ps in sets.items():
        if ps is None:
            continue
        width = ps.seq_len
        for f in _FIELDS:
            t = getattr(ps, f)
            if t.dim() == 2:
                t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=ps.pad_id)
            tensors[f"{split}.{f}"] = t.to(torch.int32).contiguous()
        meta[split] = ps.meta
    try:
        write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)}))
    except Exception as e:  # the pairs are still good: carry on without a cache
        warnings.warn(
            f"could not write the preference cache {path} ({type(e).__name__}); the next run makes the pairs "
            "again (free disk space, or set dpo.data_free.cache_dir)",
            stacklevel=3,
        )


def _load(path: Path, settings: dict[str, Any]) -> tuple[PreferenceSet, PreferenceSet | None]:
    from safetensors import safe_open

    try:
        t = load_file(path)
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise DataError(f"the preference cache {path} is unreadable ({e}); delete it to make it again") from e
    out = []
    for split in ("train", "heldout"):
        if f"{split}.chosen" not in t:
            out.append(None)
            continue
        out.append(
            PreferenceSet(
                **{f: t[f"{split}.{f}"].long() for f in _FIELDS},
                pad_id=settings["pad_id"],
                meta={**meta[split], "from_cache": True},
            )
        )
    return out[0], out[1]
