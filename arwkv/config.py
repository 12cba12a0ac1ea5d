"""Recipe configuration: YAML → typed dataclasses → `key=value` overrides → resolved `config.yaml` in the
run dir.

A recipe is one `RecipeConfig`. Every leaf is typed; strings coming from YAML or the command line are
coerced to the field's type (`align.lr=3e-3`, `distill.tokens=50e6`, `student.softmax_layers=[0,3]`), and
an unknown key is a `ConfigError` that names the closest known keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from arwkv.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "recipes" / "configs"
# parameter groups a stage may freeze (named in arwkv.train.params; local_attention: local_window)
FREEZABLE = ("embeddings", "mlp", "norms", "lm_head", "mixers", "local_attention")


@dataclass
class TeacherConfig:
    """Which model teaches. `path` is anything `arwkv.convert.teachers.load_teacher` accepts (HF id or folder,
    llama2.c `.bin`, GGUF file)."""

    path: str = ""
    tokenizer: str | None = None  # separate tokenizer folder; must match the teacher's vocabulary
    dtype: str = "float32"  # teacher weights; "bfloat16" halves memory on GPU
    # a larger stage-2 teacher with the same tokenizer ("any LLM can teach"); empty = `path`
    distill_path: str = ""


@dataclass
class StudentConfig:
    """How the student is built from the teacher (`arwkv.convert.build.build_student`)."""

    init: Literal["copy", "fresh"] = "copy"
    # untie lm_head from the embeddings for distillation (both ARWKV and RADLADS do); recorded in the report
    untie_embeddings: bool = True
    # layers that keep the teacher's attention, or "auto:K": the K layers measured to suffer most from
    # conversion (arwkv.recipes.select_layers; settings in `select`)
    softmax_layers: list[int] | str = field(default_factory=list)
    mixer: dict[str, Any] = field(default_factory=dict)  # extra mixer options passed to build_student
    from_checkpoint: str = ""  # start from a saved student (HF folder) instead of building one


@dataclass
class DataFreeConfig:
    """Data-free mode: the teacher writes the training corpus (cached on disk for reuse)."""

    num_sequences: int = 4000
    seq_len: int = 256
    temperature: float = 1.0
    top_k: int = 0
    batch_size: int = 64  # sampling batch
    prompts: Literal["bos", "chat"] = "bos"
    cache_dir: str = ""  # empty: <out_dir>/../.cache/teacher_corpus
    shards: int = 1  # sampled in parallel by that many processes (the corpus is the same for any count)


@dataclass
class HeldoutConfig:
    """Held-out set used for every before/after metric. Never trained on."""

    source: str = "teacher"  # "teacher" (sampled like the data-free corpus, other seed) or a file path
    num_sequences: int = 256
    seq_len: int = 256
    batch_size: int = 16


@dataclass
class DataConfig:
    train: list[str] = field(
        default_factory=list
    )  # files / folders; empty = data-free (the teacher writes it)
    sft: list[str] = field(default_factory=list)  # chat data for stage 3; empty = use `train`
    text_field: str = "text"
    chat: bool = False  # render `messages` with the teacher's chat template
    # with `train` files: this fraction of each stage's rows is teacher-written (data_free settings), the rest
    # real text from the files; 0 = files only. Without files everything is teacher-written.
    teacher_fraction: float = 0.0
    shuffle: bool = True
    data_free: DataFreeConfig = field(default_factory=DataFreeConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)


@dataclass
class StageConfig:
    """What every training stage has: budget, batch, optimizer, schedule, logging (the loop's settings).
    Budgets are in tokens; `batch_size` is the global number of sequences per optimizer step, split over
    processes and `grad_accum` micro-steps (so a recipe means the same on 1 or 8 GPUs). Each stage adds its
    own keys (AlignConfig, DistillConfig, SFTConfig, DPOConfig); a key of another stage is refused by name."""

    enabled: bool = True
    tokens: int = 1_000_000
    max_steps: int = 0  # > 0 caps the step count (smoke tests); 0 = from `tokens`
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    mixer_lr: float | None = None  # separate LR for the RWKV mixers (RADLADS: 10x the rest); None = lr
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    clip: float = 1.0  # max grad norm; 0 = off
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    loss: Literal["mse", "l2", "kl", "ce"] = "kl"
    eval_interval: int = 0  # steps between held-out evaluations; 0 = only before/after the stage
    ckpt_interval: int = 200  # steps between checkpoints (plus one at the end)
    log_interval: int = 10
    keep_checkpoints: int = 2


@dataclass
class AlignConfig(StageConfig):
    """Stage 1: every mixer against the teacher's attention output at its layer (only the mixers train)."""

    loss: Literal["mse", "l2"] = "mse"


@dataclass
class DistillConfig(StageConfig):
    """Stage 2: the whole student against the teacher's next-token distribution."""

    tokens: int = 3_000_000
    lr: float = 3e-4
    loss: Literal["kl"] = "kl"
    kl_temperature: float = 1.0
    ce_weight: float = 0.0  # loss = KL + ce_weight * CE
    chunk_size: int = 1024  # tokens per chunk for lm_head + KL/CE (bounds [tokens, vocab] memory)
    # > 0 reads the teacher's top-k (+ tail mass) from a disk cache filled once per row, ever;
    # 0 = the full-vocabulary teacher online at every step
    teacher_topk: int = 0
    freeze: list[str] = field(default_factory=list)  # parameter groups to freeze: any of FREEZABLE


@dataclass
class SFTConfig(StageConfig):
    """Stage 3 by supervised fine-tuning (off by default): next-token CE on the completion tokens."""

    enabled: bool = False
    tokens: int = 500_000
    lr: float = 1e-4
    warmup_steps: int = 5
    loss: Literal["ce"] = "ce"
    chunk_size: int = 1024  # tokens per chunk for lm_head + CE
    freeze: list[str] = field(default_factory=list)


@dataclass
class SelectConfig:
    """`student.softmax_layers: auto:K` / `arwkv select-layers`: a short stage 1 of all layers (align
    settings, this many tokens), then each mixer swapped into the teacher alone on this many held-out
    sequences."""

    align_tokens: int = 200_000
    heldout_sequences: int = 64


@dataclass
class DPODataFreeConfig:
    """The data-free preference set (`arwkv.data.preferences.data_free_preferences`): for varied prompts the
    teacher's reply is `chosen` and the entering student's own greedy reply is `rejected`. Made once and
    cached (keyed on teacher, student, prompts and lengths)."""

    num_pairs: int = 512  # training pairs (pairs where both replies agree are dropped: no signal)
    prompts: Literal["auto", "bos", "chat"] = "auto"  # auto: chat with a chat template, else token prefixes
    prompt_min: int = 4  # "bos": prompt = BOS + a teacher-sampled prefix of prompt_min..prompt_max tokens
    prompt_max: int = 32
    reply_len: int = 64  # new tokens per reply (fewer when the model stops)
    teacher_temperature: float = 0.0  # 0 = the teacher's greedy reply
    batch_size: int = 64  # generation batch
    cache_dir: str = ""  # empty: <out_dir>/../.cache/preferences


@dataclass
class DPOConfig(StageConfig):
    """Stage 3 by preference (DPO, off by default, runs after sft). `batch_size` counts pairs; a step's token
    budget is batch_size x seq_len as for the other stages (max_steps is the clearer knob here)."""

    enabled: bool = False
    tokens: int = 200_000
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 5
    loss: Literal["dpo"] = "dpo"
    chunk_size: int = 1024  # tokens per chunk for lm_head + log-probs
    freeze: list[str] = field(default_factory=list)
    beta: float = 0.1
    # frozen reference: empty = the student as it enters the stage; or a saved student / checkpoint path
    reference: str = ""
    # preference jsonl files ({prompt, chosen, rejected} or {messages, chosen, rejected}); empty = data-free
    data: list[str] = field(default_factory=list)
    # held-out pairs, never trained on: from other prompts (data-free) or split off the files (seeded)
    heldout_pairs: int = 64
    data_free: DPODataFreeConfig = field(default_factory=DPODataFreeConfig)


@dataclass
class EvalConfig:
    swa_baseline: bool = True  # the training-free teacher with sliding-window attention + sinks
    swa_window: int = 64
    swa_sinks: int = 4
    confident_p: float = 0.5  # top-1 agreement is also reported on positions where max p_teacher ≥ this


@dataclass
class BudgetConfig:
    """A wall-clock budget (`arwkv.recipes.budget`): > 0 minutes of training replaces the stages' `tokens`
    by what each stage's measured throughput reaches in its share of the minutes."""

    minutes: float = 0.0
    align_share: float = 0.15  # of the minutes for stage 1; stage 2 takes the rest (minus sft_share)
    sft_share: float = 0.0


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards the student (fully_shard per decoder layer)
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU


@dataclass
class RecipeConfig:
    name: str = "run"
    out_dir: str = ""  # empty: runs/<name>
    seed: int = 0
    threads: int = 0  # torch CPU threads per process; 0 = leave torch's default
    # CPU: time training steps at 1 thread and at `threads` (or torch's default), train at the faster, and
    # time again every 100 steps (a shared machine changes which wins; results then depend on the counts used)
    thread_tuning: bool = False
    # > 1: `arwkv convert` starts this many local processes itself (DDP, as torchrun would); tiny models use
    # several CPU cores far better as processes than as threads. Ignored under torchrun / accelerate launch.
    processes: int = 1
    device: str = "auto"  # auto = cuda when available
    # bf16 autocast (CPU and GPU; master weights and the WKV state stay fp32). auto = bf16 where the device
    # multiplies bf16 natively (CUDA, CPUs with AVX512-BF16/AMX), fp32 elsewhere: emulated bf16 is ~7x slower
    bf16: bool | Literal["auto"] = False
    grad_checkpointing: bool = False
    resume: bool = True  # continue a run found in out_dir
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


STAGES = ("align", "distill", "sft", "dpo")


# ----------------------------------------------------------------------------------------------------------
# coercion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML / command-line value to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is list:
        if isinstance(value, str):
            value = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            )
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, str) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("true", "yes", "on", "1"):
            return True
        if s in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            pass
        try:  # "50e6" is a fine way to write a token budget
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected a finite integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # nan / inf / 1e400 never make a useful setting
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _former_default(prefix: str, key: str, value: Any) -> bool:
    """True for another stage's key at that stage's default (e.g. `align.kl_temperature: 1.0` in a config.yaml
    saved before the stages had their own schemas): a no-op then and now, so a file may keep it."""
    stage = prefix.rstrip(".")
    if stage not in STAGES:
        return False
    for other in STAGES:
        cls = _hints(RecipeConfig)[other]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if other != stage and key in fields:
            default = getattr(cls(), key)
            try:
                return _coerce(value, _hints(cls)[key], key) == default
            except ConfigError:
                return False
    return False


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    stage, _, leaf = key.partition(".")
    if stage in STAGES and leaf and "." not in leaf:
        owners = [
            other
            for other in STAGES
            if other != stage and leaf in {f.name for f in dataclasses.fields(_hints(RecipeConfig)[other])}
        ]
        if owners:
            return ConfigError(
                f"{stage} has no {leaf!r}{where}: it does nothing in this stage (it is a key of "
                f"{', '.join(owners)}); remove it or set {owners[0]}.{leaf}"
            )
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(
        f"unknown recipe key {key!r}{where}.{hint} Run `arwkv convert --help-keys` for all keys."
    )


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "", where: str = "", base: Any = None) -> Any:
    """Build `cls` from a mapping, starting from `base` (the section's own defaults, e.g. sft.loss=ce)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}{where}")
    obj = base if base is not None else cls()
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            if _former_default(prefix, k, v):
                continue  # written by a version where every stage had every key; it did nothing there
            raise _unknown(f"{prefix}{k}", _all_keys(RecipeConfig), where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            setattr(obj, k, _from_dict(tp, v or {}, f"{prefix}{k}.", where, base=getattr(obj, k)))
        else:
            setattr(obj, k, _coerce(v, tp, f"{prefix}{k}"))
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------------
# public entry points


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe name (`stories260k`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"no recipe named {name_or_path!r}; shipped recipes: {', '.join(names)} (or give a .yaml path)"
    )


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. distill.lr=1e-3)")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def apply_overrides(cfg: RecipeConfig, overrides: list[str] | dict[str, Any]) -> RecipeConfig:
    """Apply dotted `key=value` overrides in place (values coerced to the field type); returns cfg."""
    items = parse_overrides(overrides) if isinstance(overrides, list) else overrides
    known = _all_keys(RecipeConfig)
    for key, value in items.items():
        obj: Any = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(obj)}
            if part not in names:
                # free-form mapping leaves (student.mixer.<opt>) accept any sub-key
                raise _unknown(key, known, " (command line)")
            tp = _hints(type(obj))[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    first = dataclasses.fields(tp)[0].name
                    raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{first}=...")
                setattr(obj, part, _coerce(value, tp, key))
            elif dataclasses.is_dataclass(tp):
                obj = getattr(obj, part)
            elif typing.get_origin(tp) is dict and i == len(parts) - 2:
                getattr(obj, part)[parts[-1]] = _coerce(value, Any, key)
                break
            else:
                raise _unknown(key, known, " (command line)")
    validate(cfg)
    return cfg


def validate(cfg: RecipeConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    for stage in STAGES:
        s: StageConfig = getattr(cfg, stage)
        for name in ("tokens", "seq_len", "batch_size", "grad_accum", "chunk_size", "ckpt_interval"):
            if hasattr(s, name) and getattr(s, name) <= 0:
                raise ConfigError(f"{stage}.{name} must be > 0 (got {getattr(s, name)})")
        if s.lr <= 0 or s.min_lr < 0 or s.min_lr > s.lr:
            raise ConfigError(f"{stage}: need 0 ≤ min_lr ≤ lr and lr > 0 (lr={s.lr}, min_lr={s.min_lr})")
        if len(s.betas) != 2:
            raise ConfigError(f"{stage}.betas needs two numbers, got {s.betas}")
        for name in ("warmup_steps", "max_steps", "clip", "weight_decay"):
            if getattr(s, name) < 0:
                raise ConfigError(f"{stage}.{name} must be ≥ 0 (got {getattr(s, name)})")
        if getattr(s, "kl_temperature", 1.0) <= 0:
            raise ConfigError(
                f"{stage}.kl_temperature must be > 0 (got {s.kl_temperature}): it divides the logits; "
                "1 is the usual value"
            )
        bad = set(getattr(s, "freeze", ())) - set(FREEZABLE)
        if bad:
            raise ConfigError(
                f"{stage}.freeze: unknown group(s) {sorted(bad)}; choose from {', '.join(FREEZABLE)}"
            )
    b = cfg.budget
    if b.minutes < 0 or not (0 <= b.align_share < 1 and 0 <= b.sft_share < 1):
        raise ConfigError(
            f"budget: need minutes ≥ 0 and shares in [0, 1) (minutes={b.minutes}, "
            f"align_share={b.align_share}, sft_share={b.sft_share})"
        )
    if cfg.distill.teacher_topk < 0:
        raise ConfigError(
            f"distill.teacher_topk must be ≥ 0 (got {cfg.distill.teacher_topk}; 0 = online teacher)"
        )
    if not 0 <= cfg.data.teacher_fraction < 1:
        raise ConfigError(
            f"data.teacher_fraction must be in [0, 1) (got {cfg.data.teacher_fraction}); "
            "for teacher-written data only, leave data.train empty"
        )
    _check_mixer_options(cfg.student.mixer)
    if cfg.align.loss not in ("mse", "l2"):
        raise ConfigError(f"align.loss must be mse or l2 (got {cfg.align.loss})")
    if cfg.distill.loss not in ("kl",):
        raise ConfigError(f"distill.loss must be kl (got {cfg.distill.loss}); add CE with distill.ce_weight")
    if cfg.sft.loss != "ce":
        raise ConfigError(f"sft.loss must be ce (got {cfg.sft.loss})")
    _check_dpo(cfg.dpo)
    sl = cfg.student.softmax_layers
    if isinstance(sl, str) and not (sl.startswith("auto:") and sl[5:].isdigit() and int(sl[5:]) >= 1):
        raise ConfigError(
            f"student.softmax_layers={sl!r}: give a list of layer indices (e.g. [0,3]) or auto:K with K ≥ 1 "
            "(the K layers measured to suffer most from conversion keep softmax attention)"
        )
    if cfg.select.align_tokens <= 0 or cfg.select.heldout_sequences <= 0:
        raise ConfigError(
            f"select.align_tokens and select.heldout_sequences must be > 0 (got {cfg.select.align_tokens}, "
            f"{cfg.select.heldout_sequences})"
        )


def _check_dpo(d: DPOConfig) -> None:
    if d.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0 (got {d.beta}); 0.1 is the usual value")
    if d.heldout_pairs < 0:
        raise ConfigError(f"dpo.heldout_pairs must be ≥ 0 (got {d.heldout_pairs})")
    f = d.data_free
    for name in ("num_pairs", "reply_len", "batch_size", "prompt_max"):
        if getattr(f, name) <= 0:
            raise ConfigError(f"dpo.data_free.{name} must be > 0 (got {getattr(f, name)})")
    if not 0 <= f.prompt_min <= f.prompt_max:
        raise ConfigError(
            f"dpo.data_free: need 0 ≤ prompt_min ≤ prompt_max (got {f.prompt_min}, {f.prompt_max})"
        )
    if f.teacher_temperature < 0:
        raise ConfigError(
            f"dpo.data_free.teacher_temperature must be ≥ 0 (0 = greedy; got {f.teacher_temperature})"
        )


def _check_mixer_options(options: dict[str, Any]) -> None:
    """student.mixer keys are ArwkvConfig arguments: a misspelt one would otherwise be stored and ignored."""
    import inspect

    from arwkv.models.arwkv.configuration_arwkv import ArwkvConfig

    known = [
        k
        for k in inspect.signature(ArwkvConfig.__init__).parameters
        if k not in ("self", "teacher_config", "use_cache", "kwargs")
    ]
    for key in options:
        if key not in known:
            raise _unknown(f"student.mixer.{key}", [f"student.mixer.{k}" for k in known], " (mixer options)")


def load_recipe(
    name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None
) -> RecipeConfig:
    """Load a shipped recipe or YAML file and apply overrides."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = _from_dict(RecipeConfig, data, where=f" in {path}")
    validate(cfg)
    return apply_overrides(cfg, overrides or [])


def from_dict(data: dict[str, Any]) -> RecipeConfig:
    cfg = _from_dict(RecipeConfig, data)
    validate(cfg)
    return cfg


def config_text(cfg: RecipeConfig) -> str:
    """The resolved recipe as YAML (what config.yaml and every checkpoint hold)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RecipeConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_text(cfg))


def all_keys() -> list[str]:
    """Every settable key with its default, for `--help-keys`."""
    return _all_keys(RecipeConfig)
