"""Render chat `messages` with the tokenizer's chat template and mark the tokens the assistant writes.

The mask is aligned with the token ids: `mask[t] = 1` when token t is part of an assistant reply (its content,
anything the template puts between the generation prompt and the content, such as Qwen3's empty
`<think></think>` block, and the end-of-turn marker, e.g. `<|im_end|>`). Labels are shifted exactly once, in
the loss: logits[:, t] predict input_ids[:, t+1] and count when loss_mask[:, t+1] = 1 (see `packing.py`).

Two ways to find the assistant tokens:

* `"generation"`: templates with `{% generation %}` blocks; transformers' `return_assistant_tokens_mask`.
* `"search"`: any template. The full conversation is rendered once; each message's content is located in
  that string after the previous one's, and each reply's span is extended back to the end of the
  generation prompt (`add_generation_prompt=True` rendering minus the plain rendering) and forward over
  the end-of-turn text the template writes after a final assistant turn. Unlike a prefix diff of partial
  renderings, this also works for templates that render earlier turns differently from the last one
  (Qwen3 drops reasoning from history). Token i is an assistant token when its first character lies
  inside a reply span.

`"auto"` uses `"generation"` when the template has the tags, else `"search"`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from arwkv.errors import DataError

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
Method = Literal["auto", "generation", "search"]


def chat_template_of(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so chat `messages`"
            " cannot be rendered: use the instruct model's tokenizer (it ships the template) or plain text"
        )
    return template


def has_generation_tags(tokenizer) -> bool:
    return bool(_GENERATION_TAG.search(chat_template_of(tokenizer)))


def render_chat(
    tokenizer, messages: list[dict[str, Any]], *, method: Method = "auto", **template_kwargs: Any
) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, 0/1 assistant-token mask of the same length).

    >>> chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    >>> ids, mask = render_chat(tok, chat)
    >>> tok.decode([i for i, m in zip(ids, mask) if m])
    'Hello<|im_end|>'
    """
    chat_template_of(tokenizer)
    if method == "auto":
        method = "generation" if has_generation_tags(tokenizer) else "search"
    if method == "generation":
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **template_kwargs
        )
        return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
    if method != "search":
        raise DataError(f"chat mask method must be 'auto', 'generation' or 'search', not {method!r}")
    text = render_template(tokenizer, messages, **template_kwargs)
    return _tokenize_with_spans(tokenizer, text, _assistant_spans(tokenizer, messages, text, template_kwargs))


def render_template(
    tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kw: Any
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
        )
    except Exception as e:  # jinja raises TemplateError / TypeError / IndexError for unexpected messages
        roles = [m.get("role") for m in messages]
        raise DataError(f"the chat template failed on a conversation with roles {roles}: {e}") from e


def _generation_prompt(tokenizer, history: list[dict[str, Any]], kw: dict[str, Any]) -> str:
    """What the template appends to `history` to ask for the next assistant turn ('' when unknown)."""
    if not history:
        return ""
    try:
        plain = render_template(tokenizer, history, **kw)
        asked = render_template(tokenizer, history, add_generation_prompt=True, **kw)
    except DataError:
        return ""
    return asked[len(plain) :] if asked.startswith(plain) else ""


def _assistant_spans(
    tokenizer, messages: list[dict[str, Any]], text: str, kw: dict[str, Any]
) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        body = m["content"].strip()
        if m["role"] != "assistant":
            # step over the other turns' text too, so a reply that also occurs in a prompt is found in place
            k = text.find(body, cursor) if body else -1
            cursor = k + len(body) if k >= 0 else cursor
            continue
        j = text.find(body, cursor)
        if j < 0:
            raise DataError(
                f"assistant turn {i} ({body[:40]!r}...) does not appear verbatim in the rendered "
                "conversation, so its tokens cannot be located: use a chat template with {% generation %}"
                " tags"
            )
        start = j
        gen = _generation_prompt(tokenizer, messages[:i], kw).rstrip(" ")
        g = text.rfind(gen, cursor, j) if gen.strip() else -1
        if g >= 0:
            start = g + len(gen)
        end = j + len(body)
        alone = render_template(tokenizer, messages[: i + 1], **kw)  # the template's end-of-turn text
        k = alone.rfind(body)
        eot = alone[k + len(body) :].rstrip() if k >= 0 else ""
        if eot and text.startswith(eot, end):
            end += len(eot)
        spans.append((start, end))
        cursor = end
    return spans


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    def inside(pos: int) -> int:
        return int(any(s <= pos < e for s, e in spans))

    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [inside(s) for s, _ in enc["offset_mapping"]]
    # slow tokenizers have no offsets: tokenize the pieces between span edges separately
    cuts = sorted({0, len(text), *[c for span in spans for c in span]})
    ids, mask = [], []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [inside(a)] * len(piece)
    return ids, mask
