"""Stage 1 — attention alignment (method.md §3).

One frozen teacher forward per batch; hooks capture, for every replaced layer l, the input of the
teacher's attention (its `input_layernorm` output, with the teacher's RoPE tables) and its output. Each
student mixer gets the teacher's input and is trained to reproduce the teacher's output: MSE (RADLADS) or
L2/sqrt(C) (ARWKV), masked on padding, averaged over layers. The residual stream stays the teacher's, so all
layers train at once and independently, except for the value residual: `v_first` comes from the first mixer
on the teacher-forced input. Only mixer parameters train. The teacher's attention exists only here (the
student never holds it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from arwkv.config import AlignConfig
from arwkv.train.forward import Batch, decoder_layers, model_inputs
from arwkv.train.loop import LoopResult, train
from arwkv.train.losses import output_match_loss
from arwkv.train.params import mixer_layers, param_groups


class AlignTask(nn.Module):
    """forward(batch) -> (loss sum, token count, {}) for the stage-1 loss of all mixer layers at once.

    `layers` defaults to every RWKV layer. A kept softmax layer may be listed too: it is called exactly as the
    teacher called its own attention, so its loss is 0 (a check that the plumbing feeds the teacher's input).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: str = "mse",
        layers: list[int] | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, saved or synced by DDP
        self.rwkv = list(mixer_layers(student))
        self.layers = sorted(self.rwkv if layers is None else layers)
        if not self.layers:
            raise ValueError("the student has no RWKV mixer layers to align")
        self.loss, self.grad_checkpointing = loss, grad_checkpointing
        teacher.requires_grad_(False)

    def count(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def _teacher_io(self, batch: Batch) -> dict[int, tuple[tuple, dict, Tensor]]:
        """{layer: (attention args, attention kwargs, attention output)} from one teacher forward."""
        captured: dict[int, list[Any]] = {}
        handles = []
        t_layers = decoder_layers(self.teacher)
        for i in self.layers:

            def pre(mod, args, kwargs, i=i):
                captured[i] = [args, kwargs]

            def post(mod, args, kwargs, output, i=i):
                captured[i].append(output[0] if isinstance(output, tuple) else output)

            attn = t_layers[i].self_attn
            handles += [
                attn.register_forward_pre_hook(pre, with_kwargs=True),
                attn.register_forward_hook(post, with_kwargs=True),
            ]
        try:
            with torch.no_grad():
                dtype = next(self.teacher.parameters()).dtype
                # the base model only: the teacher's logits are not needed in this stage
                self.teacher.model(**model_inputs(batch, dtype), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return {i: tuple(v) for i, v in captured.items()}

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        io = self._teacher_io(batch)
        s_layers = decoder_layers(self.student)
        outs: dict[int, Tensor] = {}
        rwkv = [i for i in self.layers if i in self.rwkv]
        inputs = {i: _attn_input(*io[i][:2]).detach() for i in rwkv}
        if not inputs:
            pass  # only kept softmax layers were asked for
        elif hasattr(self.student, "mixer_outputs"):
            # the arwkv student applies its own packing / RoPE / v_first rules
            kw = model_inputs(batch, recurrent=True)
            outs.update(self.student.mixer_outputs(inputs, kw["attention_mask"], kw["position_ids"]))
        else:
            outs.update(
                _generic_mixers(s_layers, inputs, batch, {i: io[i][1] for i in rwkv}, self.grad_checkpointing)
            )
        for i in self.layers:
            if i not in self.rwkv:  # kept softmax attention: the teacher's exact call
                args, kwargs, _ = io[i]
                out = s_layers[i].self_attn(*args, **kwargs)
                outs[i] = out[0] if isinstance(out, tuple) else out
        total, count = output_match_loss(
            [outs[i] for i in self.layers],
            [io[i][2] for i in self.layers],
            batch.get("attention_mask"),
            self.loss,
        )
        return total, count, {}


def _attn_input(args: tuple, kwargs: dict) -> Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _generic_mixers(
    s_layers: nn.ModuleList,
    inputs: dict[int, Tensor],
    batch: Batch,
    teacher_kwargs: dict,
    grad_checkpointing: bool,
) -> dict[int, Tensor]:
    """Any student whose mixers take the arwkv signature `(x, v_first, attention_mask, layer_state,
    cu_seqlens, position_embeddings) -> (out, v_first, state)`; v_first flows from the first mixer."""
    call = _MixerCall(batch)
    outs, v_first = {}, None
    for i in sorted(inputs):
        mixer = s_layers[i].self_attn
        pe = teacher_kwargs[i].get("position_embeddings")
        x = inputs[i].to(next(mixer.parameters()).dtype)
        if grad_checkpointing and torch.is_grad_enabled():
            outs[i], v_first = checkpoint(call, mixer, x, v_first, pe, use_reentrant=False)
        else:
            outs[i], v_first = call(mixer, x, v_first, pe)
    return outs


class _MixerCall:
    """Calls a mixer with the arwkv signature. Packed documents become `cu_seqlens` over a flattened [1, B*T]
    row so the recurrent state resets at every document start; padding goes in as the 2D mask."""

    def __init__(self, batch: Batch) -> None:
        kw = model_inputs(batch, recurrent=True)
        pos, self.mask = kw["position_ids"], kw["attention_mask"]
        self.cu_seqlens = None
        if self.mask is None and bool((pos[:, 1:] - pos[:, :-1] != 1).any()):
            b, t = pos.shape
            starts = torch.ones_like(pos, dtype=torch.bool)
            starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1  # every row also starts a document
            where = starts.reshape(-1).nonzero().squeeze(-1)
            self.cu_seqlens = torch.cat([where, where.new_tensor([b * t])])

    def __call__(self, mixer: nn.Module, x: Tensor, v_first: Tensor | None, pe: Any) -> tuple[Tensor, Tensor]:
        if self.cu_seqlens is None:
            out, v_first, _ = mixer(x, v_first=v_first, attention_mask=self.mask, position_embeddings=pe)
            return out, v_first
        b, t = x.shape[:2]
        pe = tuple(p.expand(b, t, -1).reshape(1, b * t, -1) for p in pe) if pe is not None else None
        out, v_first, _ = mixer(
            x.reshape(1, b * t, -1),
            v_first=v_first,
            attention_mask=None,
            cu_seqlens=self.cu_seqlens,
            position_embeddings=pe,
        )
        return out.reshape(b, t, -1), v_first


def run_align(
    student: nn.Module, teacher: nn.Module, data, cfg: AlignConfig, run_dir, **loop_kwargs
) -> LoopResult:
    """Train every mixer of `student` against `teacher` for `cfg.tokens`; only mixer parameters train."""
    groups = param_groups(student, cfg.lr, cfg.mixer_lr, only=["mixers"])
    task = AlignTask(
        student, teacher, loss=cfg.loss, grad_checkpointing=loop_kwargs.pop("grad_checkpointing", False)
    )
    return train(task, data, cfg, run_dir, param_groups=groups, desc="align", **loop_kwargs)
