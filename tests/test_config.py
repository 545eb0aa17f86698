"""Typed config: loading, overrides, error messages, writing back, and every shipped YAML."""

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Literal

import pytest

from janus_lab import config, retry
from janus_lab.config import ConfigError, describe, dump_yaml, field_docs, flatten, load_config, parse_cli, to_dict
from janus_lab.data import config as data_config
from janus_lab.data.config import IngestConfig
from janus_lab.sweeps import config as sweeps_config
from janus_lab.train import config as train_config
from janus_lab.train.config import ExperimentConfig, ModelConfig, TrainConfig
from shipped_configs import CONFIG_DIRS

REPO = Path(__file__).resolve().parents[1]
DEBUG_YAML = REPO / "jobs" / "configs" / "debug.yaml"
RECIPE_YAML = REPO / "jobs" / "configs" / "janus4o_7b.yaml"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


# Small classes for the type rules the experiment config does not use (yet).
@dataclasses.dataclass
class Window:
    """A nested section."""

    size: tuple[int, int] = (8, 8)
    """Height and width."""


@dataclasses.dataclass
class Containers:
    """Every container annotation the loader understands."""

    weights: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    """A homogeneous list."""
    names: tuple[str, ...] = ()
    """A homogeneous tuple of any length."""
    limits: dict[str, int] = dataclasses.field(default_factory=dict)
    """A mapping with typed values."""
    mode: Literal["a", "b"] | None = None
    """An optional choice."""
    window: Window = dataclasses.field(default_factory=Window)
    """A section."""


@dataclasses.dataclass
class NeedsPath:
    """A class with a required key."""

    path: str
    """No default: must be given."""


# --------------------------------------------------------------------------- shipped configs


def test_every_shipped_yaml_loads():
    found, failures = [], []
    for folder in ("jobs/configs", "sweeps/configs"):
        for path in sorted(p for p in (REPO / folder).rglob("*") if p.suffix in (".yaml", ".yml")):
            relative = path.relative_to(REPO)
            cls = next((c for d, c in CONFIG_DIRS.items() if relative.is_relative_to(d)), None)
            if cls is None:
                failures.append(f"{relative}: no config class for its folder in CONFIG_DIRS")
                continue
            found.append(relative)
            try:
                load_config(cls, path)
            except ConfigError as err:
                failures.append(str(err))
    assert not failures, "\n".join(failures)
    assert {DEBUG_YAML.relative_to(REPO), RECIPE_YAML.relative_to(REPO)} <= set(found)


def test_debug_yaml_values():
    cfg = load_config(ExperimentConfig, DEBUG_YAML)
    assert cfg.model.preset == "debug" and cfg.model.image_size == 64
    assert cfg.data.uri == "data/sample-shards"
    t = cfg.train
    assert (t.num_workers, t.use_gpu, t.micro_batch_size, t.global_batch_size) == (2, False, 2, 4)
    assert (t.epochs, t.max_steps, t.lr, t.report_every, t.checkpoint_every) == (1, 20, 1e-2, 2, 10)
    assert t.gradient_accumulation_steps == 1


def test_recipe_yaml_is_the_published_recipe():
    cfg = load_config(ExperimentConfig, RECIPE_YAML)
    assert cfg.model.preset == "janus-pro-7b" and cfg.model.image_size == 384
    assert cfg.model.dtype == "bfloat16" and cfg.model.weights.startswith("s3://")
    t = cfg.train
    assert (t.lr, t.weight_decay, t.warmup_ratio, t.min_lr_ratio) == (5e-6, 0.1, 0.05, 0.15)
    assert t.grad_clip == 1.0
    assert (t.epochs, t.global_batch_size, t.num_workers, t.use_gpu) == (3, 128, 8, True)
    assert t.activation_checkpointing and t.gradient_accumulation_steps == 4
    assert (cfg.masking.t2i_text_drop, cfg.masking.ti2i_image_drop) == (0.1, 0.5)


def _optimizer_groups(train: TrainConfig):
    """AdamW as the training loop builds it for the debug model, and its groups by parameter name."""
    from janus_lab.model import GenerationObjective, debug
    from janus_lab.train.loop import build_optimizer

    objective = GenerationObjective(debug().model)
    optimizer = build_optimizer(objective, train)
    names = {id(p): name for name, p in objective.named_parameters()}
    decayed, exempt = optimizer.param_groups
    return objective, optimizer, {names[id(p)] for p in decayed["params"]}, {names[id(p)] for p in exempt["params"]}


def test_recipe_optimizer_is_the_published_optimizer():
    # FreedomIntelligence/ShareGPT-4o-Image train/train_janus.py: AdamW(groups, lr=5e-6), torch's
    # betas and eps; weight decay 0.1 except on names containing "bias" or "LayerNorm.weight";
    # linear warmup over 5% of the steps, then cosine to 15% of the peak.
    from janus_lab.model.convert import convert_state_dict_to_deepseek
    from janus_lab.train.schedule import build_scheduler

    train = load_config(ExperimentConfig, RECIPE_YAML).train
    objective, optimizer, decayed, exempt = _optimizer_groups(train)
    adamw = optimizer.defaults
    assert (adamw["lr"], adamw["betas"], adamw["eps"]) == (5e-6, (0.9, 0.999), 1e-8)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    # The script filtered the names of DeepSeek's layout: "LayerNorm.weight" names nothing there,
    # and "bias" names exactly the biases. So it decayed everything else, norm weights included.
    deepseek_names = convert_state_dict_to_deepseek(objective.model.state_dict())
    assert not [n for n in deepseek_names if "LayerNorm.weight" in n]
    assert all(n.endswith(".bias") for n in deepseek_names if "bias" in n)
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    assert exempt == {n for n in trainable if n.endswith(".bias")}
    assert decayed == trainable - exempt
    assert {"model.model.language_model.layers.0.input_layernorm.weight", "model.model.language_model.norm.weight",
            "model.model.vision_model.encoder.layers.0.layer_norm1.weight",
            "model.model.language_model.embed_tokens.weight", "model.model.generation_embeddings.weight"} <= decayed
    scheduler = build_scheduler(optimizer, 100, train.warmup_ratio, train.min_lr_ratio)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(5e-6) and lrs.index(max(lrs)) == 4  # warmup: 5 of 100 steps
    assert scheduler.get_last_lr()[0] == pytest.approx(0.15 * 5e-6)  # the floor


def test_default_optimizer_exempts_biases_and_norm_weights():
    objective, optimizer, decayed, exempt = _optimizer_groups(TrainConfig())
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    modules = dict(objective.named_modules())
    norms = {n for n in decayed | exempt if n.endswith(".weight")
             and "Norm" in type(modules[n.removesuffix(".weight")]).__name__}
    assert norms and exempt == {n for n in decayed | exempt if n.endswith(".bias")} | norms
    assert all(objective.get_parameter(n).ndim >= 2 for n in decayed)
    assert load_config(ExperimentConfig, None, ["train.betas=[0.9,0.999]"]).train.betas == (0.9, 0.999)
    with pytest.raises(ConfigError, match=r"^train.betas must be two numbers in \[0, 1\)"):
        load_config(ExperimentConfig, None, ["train.betas=[0.9,1.0]"])
    with pytest.raises(ConfigError, match="weight_decay_exempt"):
        load_config(ExperimentConfig, None, ["train.weight_decay_exempt=norms"])


def test_yaml_headers_carry_the_launch_command():
    for path in (DEBUG_YAML, RECIPE_YAML):
        header = path.read_text().split("\n\n")[0]
        assert f"python jobs/finetune.py --config jobs/configs/{path.name}" in header


def test_defaults_are_a_valid_config():
    assert load_config(ExperimentConfig, None) == ExperimentConfig()
    assert ExperimentConfig().train.gradient_accumulation_steps == 16


def test_empty_file_means_defaults(tmp_path):
    path = write_yaml(tmp_path, "# nothing yet\n")
    assert load_config(ExperimentConfig, path) == ExperimentConfig()


def test_empty_section_means_its_defaults(tmp_path):
    path = write_yaml(tmp_path, "train:\n  # lr: 1e-4\n")
    cfg = load_config(ExperimentConfig, path, ["train.epochs=2"])
    assert cfg.train == TrainConfig(epochs=2)


# --------------------------------------------------------------------------- docstrings


def test_every_config_field_has_a_docstring():
    modules = (config, train_config, data_config, sweeps_config, retry)
    classes = [c for module in modules for _, c in inspect.getmembers(module, dataclasses.is_dataclass)
               if c.__module__ == module.__name__]
    assert ExperimentConfig in classes and len(classes) >= 18
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
               if not field_docs(c).get(f.name)]
    assert not missing, f"fields without a docstring: {missing}"


def test_describe_lists_every_key_with_type_default_and_doc():
    rows = {row.key: row for row in describe(ExperimentConfig)}
    assert rows["train"].is_section and rows["train"].type == "TrainConfig"
    lr = rows["train.lr"]
    assert (lr.type, lr.default, lr.is_section) == ("float", 5e-6, False)
    assert "learning rate" in lr.doc
    assert rows["model.preset"].type == "{debug,mini,mini-init,janus-pro-1b,janus-pro-7b}"
    assert rows["train.max_steps"].type == "int | None"
    leaves = [key for key, row in rows.items() if not row.is_section]
    assert leaves == list(flatten(ExperimentConfig()))


# --------------------------------------------------------------------------- unknown keys


def test_misspelt_key_suggests_the_nearest(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lrr: 1e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, path)
    assert str(err.value) == f"unknown key 'train.lrr' in {path}; did you mean 'train.lr'?"


def test_key_in_the_wrong_section_points_to_its_home(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lr' .*did you mean 'train.lr'\?"):
        load_config(ExperimentConfig, write_yaml(tmp_path, "lr: 1e-5\n"))


def test_unknown_key_without_a_near_match_lists_the_section(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, write_yaml(tmp_path, "masking:\n  zzz: 1\n"))
    assert "unknown key 'masking.zzz'" in str(err.value)
    assert "valid keys of 'masking': t2i_text_drop, ti2i_image_drop, seed" in str(err.value)


def test_misspelt_override_suggests_the_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, DEBUG_YAML, ["model.presett=janus-pro-7b"])
    assert str(err.value) == ("unknown key 'model.presett' in override "
                              "'model.presett=janus-pro-7b'; did you mean 'model.preset'?")


@pytest.mark.parametrize("override", ["train.lr", "=1", "train.lr 1e-5"])
def test_override_without_key_and_equals_shows_the_form(override):
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE .*train.lr=1e-5"):
        load_config(ExperimentConfig, None, [override])


def test_override_below_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"'train.lr' is a float, not a section"):
        load_config(ExperimentConfig, None, ["train.lr.peak=1"])


# --------------------------------------------------------------------------- types


def test_wrong_type_names_the_key_and_the_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, path)
    assert str(err.value) == f"train.lr: expected float, got str 'fast' (in {path})"
    assert type(err.value) is ConfigError


def test_wrong_type_from_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"^train.epochs: expected int, got str 'three' "
                                          r"\(in override 'train.epochs=three'\)$"):
        load_config(ExperimentConfig, DEBUG_YAML, ["train.epochs=three"])


def test_int_is_a_float_but_bool_is_not_an_int(tmp_path):
    cfg = load_config(ExperimentConfig, None, ["train.lr=1", "train.grad_clip=2"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got bool True"):
        load_config(ExperimentConfig, None, ["train.epochs=true"])
    with pytest.raises(ConfigError, match=r"masking.t2i_text_drop: expected float, got bool False"):
        load_config(ExperimentConfig, None, ["masking.t2i_text_drop=false"])


def test_float_in_file_without_a_dot(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 3e-4\n  grad_clip: 1E+1\n")
    cfg = load_config(ExperimentConfig, path)
    assert cfg.train.lr == 3e-4 and cfg.train.grad_clip == 10.0


@pytest.mark.parametrize(("override", "attribute", "expected"), [
    ("train.lr=1e-5", ("train", "lr"), 1e-5),
    ("train.lr=2.5E-4", ("train", "lr"), 2.5e-4),
    ("train.lr=.5e-3", ("train", "lr"), 5e-4),
    ("train.max_steps=7", ("train", "max_steps"), 7),
    ("train.max_steps=null", ("train", "max_steps"), None),
    ("train.use_gpu=true", ("train", "use_gpu"), True),
    ("data.uri=s3://bucket/x", ("data", "uri"), "s3://bucket/x"),
    ("masking.t2i_text_drop=0", ("masking", "t2i_text_drop"), 0.0),
    ("model.dtype=bfloat16", ("model", "dtype"), "bfloat16"),
    ("tracking.tracking_uri=http://h:5000", ("tracking", "tracking_uri"), "http://h:5000"),
    ("name=ablation text drop", ("name",), "ablation text drop"),
])
def test_override_values_are_parsed_as_yaml(override, attribute, expected):
    value = load_config(ExperimentConfig, DEBUG_YAML, [override])
    for name in attribute:
        value = getattr(value, name)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_after_the_file_and_in_order():
    overrides = ["model.preset=janus-pro-7b", "model.image_size=384",
                 "train.lr=1e-4", "train.lr=2e-4"]
    cfg = load_config(ExperimentConfig, DEBUG_YAML, overrides)
    assert (cfg.model.preset, cfg.model.image_size, cfg.train.lr) == ("janus-pro-7b", 384, 2e-4)
    assert cfg.train.max_steps == 20  # untouched keys keep the file's value


def test_override_of_a_whole_section_replaces_it():
    cfg = load_config(ExperimentConfig, DEBUG_YAML, ["masking={t2i_text_drop: 0.3}"])
    assert (cfg.masking.t2i_text_drop, cfg.masking.ti2i_image_drop) == (0.3, 0.5)
    with pytest.raises(ConfigError, match=r"unknown key 'masking.drop' in override 'masking=\{"):
        load_config(ExperimentConfig, DEBUG_YAML, ["masking={drop: 1}"])


def test_optional_fields():
    assert load_config(ExperimentConfig, RECIPE_YAML, ["model.weights=null"]).model.weights is None
    with pytest.raises(ConfigError, match=r"tracking.run_name: expected str \| None, got int 5"):
        load_config(ExperimentConfig, None, ["tracking.run_name=5"])


def test_literal_lists_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, None, ["model.preset=janus-pro-13b"])
    assert str(err.value) == (
        "model.preset: expected one of 'debug', 'mini', 'mini-init', 'janus-pro-1b', 'janus-pro-7b', "
        "got str 'janus-pro-13b' (in override 'model.preset=janus-pro-13b')")


@pytest.mark.parametrize("text", ["train: 5\n", "train: [1, 2]\n"])
def test_section_given_a_scalar(tmp_path, text):
    with pytest.raises(ConfigError, match=r"^train: is a section, expected a mapping of its keys"):
        load_config(ExperimentConfig, write_yaml(tmp_path, text))


def test_override_below_a_section_the_file_set_to_a_scalar(tmp_path):
    path = write_yaml(tmp_path, "train: 5\n")
    expected = rf"^train: is a section, .*got int 5 \(in {re.escape(str(path))}\)$"
    with pytest.raises(ConfigError, match=expected):
        load_config(ExperimentConfig, path, ["train.lr=1e-5"])


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of config keys, got list"):
        load_config(ExperimentConfig, write_yaml(tmp_path, "- 1\n- 2\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(ExperimentConfig, write_yaml(tmp_path, "train: {lr: 1\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ExperimentConfig, tmp_path / "nope.yaml")


def test_containers_are_checked_and_converted(tmp_path):
    path = write_yaml(tmp_path, "weights: [1, 0.5]\nnames: [a, b, c]\nlimits: {x: 1}\n"
                                "mode: b\nwindow: {size: [4, 2]}\n")
    cfg = load_config(Containers, path)
    assert cfg == Containers(weights=[1.0, 0.5], names=("a", "b", "c"), limits={"x": 1},
                             mode="b", window=Window(size=(4, 2)))
    assert isinstance(cfg.weights[0], float) and isinstance(cfg.window.size, tuple)
    assert load_config(Containers, path, ["mode=null"]).mode is None


@pytest.mark.parametrize(("override", "message"), [
    ("weights=[1, x]", r"weights\[1\]: expected float, got str 'x'"),
    ("weights=3", r"weights: expected list\[float\], got int 3"),
    ("names=[a, 1]", r"names\[1\]: expected str, got int 1"),
    ("limits={x: 1.5}", r"limits.x: expected int, got float 1.5"),
    ("mode=c", r"mode: expected \{a,b\} \| None, got str 'c'"),
    ("window.size=[1, 2, 3]", r"window.size: expected tuple\[int, int\] \(2 items\), got list"),
])
def test_container_errors_name_the_element(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Containers, None, [override])


def test_required_key_must_be_given():
    with pytest.raises(ConfigError, match="missing required key 'path'"):
        load_config(NeedsPath, None)
    assert load_config(NeedsPath, None, ["path=x"]).path == "x"


# --------------------------------------------------------------------------- post-init checks


@pytest.mark.parametrize(("override", "message"), [
    ("masking.t2i_text_drop=1.5", r"^masking.t2i_text_drop must be in \[0, 1\], got 1.5"),
    ("masking.ti2i_image_drop=-0.1", r"^masking.ti2i_image_drop must be in \[0, 1\]"),
    ("train.lr=0", r"^train.lr must be > 0, got 0.0"),
    ("train.max_steps=0", r"^train.max_steps must be > 0"),
    ("train.warmup_ratio=2", r"^train.warmup_ratio must be in \[0, 1\]"),
    ("train.weight_decay=-1", r"^train.weight_decay must be >= 0"),
    ("data.uri=''", r"^data.uri must be a non-empty string"),
    ("model.image_size=128", r"^model.image_size must be 64 or 384 for the debug preset"),
    ("model.preset=janus-pro-1b", r"^model.image_size must be 384 for preset 'janus-pro-1b'"),
    ("name=''", r"^name must be a non-empty string"),
])
def test_post_init_checks_surface_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(ExperimentConfig, DEBUG_YAML, [override])
    assert f"override '{override}'" in str(err.value)


def test_batch_geometry_must_divide(tmp_path):
    path = write_yaml(tmp_path, "train:\n  global_batch_size: 100\n")
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, path)
    assert str(err.value) == (
        "train.global_batch_size=100 is not divisible by num_workers (8) x "
        f"micro_batch_size (1) = 8; pick a multiple of 8 (in {path})")
    # Every source that set the section is named, since the check spans several keys.
    with pytest.raises(ConfigError, match=r"of 12 \(in .*override 'train.num_workers=12'\)"):
        load_config(ExperimentConfig, None, ["train.num_workers=12"])


def test_checks_also_run_on_direct_construction_and_replace():
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(global_batch_size=6, num_workers=4)
    with pytest.raises(ValueError, match="image_size must be 384"):
        ModelConfig(preset="janus-pro-7b")
    with pytest.raises(ValueError, match="t2i_text_drop"):
        dataclasses.replace(ExperimentConfig().masking, t2i_text_drop=2.0)


def test_validation_split_is_held_out_by_fraction_or_by_count():
    ingest_yaml = REPO / "jobs" / "configs" / "ingest_sample.yaml"
    split = load_config(IngestConfig, None).split
    assert (split.fraction, split.val_count) == (0.1, None)  # nothing set: 10% by fraction
    assert load_config(IngestConfig, ingest_yaml, ["split.val_fraction=0"]).split.fraction == 0.0  # no val split
    by_count = load_config(IngestConfig, ingest_yaml, ["split.val_fraction=null", "split.val_count=1000"]).split
    assert (by_count.fraction, by_count.val_count) == (None, 1000)
    with pytest.raises(ConfigError, match=r"^split.val_fraction \(0.1\) and val_count \(1000\) both .* other to null"):
        load_config(IngestConfig, ingest_yaml, ["split.val_count=1000"])
    with pytest.raises(ConfigError, match=r"^split.val_count must be >= 0"):
        load_config(IngestConfig, None, ["split.val_count=-1"])


@pytest.mark.parametrize("cls, key", [("IngestConfig", "limits.max_text_tokens"),
                                      ("ExperimentConfig", "data.max_text_tokens"),
                                      ("EvaluateConfig", "max_text_tokens")])
def test_every_job_takes_its_prompt_cap_from_its_config(cls, key):
    from janus_lab.evaluation.evaluate import EvaluateConfig

    classes = {"IngestConfig": IngestConfig, "ExperimentConfig": ExperimentConfig,
               "EvaluateConfig": EvaluateConfig}
    required = ["model=debug", "data_uri=d"] if cls == "EvaluateConfig" else []
    loaded = load_config(classes[cls], None, [*required, f"{key}=512"])
    assert flatten(loaded)[key] == 512
    with pytest.raises(ConfigError, match=f"^{re.escape(key)} must be"):
        load_config(classes[cls], None, [*required, f"{key}=0"])


def test_gradient_accumulation_steps():
    recipe = TrainConfig(global_batch_size=128, num_workers=8, micro_batch_size=4)
    assert recipe.gradient_accumulation_steps == 4
    debug = TrainConfig(global_batch_size=4, num_workers=2, micro_batch_size=2)
    assert debug.gradient_accumulation_steps == 1


# --------------------------------------------------------------------------- writing back


def test_flatten_gives_dotted_leaf_keys():
    flat = flatten(load_config(ExperimentConfig, DEBUG_YAML))
    assert flat["train.lr"] == 1e-2 and flat["model.preset"] == "debug" and flat["name"] == "debug"
    assert flat["tracking.run_name"] is None
    assert not any(isinstance(v, dict) for v in flat.values())


def test_to_dict_is_plain():
    data = to_dict(Containers(names=("a",), window=Window(size=(1, 2))))
    assert data["names"] == ["a"] and data["window"] == {"size": [1, 2]}


@pytest.mark.parametrize("cls, path, overrides", [
    (ExperimentConfig, DEBUG_YAML, ["train.lr=1e-5", "model.weights=s3://b/w", "name=r1"]),
    (ExperimentConfig, RECIPE_YAML, []),
    (Containers, None, ["names=[a, b]", "limits={x: 2}", "mode=a", "window.size=[3, 4]"]),
])
def test_dump_then_load_gives_the_same_config(tmp_path, cls, path, overrides):
    cfg = load_config(cls, path, overrides)
    dumped = write_yaml(tmp_path, dump_yaml(cfg))
    assert load_config(cls, dumped) == cfg


# --------------------------------------------------------------------------- command line


def test_parse_cli_reads_config_and_overrides_in_any_order():
    argv = ["train.lr=1e-4", "--config", str(DEBUG_YAML), "train.max_steps=5"]
    cfg = parse_cli(ExperimentConfig, argv)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.num_workers) == (1e-4, 5, 2)
    assert parse_cli(ExperimentConfig, []) == ExperimentConfig()


def test_parse_cli_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_cli(ExperimentConfig, ["--help"], description="Fine-tune Janus-Pro.")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Fine-tune Janus-Pro." in out and "--config PATH" in out
    for row in describe(ExperimentConfig):
        assert row.key in out
    assert "Peak AdamW learning rate" in out and "5e-06" in out


def test_parse_cli_reports_errors_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_cli(ExperimentConfig, ["--config", str(DEBUG_YAML), "train.lrr=1"])
    assert exit_.value.code == 2
    assert "did you mean 'train.lr'?" in capsys.readouterr().err
