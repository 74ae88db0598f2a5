import json

import pandas as pd
import pytest
from conftest import make_world_workdir, run_stage, set_params
from mlflow.tracking import MlflowClient
from openai_server import ModelServer
from tiny_models import teach

from finedefics.attributes.backends import HFText, OpenAIChat, OpenAIText
from finedefics.attributes.discover import discover_prompt, llm_keys, load_keys
from finedefics.attributes.extract import extract
from finedefics.attributes.parsing import NoAttributeList
from finedefics.attributes.prompts import GENERAL_KEY
from finedefics.attributes.summarize import llm_prompt, name_pattern, scrub, summarize
from finedefics.config import AttributesConfig, ExtractConfig
from finedefics.data.prepared import Category, PreparedDataset, load_prepared

BIRDS = PreparedDataset("toy-bird", "world", "bird", "birds", "species", [Category(0, "Quelbin warbler")])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world dataset with its oracle values (per-sample and tag-based)."""
    root = make_world_workdir(tmp_path_factory.mktemp("world"), categories=6, train_per_class=6, deviation_rate=0.3)
    dataset = load_prepared("toy-bird", root / "data" / "prepared")
    keys = load_keys(json.loads((root / "data" / "attributes" / "toy-bird" / "keys.json").read_text()))
    per_sample = extract(dataset, keys, "per-sample", ExtractConfig(), None, root / ".resume").values
    tag_based = extract(dataset, keys, "tag-based", ExtractConfig(), None, root / ".resume").values
    return {
        "root": root,
        "dataset": dataset,
        "manifest": dataset.images,
        "keys": keys,
        "values": per_sample,
        "tag": tag_based,
    }


def run(world, values=None, **changes):
    cfg = AttributesConfig(**changes)
    return summarize(world["values"] if values is None else values, world["dataset"], world["keys"], cfg, 0, None)


def described(world, result):
    """image_id -> description, and image_id -> its values."""
    texts = dict(zip(result.descriptions.image_id, result.descriptions.description))
    values = {i: dict(zip(g.key, g.value)) for i, g in world["values"].groupby("image_id")}
    return texts, values


def test_long_descriptions_have_five_sentences_with_every_value(world):
    result = run(world)
    texts, values = described(world, result)
    assert len(texts) == len(world["dataset"].train)
    for image_id, text in texts.items():
        assert text.count(". ") + 1 == 5
        for key, value in values[image_id].items():
            assert (value in text) and (key in text or key == GENERAL_KEY)
    assert result.stats["names_scrubbed"] == 0


def test_short_level_is_one_sentence(world):
    texts, values = described(world, run(world, level="short"))
    for text in texts.values():
        assert text.startswith("A bird whose ") and text.count(".") == 1


@pytest.mark.parametrize("dropped", ["color", "shape", "texture", "size"])
def test_dropping_a_type_removes_exactly_its_keys(world, dropped):
    types = [t for t in ("color", "shape", "texture", "size") if t != dropped]
    full, _ = described(world, run(world))
    ablated, values = described(world, run(world, types=types))
    gone = {k.key for k in world["keys"] if k.type == dropped}
    kept = {k.key for k in world["keys"] if k.type != dropped and not k.general}
    assert set(full) == set(ablated)
    for image_id, text in ablated.items():
        assert not any(f"{k} is" in text or text.endswith(f" {k}.") for k in gone)
        assert all(k in text for k in kept)
        assert text.split(". ")[0] == full[image_id].split(". ")[0]  # the general description stays


def test_noisy_values_come_from_other_categories(world):
    result = run(world, quality="noisy", noise_rate=0.5)
    n_values = (world["values"].key != GENERAL_KEY).sum()
    assert 0.4 * n_values < result.stats["values_replaced"] < 0.6 * n_values
    clean = run(world)
    changed = (clean.descriptions.description != result.descriptions.description).sum()
    assert changed > 0.8 * len(clean.descriptions)
    keys = [k.key for k in world["keys"] if not k.general]
    for noisy_text, clean_text in zip(result.descriptions.description, clean.descriptions.description):
        assert noisy_text.split(". ")[0] == clean_text.split(". ")[0]  # the general description is not noised
        assert all(k in noisy_text for k in keys)  # every key is still described, only values change
    assert run(world, quality="noisy", noise_rate=0.0).descriptions.equals(clean.descriptions)


def test_tag_based_descriptions_are_equal_within_a_class_per_sample_are_not(world):
    labels = dict(zip(world["manifest"].image_id, world["manifest"].label))
    tag = run(world, values=world["tag"]).descriptions
    assert tag.groupby(tag.image_id.map(labels)).description.nunique().eq(1).all()
    sample = run(world).descriptions
    deviating = set(world["manifest"].loc[world["manifest"].deviation != "", "image_id"])
    profiles = {c.label: c.profile for c in world["dataset"].categories}
    dev = world["manifest"].set_index("image_id").deviation
    for row in sample.itertuples():
        if row.image_id in deviating:
            key = dev[row.image_id]
            assert f"{key} is {profiles[labels[row.image_id]][key]}" not in row.description


def test_sibling_descriptions_differ_in_the_attributes_that_separate_them(world):
    result = run(world)
    manifest = world["manifest"].set_index("image_id")
    categories = world["dataset"].categories
    texts = dict(zip(result.descriptions.image_id, result.descriptions.description))
    typical = {
        c.label: next(
            t for i, t in texts.items() if manifest.loc[i, "label"] == c.label and not manifest.loc[i, "deviation"]
        )
        for c in categories
    }
    for a in categories:
        for b in categories:
            if a.label < b.label and a.cluster == b.cluster:
                differing = [k for k in a.profile if a.profile[k] != b.profile[k]]
                assert 1 <= len(differing) <= 2
                for k in differing:
                    fact_a = f"{k} is {a.profile[k]}"
                    assert fact_a in typical[a.label] or f"{a.profile[k]} {k}" in typical[a.label]
                    assert fact_a not in typical[b.label] and f"{a.profile[k]} {k}" not in typical[b.label]


def test_category_names_are_scrubbed_in_every_spelling():
    pattern = name_pattern(["Black_footed_Albatross", "Lesgrail Quurdreth", "pink primrose"])
    text, n = scrub(
        "A black footed albatross next to a Black-Footed_Albatross, a LESGRAIL QUURDRETH and pink primroses.",
        pattern,
        "bird",
    )
    assert n == 3 and "this bird next to a this bird" in text and "primroses" in text


def test_hf_summaries_from_a_taught_model_are_scrubbed(world, tiny_models, tmp_path):
    first = world["dataset"].train.iloc[0]
    name = world["dataset"].names[int(first.label)]
    values = world["values"][world["values"].image_id == first.image_id]
    pairs = [(k, v) for k, v in zip(values.key, values.value) if k != GENERAL_KEY]
    general = values.loc[values.key == GENERAL_KEY, "value"].iloc[0]
    prompt = llm_prompt("bird", general, pairs, "long")
    taught = teach(tiny_models["lm"], tmp_path / "lm", [(prompt, f"The {name} is a small bird.")])
    backend = HFText.from_config(
        AttributesConfig().summarize.model_copy(update={"model": str(taught), "max_new_tokens": 48}), "summarize"
    )
    cfg = AttributesConfig(summarize={"backend": "hf", "model": str(taught)})
    result = summarize(values, world["dataset"], world["keys"], cfg, 0, backend)
    assert result.descriptions.description.tolist() == ["The this bird is a small bird."]
    assert result.stats["names_scrubbed"] == 1


def test_discover_with_a_taught_model_over_hf_and_openai(tiny_models, tmp_path, monkeypatch):
    classes = BIRDS
    answer = "Sure! Useful attributes: ['wing color' 'beak shape', 'tail shape']"
    taught = teach(tiny_models["lm"], tmp_path / "lm", [(discover_prompt(classes), answer)])
    cfg = AttributesConfig().discover.model_copy(update={"model": str(taught), "max_new_tokens": 64})
    keys, raw = llm_keys(HFText.from_config(cfg, "discover"), classes, retries=0)
    assert raw == answer
    assert [(k.key, k.type) for k in keys] == [
        ("wing color", "color"),
        ("beak shape", "shape"),
        ("tail shape", "shape"),
        (GENERAL_KEY, "other"),
    ]
    with ModelServer(lm=HFText.from_config(cfg, "discover")) as server:
        client = OpenAIChat(server.base_url, "tiny", "k", 10, 1, 64)
        keys_http, _ = llm_keys(OpenAIText(client), classes, retries=0)
    assert keys_http == keys


def test_discover_retries_then_fails_showing_the_raw_answers(tiny_models):
    classes = BIRDS
    cfg = AttributesConfig().discover.model_copy(update={"model": str(tiny_models["lm"]), "max_new_tokens": 6})
    import torch

    # the retries sample from torch's global RNG: seeded here, they do not depend on which tests ran
    # before. The untrained LM wrote no list under any of seeds 0-29, with 1 and 2 threads.
    torch.manual_seed(0)
    with pytest.raises(NoAttributeList, match=r"toy-bird: no attribute list in 3 answer\(s\): '"):
        llm_keys(HFText.from_config(cfg, "discover"), classes, retries=2)


def test_discover_stage_over_openai_never_logs_the_key(tiny_models, tmp_path, monkeypatch, mlflow_store):
    root = make_world_workdir(tmp_path)
    classes = load_prepared("toy-bird", root / "data" / "prepared", images=False)
    taught = teach(tiny_models["lm"], tmp_path / "lm", [(discover_prompt(classes), "['wing color', 'beak shape']")])
    cfg = AttributesConfig().discover.model_copy(update={"model": str(taught), "max_new_tokens": 64})
    with ModelServer(lm=HFText.from_config(cfg, "discover")) as server:
        set_params(
            root,
            **{
                "attributes.discover.backend": "openai",
                "attributes.discover.model": "tiny",
                "attributes.discover.base_url": server.base_url,
                "attributes.discover.api_key_env": "TEST_SECRET_KEY",
                "tracking.experiment": "discover-key",
            },
        )
        monkeypatch.setenv("TEST_SECRET_KEY", "sk-very-secret")
        proc = run_stage(root, "discover.py", "toy-bird")
        assert proc.returncode == 0, proc.stderr
        assert server.requests[0]["auth"] == "Bearer sk-very-secret"
    keys = json.loads((root / "data" / "attributes" / "toy-bird" / "keys.json").read_text())
    assert [k["key"] for k in keys["keys"]] == ["wing color", "beak shape", GENERAL_KEY]
    client = MlflowClient(mlflow_store)
    run = client.search_runs([client.get_experiment_by_name("discover-key").experiment_id])[0]
    logged = json.dumps([run.data.params, run.data.tags, run.data.metrics])
    assert "sk-very-secret" not in logged and run.data.params["attributes.discover.api_key_env"] == "TEST_SECRET_KEY"


def test_summarize_stage_writes_descriptions_without_names(world, tmp_path):
    root = world["root"]
    world["values"].to_parquet(root / "data" / "attributes" / "toy-bird" / "values.parquet")
    proc = run_stage(root, "summarize.py", "toy-bird")
    assert proc.returncode == 0, proc.stderr
    descriptions = pd.read_parquet(root / "data" / "descriptions" / "toy-bird.parquet")
    pattern = name_pattern(world["dataset"].names)
    assert len(descriptions) == len(world["dataset"].train)
    assert not descriptions.description.str.contains(pattern).any()
    assert json.loads((root / "metrics" / "summarize" / "toy-bird.json").read_text())["descriptions"] == len(
        descriptions
    )
