"""`arwkv generate` and `arwkv chat`: load any model spec with the one loader and stream its output."""

from __future__ import annotations

from arwkv.errors import ArwkvError
from arwkv.loading import pad_token_id


def _load_for_generation(spec: str, device: str):
    from arwkv.loading import load_model
    from arwkv.train.distributed import resolve_device

    dev = resolve_device(device)
    model, tok = load_model(spec, device=dev)
    return model, tok, dev


class _IdStreamer:
    """Streams token ids (models without a tokenizer)."""

    def __init__(self) -> None:
        self.first = True

    def put(self, value) -> None:
        if self.first:  # generate() hands the prompt first
            self.first = False
            return
        print(" ".join(str(int(t)) for t in value.reshape(-1)), end=" ", flush=True)

    def end(self) -> None:
        print(flush=True)


def _check_generation_args(args) -> None:
    """Refuse nonsense sampling settings before a model is loaded."""
    if args.max_new_tokens < 1:
        raise ArwkvError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise ArwkvError(f"--temperature must be ≥ 0 (0 = greedy; got {args.temperature})")
    if args.top_k < 0:
        raise ArwkvError(f"--top-k must be ≥ 0 (0 = no limit; got {args.top_k})")


def _generate(model, tok, dev, input_ids, args, streamer):
    import torch

    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        streamer=streamer,
        pad_token_id=pad_token_id(tok),
    )
    if sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k or None)
    ids = torch.tensor([input_ids], device=dev)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, ids.shape[1] :].tolist()


def cli_generate(args) -> int:
    _check_generation_args(args)
    model, tok, dev = _load_for_generation(args.model, args.device)
    if tok is None:
        bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
        try:
            ids = [int(t) for t in args.prompt.split()] if args.prompt and args.prompt.strip() else [bos]
        except ValueError:
            raise ArwkvError(
                'this model has no tokenizer: give the prompt as token ids, e.g. "1 403 12"'
            ) from None
        vocab = int(model.config.vocab_size)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ArwkvError(f"token ids {bad} are outside this model's vocabulary (0..{vocab - 1})")
        _generate(model, tok, dev, ids, args, _IdStreamer())
        return 0
    from transformers import TextStreamer

    prompt = args.prompt or ""
    ids = tok(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    if not ids:  # an empty prompt (or one the tokenizer reads as nothing): start from BOS
        ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    print(prompt, end="", flush=True)
    _generate(model, tok, dev, ids, args, TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    return 0


def cli_chat(args) -> int:
    _check_generation_args(args)
    model, tok, dev = _load_for_generation(args.model, args.device)
    if tok is None or not getattr(tok, "chat_template", None):
        raise ArwkvError(f"{args.model} has no tokenizer with a chat template; use `arwkv generate` instead")
    from transformers import TextStreamer

    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("(empty line or Ctrl-D to quit)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        print("model> ", end="", flush=True)
        reply = _generate(
            model, tok, dev, ids, args, TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        )
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    return 0
