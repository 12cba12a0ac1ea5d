"""Recipe configs: every shipped YAML validates; overrides are typed; unknown keys are clear errors."""

from __future__ import annotations

import pytest
import yaml

from arwkv.config import CONFIG_DIR, RecipeConfig, all_keys, apply_overrides, load_recipe, save_config
from arwkv.errors import ConfigError

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_three_recipes_ship():
    assert {"stories260k", "smollm2-135m", "qwen2.5-7b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_yaml_validates(name):
    cfg = load_recipe(name)
    assert cfg.name == name
    assert cfg.align.loss in ("mse", "l2") and cfg.distill.loss == "kl" and cfg.sft.loss == "ce"
    assert cfg.student.untie_embeddings  # both references untie lm_head for distillation


def test_overrides_are_coerced_to_field_types():
    cfg = load_recipe(
        "stories260k",
        [
            "align.lr=3e-3",
            "distill.tokens=50e6",
            "bf16=true",
            "student.softmax_layers=[0,3]",
            "distill.mixer_lr=null",
            "distill.freeze=mlp,embeddings",
            "student.mixer.head_size=16",
        ],
    )
    assert cfg.align.lr == 3e-3 and isinstance(cfg.align.lr, float)
    assert cfg.distill.tokens == 50_000_000 and isinstance(cfg.distill.tokens, int)
    assert cfg.bf16 is True
    assert cfg.student.softmax_layers == [0, 3]
    assert cfg.distill.mixer_lr is None
    assert cfg.distill.freeze == ["mlp", "embeddings"]
    assert cfg.student.mixer["head_size"] == 16


def test_section_defaults_survive_partial_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nsft:\n  enabled: true\n")
    cfg = load_recipe(p)
    assert cfg.sft.enabled and cfg.sft.loss == "ce" and cfg.align.loss == "mse"


@pytest.mark.parametrize(
    "override, match",
    [
        ("distill.lrr=1", "distill.lr"),
        ("alig.lr=1", "align.lr"),
        ("teacher.pth=x", "teacher.path"),
        ("student.mixer.head_sise=64", "student.mixer.head_size"),  # free-form section, checked too
    ],
)
def test_unknown_key_names_close_matches(override, match):
    with pytest.raises(ConfigError, match="unknown recipe key") as e:
        load_recipe("stories260k", [override])
    assert match in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ndistill:\n  temprature: 2\n")
    with pytest.raises(ConfigError, match="distill.kl_temperature") as e:
        load_recipe(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "align.lr=fast",
        "distill.tokens=1.5",
        "bf16=maybe",
        "distill.schedule=linear",
        "align.batch_size=0",
        "distill.freeze=brain",
        "align.loss=kl",
        "nonsense",
    ],
)
def test_bad_values_are_config_errors(override):
    with pytest.raises(ConfigError):
        load_recipe("stories260k", [override])


@pytest.mark.parametrize(
    "override,match",
    [
        ("distill.tokens=nan", "finite integer"),
        ("distill.tokens=inf", "finite integer"),
        ("distill.tokens=1e400", "finite integer"),
        ("align.lr=nan", "finite number"),
        ("distill.lr=inf", "finite number"),
        ("distill.kl_temperature=0", "kl_temperature must be > 0"),
        ("align.warmup_steps=-3", "warmup_steps must be ≥ 0"),
        ("distill.clip=-1", "clip must be ≥ 0"),
    ],
)
def test_values_that_would_break_training_are_refused_up_front(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe("stories260k", [override])


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(ConfigError, match="stories260k"):
        load_recipe("no-such-recipe")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_recipe("stories260k", ["distill.lr=2e-3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_recipe(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["distill"]["lr"] == 2e-3


def test_all_keys_are_settable():
    cfg = RecipeConfig()
    for key in all_keys():
        if key.endswith(("mixer", "betas", "freeze", "train", "sft", "softmax_layers")):
            continue
        assert "." in key or hasattr(cfg, key)
    apply_overrides(cfg, {"eval.swa_window": "32"})
    assert cfg.eval.swa_window == 32


@pytest.mark.parametrize(
    "override, owner",
    [
        ("align.kl_temperature=2", "distill"),
        ("align.ce_weight=0.5", "distill"),
        ("align.chunk_size=512", "distill, sft, dpo"),
        ("align.teacher_topk=64", "distill"),
        ("sft.kl_temperature=2", "distill"),
        ("sft.teacher_topk=64", "distill"),
        ("dpo.ce_weight=1", "distill"),
    ],
)
def test_a_key_of_another_stage_is_refused_by_name(override, owner, tmp_path):
    """Each stage has only its own keys: a key that would do nothing there names the stage it belongs to."""
    stage, leaf = override.split("=")[0].split(".")
    with pytest.raises(ConfigError, match=rf"^{stage} has no '{leaf}' .*it is a key of {owner}\)"):
        load_recipe("stories260k", [override])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({stage: {leaf: yaml.safe_load(override.split("=")[1])}}))
    with pytest.raises(ConfigError, match=rf"^{stage} has no '{leaf}'"):
        load_recipe(str(recipe))


def test_each_stage_keeps_the_keys_it_uses():
    cfg = load_recipe("stories260k", ["distill.kl_temperature=2", "sft.chunk_size=256", "dpo.chunk_size=128"])
    assert (cfg.distill.kl_temperature, cfg.sft.chunk_size, cfg.dpo.chunk_size) == (2.0, 256, 128)
    assert not hasattr(cfg.align, "kl_temperature") and not hasattr(cfg.sft, "teacher_topk")


def test_a_config_saved_before_the_per_stage_schemas_still_loads(tmp_path):
    """Older config.yaml files list every key in every stage; the ones that did nothing, at their defaults,
    are dropped (a non-default value is still refused by name, above)."""
    from arwkv.config import config_text

    old = yaml.safe_load(config_text(load_recipe("stories260k")))
    old["align"].update(kl_temperature=1.0, ce_weight=0.0, chunk_size=1024, teacher_topk=0, freeze=[])
    old["sft"].update(kl_temperature=1.0, teacher_topk=0, ce_weight=0.0)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_recipe(str(path))
    assert cfg.align.loss == load_recipe("stories260k").align.loss and not hasattr(cfg.align, "chunk_size")
    old["align"]["kl_temperature"] = 2.0
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="align has no 'kl_temperature'"):
        load_recipe(str(path))
