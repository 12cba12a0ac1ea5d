"""Which layers keep softmax attention: chosen by measurement (`arwkv select-layers`,
`student.softmax_layers: auto:K`).

For a budget of K softmax layers:
1. a student with RWKV mixers in every layer gets a short stage 1 (all layers at once, teacher-forced, as
   `arwkv.recipes.align`; `select.align_tokens`);
2. each mixer is swapped in *alone*: the teacher runs with only layer l's attention output replaced by the
   aligned mixer's output on the teacher's own input at l (with `v_first` from the first mixer on the
   teacher's input at its layer, exactly as stage 1 trained it), and the held-out KL(p_T ‖ p_swapped) measures
   the harm of converting layer l;
3. layers are ranked by that harm and the K most harmful keep the teacher's attention.

The ranking does not depend on K, so it is measured once per (teacher, student settings, data, budget) and
kept in `<run>/select_layers/ranking.json`, with `ranking.md` (table) and `ranking.png` (bar plot) and the
cost of the selection (stage-1 and measuring seconds and tokens).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arwkv.atomic import write_json, write_text
from arwkv.errors import ConfigError
from arwkv.train.distributed import say
from arwkv.train.forward import decoder_layers, model_inputs
from arwkv.train.metrics import heldout_metrics, iter_batches
from arwkv.train.params import mixer_layers

SELECT_DIR = "select_layers"
_AUTO = re.compile(r"^auto:(\d+)$")


def auto_k(value: Any) -> int | None:
    """K of `student.softmax_layers: auto:K`, None for an explicit list; a ConfigError for anything else."""
    if not isinstance(value, str):
        return None
    m = _AUTO.match(value.strip())
    if not m or int(m.group(1)) < 1:
        raise ConfigError(
            f"student.softmax_layers={value!r}: give a list of layer indices (e.g. [0,3]) or auto:K with "
            "K ≥ 1 (the K layers measured to suffer most from conversion keep softmax attention)"
        )
    return int(m.group(1))


def check_k(k: int, num_layers: int) -> None:
    if not 1 <= k < num_layers:
        raise ConfigError(
            f"softmax budget K={k} does not fit a teacher with {num_layers} layers: choose 1 ≤ K ≤ "
            f"{num_layers - 1} (at least one layer must become RWKV)"
        )


def evenly_spaced(num_layers: int, k: int) -> list[int]:
    """K layers spread evenly over the depth (the centre of each of K equal blocks): the baseline."""
    return sorted({min(num_layers - 1, int((i + 0.5) * num_layers / k)) for i in range(k)})


class _Swap:
    """Hooks on a copy of the teacher that replace layer `layer`'s attention output by the aligned mixer's."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        self.model = copy.deepcopy(teacher).eval()
        self.student = student
        self.first = mixer_layers(student)[0]
        self.batch: dict[str, torch.Tensor] | None = None
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []

    def batches(self, batches):
        for b in batches:  # the hooks need the batch's mask and positions
            self.batch = b
            yield b

    def set_layer(self, layer: int) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        layers = decoder_layers(self.model)
        for i in sorted({self.first, layer}):

            def pre(mod, args, kwargs, i=i):
                self.inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

            self.handles.append(layers[i].self_attn.register_forward_pre_hook(pre, with_kwargs=True))

        def post(mod, args, kwargs, output):
            device = self.inputs[layer].device
            b = {k: v.to(device) for k, v in self.batch.items()}
            kw = model_inputs(b, recurrent=True)
            x = {i: self.inputs[i].float() for i in sorted({self.first, layer})}
            out = self.student.mixer_outputs(x, kw["attention_mask"], kw["position_ids"])[layer]
            first = output[0] if isinstance(output, tuple) else output
            out = out.to(first.dtype)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        self.handles.append(layers[layer].self_attn.register_forward_hook(post, with_kwargs=True))


def measure_harm(
    teacher: nn.Module,
    student: nn.Module,
    heldout: dict[str, torch.Tensor],
    batch_size: int = 8,
    device: torch.device | None = None,
) -> dict[int, dict[str, float]]:
    """{layer: held-out metrics of the teacher with only that layer's mixer swapped in} for every RWKV layer
    of the (aligned) `student`."""
    device = device or next(student.parameters()).device
    swap = _Swap(teacher, student)
    cache: dict[int, torch.Tensor] = {}
    out = {}
    was = student.training
    student.eval()
    try:
        for layer in mixer_layers(student):
            swap.set_layer(layer)
            out[layer] = heldout_metrics(
                swap.model,
                teacher,
                swap.batches(iter_batches(heldout, batch_size)),
                device=device,
                teacher_cache=cache,
            )
    finally:
        for h in swap.handles:
            h.remove()
        student.train(was)
    return out


def apply_auto_layers(cfg, teacher: nn.Module, tokenizer, env, summary: dict[str, Any]):
    """`student.softmax_layers: auto:K`: measure the ranking (once per run folder, kept in
    select_layers/ranking.json), set the K chosen layers in `cfg` and record them in `summary`. Returns the
    run's data it had to prepare for that, or None when the layers are given."""
    from arwkv.recipes.run_data import prepare_data

    k = auto_k(cfg.student.softmax_layers)
    if k is None:
        return None
    data = prepare_data(cfg, teacher, tokenizer, env)
    selection = select_layers(cfg, teacher, data, env, k)
    cfg.student.softmax_layers = list(selection["selected"])
    summary["layer_selection"] = {
        key: selection[key] for key in ("k", "selected", "evenly_spaced", "ranking", "cost")
    }
    say(env, f"select-layers: K={k} softmax layers {selection['selected']} (ranking {selection['ranking']})")
    return data


def select_layers(cfg, teacher: nn.Module, data, env, k: int) -> dict[str, Any]:
    """Measure (or read) the ranking for this recipe and return {"ranking", "selected", "evenly_spaced",
    "cost", ...}; the K most harmful layers are `selected`."""
    from arwkv.data.packing import PackedLoader
    from arwkv.data.teacher_corpus import teacher_fingerprint
    from arwkv.recipes.align import run_align
    from arwkv.recipes.students import build_student_for
    from arwkv.train.distributed import barrier
    from arwkv.train.loop import micro_batch_size

    n_layers = int(teacher.config.num_hidden_layers)
    check_k(k, n_layers)
    out_dir = cfg.run_dir / SELECT_DIR
    sel = cfg.select
    key = {
        "teacher": teacher_fingerprint(teacher),
        "student": {**dataclasses.asdict(cfg.student), "softmax_layers": []},
        "align": {**dataclasses.asdict(cfg.align), "tokens": sel.align_tokens},
        "heldout_sequences": sel.heldout_sequences,
        "seed": cfg.seed,
        "data": dataclasses.asdict(cfg.data),
    }
    path = out_dir / "ranking.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found.get("key") == json.loads(json.dumps(key, default=str)):
            return _with_k(found, k, n_layers)
    t0 = time.perf_counter()
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.student.softmax_layers = []
    student = build_student_for(probe_cfg, teacher).to(env.device)
    acfg = dataclasses.replace(cfg.align, tokens=sel.align_tokens, max_steps=0, eval_interval=0)
    say(env, f"select-layers: stage 1 of all {n_layers} layers for {acfg.tokens:,} tokens, then each alone")
    rows = data.rows("align", acfg.seq_len)
    loader = PackedLoader(
        rows,
        micro_batch_size(acfg, env.world_size),
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        rank=env.rank,
        world_size=env.world_size,
    )
    res = run_align(student, teacher, loader, acfg, out_dir / "align", env=env, resume=cfg.resume)
    t1 = time.perf_counter()
    held = {kk: v[: sel.heldout_sequences] for kk, v in data.heldout.items()}
    harm = measure_harm(teacher, student, held, cfg.data.heldout.batch_size, env.device)
    t2 = time.perf_counter()
    ranking = sorted(harm, key=lambda i: -harm[i]["kl"])
    record = {
        "key": json.loads(json.dumps(key, default=str)),
        "num_layers": n_layers,
        "ranking": ranking,  # most harmful first
        "harm": {str(i): harm[i] for i in harm},
        "cost": {
            "align_tokens": res.tokens,
            "align_s": res.wall_s,
            "measure_s": t2 - t1,
            "total_s": t2 - t0,
            "heldout_tokens": int(next(iter(harm.values()))["tokens"]) * len(harm),
        },
    }
    if env.is_main:
        write_json(path, record)
        write_ranking(out_dir, record)
    barrier()
    return _with_k(record, k, n_layers)


def _with_k(record: dict[str, Any], k: int, n_layers: int) -> dict[str, Any]:
    return {
        **record,
        "k": k,
        "selected": sorted(record["ranking"][:k]),
        "evenly_spaced": evenly_spaced(n_layers, k),
    }


def write_ranking(out_dir: Path, record: dict[str, Any]) -> None:
    """ranking.md (table) and ranking.png (bar plot of the harm per layer)."""
    harm = {int(i): m for i, m in record["harm"].items()}
    c = record["cost"]
    lines = [
        "# Layer selection: harm of converting each layer alone",
        "",
        "Each aligned RWKV mixer swapped into the teacher alone; held-out metrics against the teacher "
        "(KL(p_T ‖ p) per token, NLL ratio). Rank 1 = most harmful = first to keep softmax attention.",
        "",
        "| rank | layer | KL | NLL ratio | top-1 |",
        "|---|---|---|---|---|",
    ]
    for r, i in enumerate(record["ranking"], 1):
        m = harm[i]
        lines.append(f"| {r} | {i} | {m['kl']:.4f} | {m['nll_ratio']:.4f} | {m['top1']:.3f} |")
    lines += [
        "",
        f"Cost: stage 1 of all layers on {c['align_tokens']:,} tokens in {c['align_s']:.1f} s, then "
        f"{len(harm)} swapped held-out passes ({c['heldout_tokens']:,} tokens) in {c['measure_s']:.1f} s; "
        f"{c['total_s']:.1f} s in all.",
        "",
        "![ranking](ranking.png)",
        "",
    ]
    write_text(out_dir / "ranking.md", "\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    layers = sorted(harm)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.35 * len(layers) + 2), 3.4))
    top = set(record["ranking"][: max(1, len(layers) // 4)])
    ax.bar(
        [str(i) for i in layers],
        [harm[i]["kl"] for i in layers],
        color=["tab:red" if i in top else "tab:blue" for i in layers],
    )
    ax.set_xlabel("layer converted alone")
    ax.set_ylabel("held-out KL(teacher ‖ swapped)")
    ax.set_title("harm of converting each layer alone (red: most harmful quarter)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_dir / "ranking.png", dpi=110)
    plt.close(fig)


def run_selection(cfg, k: int | None = None) -> dict[str, Any]:
    """`arwkv select-layers`: the ranking for this recipe (in `<out_dir>/select_layers/`) and its K layers;
    K defaults to the recipe's `student.softmax_layers: auto:K`."""
    from arwkv.recipes.run_data import is_main_process, prepare_data
    from arwkv.recipes.students import load_teacher_model
    from arwkv.train.distributed import init_distributed
    from arwkv.train.run_state import lock_run_dir

    k = k if k is not None else auto_k(cfg.student.softmax_layers)
    if k is None:
        raise ConfigError("give the softmax budget: --k K (or student.softmax_layers=auto:K in the recipe)")
    lock = lock_run_dir(cfg.run_dir) if is_main_process() else None
    try:
        env = init_distributed(cfg.device, cfg.distributed.backend)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        teacher, tokenizer = load_teacher_model(
            cfg.teacher.path, cfg.teacher.dtype, env.device, cfg.teacher.tokenizer
        )
        check_k(k, int(teacher.config.num_hidden_layers))  # before any data is sampled
        data = prepare_data(cfg, teacher, tokenizer, env)
        return select_layers(cfg, teacher, data, env, k)
    finally:
        if lock is not None:
            lock.close()
