import subprocess
import sys

import pytest
import yaml
from conftest import REPO, leaves, set_dotted, stage_env

from finedefics.config import ConfigError, Params, load_params, parse_params, read_config


def defaults() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_for(**changes) -> str:
    raw = defaults()
    for dotted, value in changes.items():
        set_dotted(raw, dotted, value, sep="__", create=False)
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return str(info.value)


def test_committed_params_and_paper_config_validate():
    default = load_params(REPO / "params.yaml")
    paper = load_params(REPO / "configs" / "paper.yaml")
    assert default.model.base == "tiny" and set(default.datasets) == {"toy-bird", "toy-flower"}
    assert paper.model.base == "HuggingFaceM4/idefics2-8b"
    assert paper.model.finetune == "qlora" and (paper.model.lora.r, paper.model.lora.alpha) == (8, 8)
    assert paper.train.stage1.lr == paper.train.stage2.lr == 2e-4
    assert (paper.train.stage1.batch_size, paper.train.stage2.batch_size) == (64, 128)
    assert paper.train.stage1.warmup_steps == 60 and paper.train.stage1.epochs == 1
    assert set(paper.datasets) == {"bird-200", "car-196", "dog-120", "flower-102", "pet-37", "aircraft-102"}
    assert set(paper.model.lora.modules) == {"text_model", "connector"}


def test_unknown_choice_names_key_value_and_allowed_values():
    msg = error_for(negatives="hardest")
    assert "negatives" in msg and "'hardest'" in msg
    assert all(v in msg for v in ("hard", "simple", "none"))
    assert "\n" not in msg


def test_unknown_key_names_the_key_and_the_allowed_keys():
    msg = error_for(align__objectve="obj-cat")
    assert "align.objectve" in msg and "objective" in msg and "paradigm" in msg
    top = error_for(negative="hard")
    assert "'negative'" in top and "negatives" in top


def test_wrong_type_names_key_and_value():
    msg = error_for(world__image_size="big")
    assert "world.image_size" in msg and "'big'" in msg and "integer" in msg


@pytest.mark.parametrize(
    "key, allowed",
    [
        ("negatives", ["hard", "simple", "none"]),
        ("align__objective", ["obj-att-cat", "obj-cat", "none"]),
        ("align__paradigm", ["two-stage", "one-stage", "stage2-only", "stage1-only"]),
        ("attributes__quality", ["complete", "noisy"]),
        ("attributes__level", ["long", "short"]),
        ("attributes__construction", ["per-sample", "tag-based", "ground-truth"]),
        ("instructions__stage2", ["open+closed", "open"]),
        ("model__finetune", ["qlora", "lora", "full"]),
    ],
)
def test_every_ablation_key_takes_exactly_its_values(key, allowed):
    for value in allowed:
        raw = defaults()
        set_dotted(raw, key, value, sep="__", create=False)
        parse_params(raw)
    msg = error_for(**{key: "bogus"})
    assert all(v in msg for v in allowed)


def test_attribute_types_may_drop_a_type_but_not_invent_one():
    raw = defaults()
    raw["attributes"]["types"] = ["color", "shape", "size"]
    assert parse_params(raw).attributes.types == ["color", "shape", "size"]
    msg = error_for(attributes__types=["color", "smell"])
    assert "attributes.types.1" in msg and "'smell'" in msg


def test_world_cluster_cannot_exceed_categories():
    msg = error_for(world__cluster_size=20)
    assert "world.cluster_size" in msg


def test_world_unseen_must_leave_four_seen_categories():
    msg = error_for(world__unseen=9)
    assert "world.unseen" in msg and "at least 4 seen" in msg


@pytest.mark.parametrize("key", ["base", "clip"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_model_name_is_refused(key, value):
    """Issue 15.8: `model.base: ""` passed the schema and failed later in bootstrap."""
    msg = error_for(**{f"model__{key}": value})
    assert f"model.{key} = {value!r}" in msg and "must not be empty" in msg and "\n" not in msg


def test_flat_lists_dotted_keys():
    flat = Params().flat()
    assert flat["negatives"] == "hard" and flat["model.lora.r"] == 16 and flat["datasets.toy-bird"].endswith(".yaml")


def test_stage_exits_2_with_one_line_before_any_work(tmp_path):
    raw = defaults()
    raw["negatives"] = "hardest"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for stage in (["stages/check_params.py"], ["stages/prepare.py", "toy-bird"]):
        proc = subprocess.run(
            [sys.executable, str(REPO / stage[0]), *stage[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=stage_env(),
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "negatives" in lines[0] and "'hardest'" in lines[0]
        assert not (tmp_path / "data").exists()


def test_missing_and_malformed_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_cli_check_and_use_config(tmp_path):
    from typer.testing import CliRunner

    from finedefics.cli import app

    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    raw = defaults()
    raw["attributes"]["level"] = "medium"
    bad.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2 and "attributes.level = 'medium'" in result.output
    target = tmp_path / "params.yaml"
    target.write_text("seed: 0\n")
    result = runner.invoke(app, ["use-config", str(bad), "--params", str(target)])
    assert result.exit_code == 2 and target.read_text() == "seed: 0\n"  # refused, nothing lost
    result = runner.invoke(app, ["use-config", str(REPO / "configs" / "paper.yaml"), "--params", str(target)])
    assert result.exit_code == 0 and load_params(target).model.finetune == "qlora"


def test_schema_defaults_are_the_committed_params():
    """One set of defaults: the schema's are the embedded default's, field for field."""
    assert Params() == load_params(REPO / "params.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates_with_the_values_it_sets(path):
    """Validation keeps every value an overlay sets (none dropped, none coerced to another value),
    and each overlay changes the default."""
    raw, validated = read_config(path), load_params(path).model_dump(mode="json")
    for dotted, value in leaves(raw).items():
        node = validated
        for part in dotted.split("."):
            node = node[part]
        assert node == value, (dotted, value, node)
    assert validated != Params().model_dump(mode="json")


def test_python_m_cli_has_every_command():
    """`python -m finedefics.cli` is the installed `finedefics`: the app starts after its last command."""
    proc = subprocess.run(
        [sys.executable, "-m", "finedefics.cli", "--help"], capture_output=True, text=True, env=stage_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert all(command in proc.stdout for command in ("check", "use-config", "score", "predict", "report"))


def float_keys(model=Params, prefix=()) -> list[tuple[str, ...]]:
    """The dotted paths of every float field of the schema, nested sections included."""
    import typing

    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        kinds = typing.get_args(field.annotation) or (field.annotation,)
        if float in kinds:
            out.append((*prefix, name))
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out += float_keys(kind, (*prefix, name))
    return out


def test_every_float_field_is_found():
    keys = {".".join(k) for k in float_keys()}
    assert {"train.stage1.lr", "train.stage2.epochs", "world.deviation_rate", "align.temperature"} <= keys
    assert {"attributes.extract.timeout_s", "attributes.extract.max_failure_rate", "model.lora.dropout"} <= keys
    assert {"bootstrap.mllm.lr", "bootstrap.clip.lr"} <= keys
    assert len(keys) >= 14


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", float_keys(), ids=lambda k: ".".join(k))
def test_no_float_field_takes_a_non_finite_number(tmp_path, key, text):
    """YAML's .inf / .nan are floats: `train.stage1.lr: .inf` once validated, and training wrote a NaN model."""
    raw = defaults()
    set_dotted(raw, ".".join(key), "__VALUE__")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw).replace("__VALUE__", text))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert ".".join(key) in msg and "finite" in msg and "\n" not in msg, msg
