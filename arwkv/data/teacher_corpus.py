"""Data-free mode: the teacher writes the training corpus, which is cached on disk and reused.

Two ways to start a sequence:

* `"bos"`: every sequence starts at the BOS token and is sampled to exactly `seq_len` tokens (an EOS does
  not stop it: what the teacher writes after it is still the teacher's distribution). Token level, so it
  works for teachers without a tokenizer (stories260K).
* `"chat"`: a user prompt drawn (seeded) from `DEFAULT_PROMPTS` is rendered with the chat template and the
  teacher writes the reply, until EOS or `seq_len` tokens in all. Each sample is one conversation.

Sampling is plain ancestral sampling with the model's KV cache at `temperature` (default 1: the teacher's own
distribution; `top_k` 0 = the full vocabulary), driven by a seeded `torch.Generator`, so a corpus is a pure
function of (teacher weights, settings). Training and held-out sequences come from different generator
seeds, so changing `num_train` never changes the held-out set.

Speed (stories260K, 1 thread, batch 64): about 4,500 sampled tokens per CPU-second, so 1,000 x 256 tokens
take ~57 CPU-s (calibration-stories260k.md: 38 s wall on 2 uncontended threads with a bespoke sampler).

The cache file is `<cache_dir>/teacher-corpus-<hash>.safetensors`, the hash covering a fingerprint of the
teacher's weights and config (or `teacher_id`), the tokenizer's chat template and every sampling setting;
it is written to a temporary name and renamed, so an interrupted run never leaves a truncated cache.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache

from arwkv.atomic import write_file
from arwkv.data.packing import PackedCorpus
from arwkv.errors import DataError
from arwkv.ops.divergence import TeacherTopK, teacher_topk

FORMAT_VERSION = 1
Mode = Literal["bos", "chat"]

DEFAULT_PROMPTS = [
    "Tell me a short story about a dragon who is afraid of the dark.",
    "What is the capital of France, and what is it famous for?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn rain.",
    "How do I reverse a list in Python?",
    "What are three tips for sleeping better?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Why is the sky blue?",
    "Give me a simple recipe for pancakes.",
    "What is 17 times 23? Show your steps.",
    "Write a polite email asking my manager for a day off.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "List five animals that live in the ocean.",
    "How does a bicycle stay upright?",
    "Write a short poem about friendship.",
    "What causes earthquakes?",
    "Explain what a prime number is, with examples.",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "What should I pack for a weekend camping trip?",
    "Who was Marie Curie?",
    "Write a function in JavaScript that checks whether a string is a palindrome.",
    "How can I be more productive when working from home?",
    "Explain the water cycle.",
    "Tell me a joke about computers.",
    "What are the planets of the solar system, in order?",
    "Write a story that begins with: 'The door had never been opened before.'",
    "What is machine learning, in simple terms?",
    "How do vaccines work?",
    "Give me three ideas for a child's birthday party.",
    "What is the Pythagorean theorem?",
    "Describe your ideal vacation.",
    "Why do leaves change color in the fall?",
    "How do I make a cup of green tea properly?",
    "Write a dialogue between a robot and a gardener.",
    "What is the difference between a virus and a bacterium?",
    "Explain how to tie a shoelace step by step.",
    "What are some good habits for learning a new language?",
    "Write a limerick about a forgetful wizard.",
    "What happened during the first moon landing?",
    "How does the internet work?",
    "Suggest a name for a small coffee shop and explain why.",
    "What is gravity?",
    "Write a short motivational message for a student before an exam.",
    "Compare apples and oranges in a short table.",
    "What is the boiling point of water, and does it change with altitude?",
    "Tell me about the history of chess.",
    "How can I save money on groceries?",
]
STYLES = [
    "",
    "",
    "",
    " Answer briefly.",
    " Please explain in detail.",
    " Use a list.",
    " Answer in one paragraph.",
    " Be creative.",
]


@dataclass
class TeacherCorpus:
    """Sampled token ids, right-padded: `train` [N, L], `heldout` [M, L] (int64). `*_lengths` are the real
    lengths and `*_prompt_lengths` the prompt part (0 in "bos" mode). `meta` holds the settings and
    `from_cache` whether this call sampled nothing."""

    train: Tensor
    heldout: Tensor
    train_lengths: Tensor
    heldout_lengths: Tensor
    train_prompt_lengths: Tensor
    heldout_prompt_lengths: Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    path: Path | None = None
    # the teacher's top-k at every position of every training sequence, recorded while sampling
    # (`record_topk`): stage 2's teacher cache is filled from it instead of running the teacher again
    train_topk: TeacherTopK | None = None

    def packed(
        self,
        which: Literal["train", "heldout"] = "train",
        seq_len: int | None = None,
        reply_only: bool = False,
        pad_id: int = 0,
    ) -> PackedCorpus:
        """The sequences as a `PackedCorpus` (one document each; with seq_len = L, one row each).
        `reply_only` puts only the teacher's reply in the loss mask (chat mode, SFT-style)."""
        ids, lengths, prompt = (
            getattr(self, which),
            getattr(self, f"{which}_lengths"),
            getattr(self, f"{which}_prompt_lengths"),
        )
        if len(ids) == 0:
            raise DataError(f"the teacher corpus has no {which} sequences")
        mask = None
        if reply_only:
            mask = (torch.arange(ids.shape[1])[None] >= prompt[:, None]).to(torch.uint8)
        return PackedCorpus.from_sequences(
            ids,
            seq_len,
            lengths=lengths.tolist(),
            loss_mask=mask,
            whole=self.meta.get("mode") == "chat",
            pad_id=pad_id,
        )


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the config and every parameter's bytes (~1 s per 500 MB): a changed weight changes it."""
    h = hashlib.blake2b(digest_size=32)
    config = getattr(model, "config", None)
    if config is not None:
        skip = ("_name_or_path", "transformers_version")
        cfg = {k: v for k, v in config.to_dict().items() if k not in skip}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def sample_sequences(
    model,
    prompts: list[list[int]],
    max_len: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    record_topk: int = 0,
    record_temperature: float = 1.0,
) -> Samples:
    """Continue each prompt to `max_len` tokens in all (or until an EOS in `eos_ids`).

    Returns Samples(ids [B, max_len] right-padded with `pad_id`, lengths [B], topk). Prompts are left-padded
    internally. With `record_topk` k > 0 (one-token prompts, e.g. BOS) `topk` holds the teacher's top-k
    log-probs at `record_temperature` at every position [B, max_len, k], taken from the logits sampling
    computes anyway (one extra decode step gives the last position's): the same numbers a forward over the
    finished sequence gives, up to rounding.
    """
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    if P >= max_len:
        raise DataError(f"a prompt has {P} tokens, not less than the sequence length {max_len}")
    x = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((B, P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, P - len(p) :] = torch.tensor(p, device=device)
        attn[i, P - len(p) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    padded = any(len(p) != P for p in prompts)  # without padding no mask is needed (cheaper steps)
    if record_topk and (P != 1 or padded):
        raise DataError("recording the teacher's top-k while sampling needs one-token prompts (BOS mode)")
    recorded: list[TeacherTopK] = []
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=x,
        attention_mask=attn if padded else None,
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    budget = torch.tensor([max_len - len(p) for p in prompts], device=device)  # new tokens per row
    out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids or [-1], device=device)
    for step in range(int(budget.max())):
        if record_topk:
            recorded.append(teacher_topk(logits.float(), record_topk, record_temperature))
        tok = _draw(logits.float(), temperature, top_k, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out.append(tok)
        done |= torch.isin(tok, eos) | (budget <= step + 1)
        if bool(done.all()) and not record_topk:
            break
        if padded:  # finished rows run on; their tail is dropped below
            attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(
            input_ids=tok[:, None],
            attention_mask=attn if padded else None,
            position_ids=pos,
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
        if bool(done.all()):  # recording: the step above gave the last position's logits
            recorded.append(teacher_topk(logits.float(), record_topk, record_temperature))
            break
    gen = torch.stack(out, dim=1)
    ids = torch.full((B, max_len), pad_id, dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    for i, p in enumerate(prompts):
        reply = gen[i, : max_len - len(p)].cpu()
        hit = torch.isin(reply, eos.cpu()).nonzero()
        n = int(hit[0]) + 1 if len(hit) else len(reply)  # keep the EOS: the teacher chose to stop
        seq = torch.cat([torch.tensor(p, dtype=torch.long), reply[:n]])
        ids[i, : len(seq)], lengths[i] = seq, len(seq)
    topk = None
    if record_topk:
        t = TeacherTopK.stack(recorded, dim=1)[:, :max_len]
        topk = TeacherTopK(t.ids.to(torch.int32).cpu(), t.logp.cpu(), t.tail_logp.cpu())
    return Samples(ids, lengths, topk)


class Samples(NamedTuple):
    ids: Tensor
    lengths: Tensor
    topk: TeacherTopK | None = None


def _draw(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def chat_prompts(
    tokenizer, n: int, rng: np.random.Generator, prompts: list[str], template_kwargs: dict[str, Any]
) -> list[list[int]]:
    out = []
    for _ in range(n):
        text = prompts[rng.integers(len(prompts))] + STYLES[rng.integers(len(STYLES))]
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, **template_kwargs
        )
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def _sample_split(
    model,
    n: int,
    seq_len: int,
    mode: Mode,
    seed: int,
    settings: dict[str, Any],
    tokenizer,
    bar: tqdm,
    record: bool = False,
) -> tuple[Tensor, Tensor, Tensor, TeacherTopK | None]:
    ids_all, len_all, prompt_all, topk_all = [], [], [], []
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    bos = settings["bos_id"]
    for start in range(0, n, settings["batch_size"]):
        b = min(settings["batch_size"], n - start)
        if mode == "bos":
            prompts = [[bos]] * b
        else:
            prompts = chat_prompts(tokenizer, b, rng, settings["prompts"], settings["template_kwargs"])
        ids, lengths, topk = sample_sequences(
            model,
            prompts,
            seq_len,
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            eos_ids=tuple(settings["eos_ids"]),
            pad_id=settings["pad_id"],
            generator=gen,
            record_topk=settings.get("record_topk", 0) if record else 0,
            record_temperature=settings.get("record_temperature", 1.0),
        )
        ids_all.append(ids)
        topk_all.append(topk)
        len_all.append(lengths)
        prompt_all.append(torch.tensor([len(p) for p in prompts]) if mode == "chat" else torch.zeros(b))
        bar.update(int(lengths.sum()))
    if not ids_all:
        return (
            torch.zeros((0, seq_len), dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            None,
        )
    topk = TeacherTopK.cat(topk_all) if record else None
    return torch.cat(ids_all), torch.cat(len_all), torch.cat(prompt_all).long(), topk


def teacher_corpus(
    teacher,
    *,
    num_train: int,
    num_heldout: int = 0,
    seq_len: int = 256,
    mode: Mode = "bos",
    tokenizer=None,
    temperature: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    teacher_id: str | None = None,
    prompts: list[str] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    record_topk: int = 0,
    record_temperature: float = 1.0,
) -> TeacherCorpus:
    """Sample (or load from the cache) `num_train` + `num_heldout` sequences of at most `seq_len` tokens.

    >>> corpus = teacher_corpus(teacher, num_train=4000, num_heldout=256, cache_dir="runs/.cache")
    >>> train_rows = corpus.packed("train")                # PackedCorpus, one sequence per row
    >>> heldout = corpus.packed("heldout").tensors()      # dict of [256, 256] tensors

    `record_topk` k > 0 ("bos" mode) also keeps the teacher's top-k at `record_temperature` for every
    training position (`corpus.train_topk`, 6k + 4 bytes per token, in the same cache file).
    """
    if record_topk and mode != "bos":
        raise DataError("the teacher's top-k can be recorded while sampling in 'bos' mode only")
    settings = _settings(
        teacher,
        tokenizer,
        mode,
        seq_len,
        temperature,
        top_k,
        batch_size,
        seed,
        num_train,
        num_heldout,
        teacher_id,
        prompts,
        template_kwargs,
    )
    if record_topk:  # only then: the key of a corpus without a record is unchanged
        settings.update(record_topk=int(record_topk), record_temperature=float(record_temperature))
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"teacher-corpus-{key[:20]}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return _load(path, settings)
    was_training = teacher.training
    teacher.eval()
    with tqdm(
        total=(num_train + num_heldout) * seq_len,
        desc=f"teacher writes corpus ({mode})",
        unit=" tok",
        unit_scale=True,
        disable=not progress,
    ) as bar:
        train = _sample_split(
            teacher,
            num_train,
            seq_len,
            mode,
            seed * 2 + 0,
            settings,
            tokenizer,
            bar,
            record=bool(record_topk),
        )
        held = _sample_split(teacher, num_heldout, seq_len, mode, seed * 2 + 1, settings, tokenizer, bar)
    teacher.train(was_training)
    corpus = TeacherCorpus(
        train[0], held[0], train[1], held[1], train[2], held[2], meta=settings, path=path, train_topk=train[3]
    )
    if path is not None:
        _save_atomically(path, corpus)
    return corpus


def _settings(
    teacher,
    tokenizer,
    mode,
    seq_len,
    temperature,
    top_k,
    batch_size,
    seed,
    num_train,
    num_heldout,
    teacher_id,
    prompts,
    template_kwargs,
) -> dict[str, Any]:
    if mode not in ("bos", "chat"):
        raise DataError(f"data-free prompts must be 'bos' or 'chat', not {mode!r}")
    config = teacher.config
    bos = config.bos_token_id
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        bos = tokenizer.bos_token_id
    if mode == "bos" and bos is None:
        raise DataError(
            "the teacher has no BOS token to start sampling from; use prompts='chat' or give data"
        )
    if mode == "chat" and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise DataError(
            "data-free 'chat' mode needs the teacher's tokenizer with a chat template; "
            "use prompts='bos' for a teacher without one"
        )
    eos_ids: list[int] = []
    if mode == "chat":  # stop where the teacher would stop: its tokenizer's and generation config's EOS
        gen_eos = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
        for e in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
            if e is not None and e not in eos_ids:
                eos_ids.append(int(e))
    pad = next(
        (
            i
            for i in (
                getattr(tokenizer, "pad_token_id", None),
                config.pad_token_id,
                eos_ids[0] if eos_ids else None,
            )
            if i is not None
        ),
        0,
    )
    return {
        "format": FORMAT_VERSION,
        "mode": mode,
        "seq_len": seq_len,
        "temperature": float(temperature),
        "top_k": int(top_k),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "num_train": int(num_train),
        "num_heldout": int(num_heldout),
        "bos_id": None if bos is None else int(bos),
        "eos_ids": eos_ids,
        "pad_id": int(pad),
        "teacher": teacher_id or teacher_fingerprint(teacher),
        "prompts": (prompts or DEFAULT_PROMPTS) if mode == "chat" else [],
        "template": str(getattr(tokenizer, "chat_template", "")) if mode == "chat" else "",
        "template_kwargs": template_kwargs or {},
        "dtype": str(next(teacher.parameters()).dtype),
        # bf16 autocast samples other tokens than fp32: a separate cache (the key is unchanged without it)
        **({"autocast": "bfloat16"} if torch.is_autocast_enabled("cpu") else {}),
    }


_FIELDS = (
    "train",
    "heldout",
    "train_lengths",
    "heldout_lengths",
    "train_prompt_lengths",
    "heldout_prompt_lengths",
)


def _save_atomically(path: Path, corpus: TeacherCorpus) -> None:
    tensors = {f: getattr(corpus, f).to(torch.int32).contiguous() for f in _FIELDS}
    if corpus.train_topk is not None:
        t = corpus.train_topk
        tensors["train_topk_ids"] = t.ids.to(torch.int32).contiguous()
        tensors["train_topk_logp"] = t.logp.to(torch.float16).contiguous()
        tensors["train_topk_tail"] = t.tail_logp.float().contiguous()
    try:
        write_file(
            path, lambda tmp: save_file(tensors, str(tmp), metadata={"settings": json.dumps(corpus.meta)})
        )
    except Exception as e:  # the samples are still good: carry on without a cache rather than lose them
        # (a full disk arrives as safetensors' own error type, not only as OSError)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        warnings.warn(
            f"could not write the teacher corpus cache {path} ({type(e).__name__}: {first}); the next run "
            "will sample again (free disk space, or set another cache_dir)",
            stacklevel=3,
        )


def _load(path: Path, settings: dict[str, Any]) -> TeacherCorpus:
    try:
        t = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise DataError(f"the teacher corpus cache {path} is unreadable ({e}); delete it to resample") from e
    try:
        tensors = {f: t[f].long() for f in _FIELDS}
        topk = None
        if settings.get("record_topk"):
            topk = TeacherTopK(t["train_topk_ids"], t["train_topk_logp"], t["train_topk_tail"])
    except KeyError as e:
        raise DataError(f"the teacher corpus cache {path} lacks {e}; delete it to resample") from e
    return TeacherCorpus(**tensors, meta=settings, from_cache=True, path=path, train_topk=topk)
