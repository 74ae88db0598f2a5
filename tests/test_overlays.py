"""configs/*.yaml are overlays on the embedded default: each holds only the values it changes, and
`finedefics use-config` writes the merged, validated whole over params.yaml."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import leaves
from typer.testing import CliRunner

from finedefics.cli import app
from finedefics.config import ConfigError, Params, load_params, read_config

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = sorted((REPO / "configs").glob("*.yaml"))
# each config as a full 137-line file held it before it became an overlay, flattened
FULL = REPO / "tests" / "fixtures" / "configs"


def flat_json(params: Params) -> dict:
    return json.loads(json.dumps(params.flat(), default=str))


def test_every_config_is_covered():
    assert sorted(p.stem for p in OVERLAYS) == sorted(p.stem for p in FULL.glob("*.json")) != []


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_merged_overlay_equals_the_full_config_key_for_key(overlay):
    assert flat_json(load_params(overlay)) == json.loads((FULL / f"{overlay.stem}.json").read_text())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_an_overlay_holds_only_what_it_changes(overlay):
    raw = yaml.safe_load(overlay.read_text())
    base = raw.pop("extends", None)
    start = leaves((load_params(overlay.parent / base) if base else Params()).model_dump(mode="json"))
    same = [key for key, value in leaves(raw).items() if start.get(key) == value]
    assert same == []


def test_release_is_the_paper_but_for_five_values():
    release, paper = load_params(REPO / "configs/release.yaml").flat(), load_params(REPO / "configs/paper.yaml").flat()
    assert {k for k in release if release[k] != paper[k]} == {
        "align.ccc",
        "align.negatives_scope",
        "train.gradient_checkpointing",
        "evaluate.permutations",
        "tracking.experiment",
    }


def test_a_list_or_the_datasets_replace_the_base_whole(tmp_path):
    (tmp_path / "base.yaml").write_text("datasets: {a: world/toy-bird.yaml, b: world/toy-flower.yaml}\n")
    (tmp_path / "top.yaml").write_text(
        "extends: base.yaml\ndatasets: {c: world/toy-bird.yaml}\nattributes: {types: [color]}\n"
    )
    merged = read_config(tmp_path / "top.yaml")
    assert merged == {"datasets": {"c": "world/toy-bird.yaml"}, "attributes": {"types": ["color"]}}
    params = load_params(tmp_path / "top.yaml")
    assert params.attributes.level == Params().attributes.level  # the rest of a section: the default's


def test_a_section_merges_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {stage1: {lr: 0.01, epochs: 2}}\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\ntrain: {stage1: {lr: 0.02}}\n")
    stage1 = load_params(tmp_path / "top.yaml").train.stage1
    assert (stage1.lr, stage1.epochs) == (0.02, 2)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "extends it again"),
        ({"a.yaml": "extends: missing.yaml\n"}, "missing.yaml: params file not found"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "align: {ccc: nonsense}\n"}, "align.ccc"),
    ],
)
def test_a_broken_chain_is_one_clear_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "a.yaml")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_use_config_writes_the_merged_whole(tmp_path, overlay):
    target = tmp_path / "params.yaml"
    result = CliRunner().invoke(app, ["use-config", str(overlay), "--params", str(target)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(target.read_text())
    assert "extends" not in written and leaves(written) == leaves(load_params(overlay).model_dump(mode="json"))
    assert load_params(target) == load_params(overlay)


def test_use_config_refuses_a_bad_overlay_and_keeps_params(tmp_path):
    (tmp_path / "bad.yaml").write_text("align: {ccc: nonsense}\n")
    target = tmp_path / "params.yaml"
    target.write_text("kept\n")
    result = CliRunner().invoke(app, ["use-config", str(tmp_path / "bad.yaml"), "--params", str(target)])
    assert result.exit_code == 2 and "align.ccc" in result.output and target.read_text() == "kept\n"


def test_use_config_sets_values_over_the_overlay_and_refuses_bad_ones(tmp_path):
    target = tmp_path / "params.yaml"
    args = ["use-config", str(REPO / "configs/paper.yaml"), "--params", str(target)]
    result = CliRunner().invoke(
        app, [*args, "--set", "train.seed=3", "-S", "attributes.discover.base_url=http://h:1/v1"]
    )
    assert result.exit_code == 0, result.output
    written = load_params(target)
    assert written.train.seed == 3 and written.attributes.discover.base_url == "http://h:1/v1"
    paper = load_params(REPO / "configs/paper.yaml")
    assert (written.align, written.model, written.train.stage1) == (paper.align, paper.model, paper.train.stage1)
    assert "--set train.seed=3" in target.read_text().splitlines()[0]
    target.write_text("kept\n")
    for bad, says in [
        ("train.sed=3", "train.sed"),
        ("train.seed", "expected <dotted.key>=<value>"),
        ("seed.x=1", "seed"),
    ]:
        result = CliRunner().invoke(app, [*args, "--set", bad])
        assert result.exit_code == 2 and says in result.output and target.read_text() == "kept\n", result.output
