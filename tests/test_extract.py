import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pandas as pd
import pytest
from conftest import REPO, make_world_workdir, run_stage, set_params, stage_env
from openai_server import ModelServer
from PIL import Image

from finedefics.attributes.backends import HFVQA, BackendError, OpenAIChat, OpenAIText, OpenAIVQA
from finedefics.attributes.discover import load_keys
from finedefics.attributes.extract import Unit, extract, questions, run_units, scene_sentence
from finedefics.attributes.prompts import GENERAL_KEY
from finedefics.config import ExtractConfig
from finedefics.data.prepared import load_prepared
from finedefics.models.mllm import MLLM


def load(root, name="toy-bird"):
    dataset = load_prepared(name, root / "data" / "prepared")
    keys = load_keys(json.loads((root / "data" / "attributes" / name / "keys.json").read_text()))
    return dataset, keys


@pytest.fixture
def workdir(tmp_path):
    return make_world_workdir(tmp_path)


def test_oracle_answers_are_the_ground_truth_of_each_image(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    dataset, keys = load(workdir)
    result = extract(dataset, keys, "per-sample", ExtractConfig(), None, workdir / ".resume")
    train = dataset.train.set_index("image_id")
    assert len(result.values) == len(train) * len(keys) and result.stats["failed_items"] == 0
    for row in result.values.itertuples():
        if row.key == GENERAL_KEY:
            assert row.value == scene_sentence("bird", json.loads(train.loc[row.image_id, "scene"]))
        else:
            assert row.value == json.loads(train.loc[row.image_id, "attributes"])[row.key]


def test_tag_based_gives_each_image_its_class_profile(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    dataset, keys = load(workdir, "toy-bird")
    manifest = dataset.images
    result = extract(dataset, keys, "tag-based", ExtractConfig(), None, workdir / ".resume")
    profiles = {c.label: c.profile for c in dataset.categories}
    labels = dict(zip(manifest.image_id, manifest.label))
    assert result.stats["units"] == len(dataset.categories)
    assert GENERAL_KEY not in set(result.values.key)  # no class-level scene
    for row in result.values.itertuples():
        assert row.value == profiles[labels[row.image_id]][row.key]


def test_oracle_refuses_a_dataset_without_ground_truth(workdir):
    dataset, keys = load(workdir)
    dataset = replace(dataset, images=dataset.images.assign(attributes=""))
    with pytest.raises(ValueError, match="no ground-truth attributes"):
        extract(dataset, keys, "ground-truth", ExtractConfig(), None, workdir / ".resume")


def test_hf_vqa_answers_a_batch_of_keys_as_one_at_a_time(tiny_models):
    vqa = HFVQA(MLLM.load(tiny_models["vlm"]), max_new_tokens=6)
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    asked = questions(
        [k for k in load_keys({"keys": [{"key": f"key {i}", "type": "color"} for i in range(8)]})], "bird"
    )
    batched = vqa.answer(image, asked)
    single = [vqa.mllm.generate([vqa.mllm.prompt(q)], [image], 6)[0] for q in asked]
    assert batched == single and len(batched) == 8
    assert vqa.answer_text(asked[:2]) == [
        vqa.mllm.generate([vqa.mllm.prompt(q, image=False)], None, 6)[0] for q in asked[:2]
    ]


def test_extract_stage_with_the_hf_backend(workdir, tiny_models):
    set_params(
        workdir,
        **{
            "attributes.extract.backend": "hf",
            "attributes.extract.model": str(tiny_models["vlm"]),
            "attributes.extract.max_new_tokens": 4,
        },
    )
    proc = run_stage(workdir, "extract.py", "toy-bird")
    assert proc.returncode == 0, proc.stderr
    values = pd.read_parquet(workdir / "data" / "attributes" / "toy-bird" / "values.parquet")
    dataset, keys = load(workdir)
    assert len(values) == len(dataset.train) * len(keys)
    stats = json.loads((workdir / "metrics" / "extract" / "toy-bird.json").read_text())
    assert stats["computed_items"] == len(values) and stats["failed_items"] == 0


def test_ground_truth_construction_uses_the_oracle_whatever_the_backend(workdir):
    """An hf backend whose model does not exist is never loaded: every value is the image's ground truth."""
    set_params(
        workdir,
        **{
            "attributes.construction": "ground-truth",
            "attributes.extract.backend": "hf",
            "attributes.extract.model": "/no/such/model",
        },
    )
    proc = run_stage(workdir, "extract.py", "toy-bird")
    assert proc.returncode == 0, proc.stderr
    values = pd.read_parquet(workdir / "data" / "attributes" / "toy-bird" / "values.parquet")
    dataset, keys = load(workdir)
    train = dataset.train.set_index("image_id")
    assert len(values) == len(train) * len(keys) and set(values.image_id) == set(train.index)
    for row in values.itertuples():
        if row.key == GENERAL_KEY:
            assert row.value == scene_sentence("bird", json.loads(train.loc[row.image_id, "scene"]))
        else:
            assert row.value == json.loads(train.loc[row.image_id, "attributes"])[row.key]


def test_openai_client_retries_server_errors_then_gives_up(tiny_models):
    with ModelServer(vlm=MLLM.load(tiny_models["vlm"])) as server:
        server.fail = lambda index, record: 503 if index < 2 else None
        client = OpenAIChat(server.base_url, "tiny", "secret", timeout_s=10, retries=3, max_tokens=4, backoff_s=0.01)
        assert isinstance(client.chat("hello"), str) and len(server.requests) == 3
        assert server.requests[0]["auth"] == "Bearer secret"
        server.fail = lambda index, record: 500
        with pytest.raises(BackendError, match="HTTP 500 .* after 4 attempt"):
            client.chat("hello")
        server.fail = lambda index, record: 400  # not retryable
        before = len(server.requests)
        with pytest.raises(BackendError, match="after 1 attempt"):
            client.chat("hello")
        assert len(server.requests) == before + 1
    down = OpenAIChat(server.base_url, "tiny", None, timeout_s=2, retries=1, max_tokens=4, backoff_s=0.01)
    with pytest.raises(BackendError, match="after 2 attempt"):
        down.chat("hello")


def test_openai_vqa_sends_the_image_and_matches_the_local_model(tiny_models):
    mllm = MLLM.load(tiny_models["vlm"])
    image = Image.new("RGB", (64, 64), (20, 200, 30))
    asked = questions(load_keys({"keys": [{"key": f"key {i}", "type": "color"} for i in range(4)]}), "bird")
    with ModelServer(vlm=mllm, max_tokens=5) as server:
        vqa = OpenAIVQA(OpenAIChat(server.base_url, "tiny", None, 10, 1, 5), concurrency=4)
        answers = vqa.answer(image, asked)
    assert answers == [mllm.generate([mllm.prompt(q)], [image], 5)[0] for q in asked]
    assert {r["text"] for r in server.requests} == set(asked) and all(r["image_sha1"] for r in server.requests)


def openai_params(workdir, server, shard_size=2, max_failure_rate=0.05):
    set_params(
        workdir,
        **{
            "attributes.extract.backend": "openai",
            "attributes.extract.model": "tiny",
            "attributes.extract.base_url": server.base_url,
            "attributes.extract.max_new_tokens": 4,
            "attributes.extract.shard_size": shard_size,
            "attributes.extract.max_failure_rate": max_failure_rate,
            "attributes.extract.retries": 0,
        },
    )


def test_killed_extract_resumes_without_recomputing_and_equals_an_uninterrupted_run(tmp_path, tiny_models):
    mllm = MLLM.load(tiny_models["vlm"])
    keys_per_image = 8
    interrupted = make_world_workdir(tmp_path / "a")
    with ModelServer(vlm=mllm, max_tokens=4) as server:
        openai_params(interrupted, server, shard_size=2)
        # let 5 images through (2 shards + 1 image), then hang and kill the stage with SIGKILL
        server.hold_from = 5 * keys_per_image
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "stages" / "extract.py"), "toy-bird"],
            cwd=interrupted,
            env=stage_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while not server.holding.is_set() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        server.hold_from = None
        server.release.set()
        shards = sorted((interrupted / ".resume" / "extract" / "toy-bird").rglob("shard-*.parquet"))
        assert len(shards) == 2 and not (interrupted / "data" / "attributes" / "toy-bird" / "values.parquet").exists()
        done = {unit for shard in shards for unit in pd.read_parquet(shard).unit}
        first_run = len(server.requests)
        resumed = run_stage(interrupted, "extract.py", "toy-bird")
        assert resumed.returncode == 0, resumed.stderr
        dataset, _ = load(interrupted)
        sha_of = dict(zip(dataset.images.image_id, dataset.images.sha1))
        asked_again = {r["image_sha1"] for r in server.requests[first_run:]}
        assert not asked_again & {sha_of[i] for i in done}  # nothing written is recomputed
        assert len(server.requests) - first_run == (len(dataset.train) - 4) * keys_per_image

        fresh = make_world_workdir(tmp_path / "b")
        openai_params(fresh, server, shard_size=2)
        assert run_stage(fresh, "extract.py", "toy-bird").returncode == 0
    a = pd.read_parquet(interrupted / "data" / "attributes" / "toy-bird" / "values.parquet")
    b = pd.read_parquet(fresh / "data" / "attributes" / "toy-bird" / "values.parquet")
    pd.testing.assert_frame_equal(a, b)
    stats = json.loads((interrupted / "metrics" / "extract" / "toy-bird.json").read_text())
    assert stats["resumed_items"] == 4 * keys_per_image


def test_failures_are_recorded_below_the_threshold_and_fatal_above_it(tmp_path, tiny_models):
    mllm = MLLM.load(tiny_models["vlm"])
    root = make_world_workdir(tmp_path)
    flaky = "What is the beak shape"
    with ModelServer(vlm=mllm, max_tokens=4) as server:
        server.fail = lambda index, record: 500 if flaky in record["text"] else None
        openai_params(root, server, max_failure_rate=0.2)  # 1 key of 8 fails: 12.5%
        proc = run_stage(root, "extract.py", "toy-bird")
        assert proc.returncode == 0, proc.stderr
        failures = pd.read_csv(root / "data" / "attributes" / "toy-bird" / "failures.csv")
        n_train = 12
        assert (
            len(failures) == n_train
            and set(failures.key) == {"beak shape"}
            and failures.error.str.contains("HTTP 500").all()
        )
        values = pd.read_parquet(root / "data" / "attributes" / "toy-bird" / "values.parquet")
        assert "beak shape" not in set(values.key) and len(values) == n_train * 7

        again = make_world_workdir(tmp_path / "strict")
        openai_params(again, server, max_failure_rate=0.05)
        proc = run_stage(again, "extract.py", "toy-bird")
        assert proc.returncode == 1 and "answers failed" in proc.stderr and "kept in" in proc.stderr
        assert not (again / "data" / "attributes" / "toy-bird" / "values.parquet").exists()
        kept = list((again / ".resume" / "extract" / "toy-bird").rglob("shard-*.parquet"))
        assert kept
        # the server recovers: the rerun asks again only the items with a failed or missing answer
        server.fail = lambda index, record: None
        before = len(server.requests)
        answered = (pd.concat(pd.read_parquet(s) for s in kept).error == "").sum()
        assert run_stage(again, "extract.py", "toy-bird").returncode == 0
        assert len(server.requests) - before == n_train * 8 - answered


def test_a_rerun_asks_the_failed_items_alone_and_the_stage_says_how(tmp_path, tiny_models):
    """Permanent failures below the allowed rate: the stage succeeds, lists them, and its summary line
    gives the command that asks them again (DVC sees the stage as up to date: `-f`); that rerun asks
    the failed (image, key) items alone: 12 requests for the 12 failed items (it asked all 96
    questions of their images before)."""
    mllm = MLLM.load(tiny_models["vlm"])
    root = make_world_workdir(tmp_path)
    dataset, keys = load(root)
    train = list(dataset.train.itertuples())
    flaky = question_of(keys[2])
    with ModelServer(vlm=mllm, max_tokens=4) as server:
        server.fail = lambda index, record: 500 if record["text"] == flaky else None
        openai_params(root, server, max_failure_rate=0.2)  # 1 key of 8 fails for each of the 12 images
        first = run_stage(root, "extract.py", "toy-bird")
        assert first.returncode == 0, first.stderr
        assert len(server.requests) == len(train) * len(keys)
        failures = pd.read_csv(root / "data" / "attributes" / "toy-bird" / "failures.csv")
        assert len(failures) == len(train) and set(failures.key) == {keys[2].key}
        assert first.stdout.strip().splitlines()[-1] == (
            f"toy-bird: {len(train) * 7} values for {len(train)} units x {len(keys)} keys; {len(train)} failed, "
            "listed in data/attributes/toy-bird/failures.csv; `dvc repro -f -s extract@toy-bird` asks them alone again"
        )

        server.fail = lambda index, record: None
        before = len(server.requests)
        again = run_stage(root, "extract.py", "toy-bird")
        assert again.returncode == 0, again.stderr
        asked = server.requests[before:]
        assert len(asked) == len(train) and {r["text"] for r in asked} == {flaky}  # 12 requests, not 96
        assert {r["image_sha1"] for r in asked} == set(dataset.train.sha1)
    assert again.stdout.strip().splitlines()[-1].endswith(f"{len(train)} units x {len(keys)} keys; 0 failed")
    values = pd.read_parquet(root / "data" / "attributes" / "toy-bird" / "values.parquet")
    assert len(values) == len(train) * len(keys)
    assert pd.read_csv(root / "data" / "attributes" / "toy-bird" / "failures.csv").empty
    stats = json.loads((root / "metrics" / "extract" / "toy-bird.json").read_text())
    assert stats["resumed_items"] == len(train) * 7 and stats["computed_items"] == len(train)


# the 200 replies an OpenAI-compatible server must not be trusted to get right
MALFORMED = [
    {"choices": []},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]},
    {"choices": [{"message": {"content": 7}}]},
    {"choices": [{"message": {"content": [{"type": "image_url"}]}}]},
    {"choices": [{}]},
    {"choices": ["text"]},
    {"choices": {"0": {"message": {"content": "x"}}}},
    {"object": "chat.completion"},
    {"error": {"message": "model overloaded"}},
    [],
    "an answer",
    b"null",  # (None would mean: answer normally)
    b"",
    b"<html>502 Bad Gateway</html>",
    b'{"choices": [{"message": {"content": "cut off',
    b"\xff\xfe\x00garbage",
]


def test_malformed_replies_are_retried_then_a_backend_error_never_a_crash(tiny_models):
    with ModelServer(vlm=MLLM.load(tiny_models["vlm"])) as server:
        client = OpenAIChat(server.base_url, "tiny", None, timeout_s=10, retries=2, max_tokens=4, backoff_s=0.01)
        for payload in MALFORMED:
            server.malformed = lambda index, record, payload=payload: payload
            before = len(server.requests)
            with pytest.raises(BackendError, match="malformed reply from .* after 3 attempt"):
                client.chat("hello")
            assert len(server.requests) - before == 3, payload  # retried like a server error
            with pytest.raises(BackendError, match="malformed reply"):  # the text backend of discover/summarize
                OpenAIText(client).complete(["hello"])
        # a server that recovers within the retries gives the answer
        first = len(server.requests)
        server.malformed = lambda index, record: {"choices": []} if index < first + 2 else None
        assert isinstance(client.chat("hello"), str) and len(server.requests) == first + 3
        # the VQA backend of extract: the malformed reply is that item's failure, the others are answers
        server.malformed = lambda index, record: {"choices": []} if "key 1" in record["text"] else None
        asked = questions(load_keys({"keys": [{"key": f"key {i}", "type": "color"} for i in range(3)]}), "bird")
        vqa = OpenAIVQA(OpenAIChat(server.base_url, "tiny", None, 10, 0, 4), concurrency=3)
        got = vqa.answer(Image.new("RGB", (32, 32)), asked)
        assert isinstance(got[0], str) and isinstance(got[2], str)
        assert isinstance(got[1], BackendError) and "the reply has no choices" in str(got[1])


def question_of(key) -> str:
    return questions([key], "bird")[0]


def test_malformed_replies_are_recorded_failures_of_the_extract_stage(tmp_path, tiny_models):
    """`{"choices": []}` (was IndexError) and `"content": null` (was AttributeError) through a stage."""
    root = make_world_workdir(tmp_path)
    dataset, keys = load(root)
    empty, null = question_of(keys[0]), question_of(keys[1])
    with ModelServer(vlm=MLLM.load(tiny_models["vlm"]), max_tokens=4) as server:

        def malformed(index, record):
            if record["text"] == empty:
                return {"choices": []}
            if record["text"] == null:
                return {"choices": [{"message": {"role": "assistant", "content": None}}]}
            return None

        server.malformed = malformed
        openai_params(root, server, max_failure_rate=0.3)  # 2 keys of 8 fail: 25%
        proc = run_stage(root, "extract.py", "toy-bird")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        n_train = len(dataset.train)
        failures = pd.read_csv(root / "data" / "attributes" / "toy-bird" / "failures.csv")
        assert len(failures) == 2 * n_train and set(failures.key) == {keys[0].key, keys[1].key}
        reasons = dict(zip(failures.key, failures.error))
        assert "the reply has no choices" in reasons[keys[0].key]
        assert "message content is null" in reasons[keys[1].key]
        assert failures.error.str.contains("malformed reply from").all()
        stats = json.loads((root / "metrics" / "extract" / "toy-bird.json").read_text())
        assert stats["failed_items"] == 2 * n_train
        # recorded failures are asked again on the next run, and a recovered server completes them
        server.malformed = lambda index, record: None
        assert run_stage(root, "extract.py", "toy-bird").returncode == 0
        values = pd.read_parquet(root / "data" / "attributes" / "toy-bird" / "values.parquet")
        assert len(values) == n_train * len(keys)
        assert pd.read_csv(root / "data" / "attributes" / "toy-bird" / "failures.csv").empty


def shard_units(folder) -> list[str]:
    return [u for shard in sorted(folder.rglob("shard-*.parquet")) for u in pd.read_parquet(shard).unit.unique()]


@pytest.mark.parametrize("crash", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_answers_received_before_a_crash_are_written(tmp_path, crash):
    """Shards are written every `shard_size` units; whatever stops the run writes the rest first."""
    keys = load_keys({"keys": [{"key": f"key {i}", "type": "color"} for i in range(4)]})

    def ask(i):
        if i == 4:
            raise crash
        return [f"answer {i}"] * len(keys)

    units = [Unit(f"u{i}", [f"u{i}"], lambda idx, i=i: [ask(i)[j] for j in idx]) for i in range(12)]
    with pytest.raises(type(crash)):
        run_units(units, keys, tmp_path, ExtractConfig(shard_size=3), desc="test")
    assert shard_units(tmp_path) == ["u0", "u1", "u2", "u3"]  # one full shard and the received rest
    answers, _ = run_units(units[:4], keys, tmp_path, ExtractConfig(shard_size=3), desc="test")
    assert answers["u3"] == {k.key: ("answer 3", "") for k in keys}


def test_a_stage_that_dies_mid_run_keeps_the_answers_it_received(tmp_path, tiny_models):
    """An error at the 5th image with shard size 3: the 4 images answered are on disk, not asked again."""
    root = make_world_workdir(tmp_path)
    dataset, keys = load(root)
    train = list(dataset.train.itertuples())
    broken = root / train[4].path
    kept = broken.read_bytes()
    broken.unlink()
    with ModelServer(vlm=MLLM.load(tiny_models["vlm"]), max_tokens=4) as server:
        openai_params(root, server, shard_size=3)
        proc = run_stage(root, "extract.py", "toy-bird")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        folder = root / ".resume" / "extract" / "toy-bird"
        assert shard_units(folder) == [row.image_id for row in train[:4]]
        broken.write_bytes(kept)
        before = len(server.requests)
        assert run_stage(root, "extract.py", "toy-bird").returncode == 0
        assert len(server.requests) - before == (len(train) - 4) * len(keys)


def test_too_many_failures_names_the_commonest_reason_and_writes_failures_csv(tmp_path, tiny_models):
    """One key always gets HTTP 500, another a malformed reply for the first image only: the stage
    stops at the 4th image (5 failures of 96 items > 5%) naming HTTP 500 (4 of 5), and lists all 5."""
    root = make_world_workdir(tmp_path)
    dataset, keys = load(root)
    always, once = question_of(keys[0]), question_of(keys[1])
    with ModelServer(vlm=MLLM.load(tiny_models["vlm"]), max_tokens=4) as server:
        server.fail = lambda index, record: 500 if record["text"] == always else None
        server.malformed = lambda index, record: (
            {"choices": []} if record["text"] == once and index < len(keys) else None  # the first image's
        )
        openai_params(root, server, max_failure_rate=0.05)
        proc = run_stage(root, "extract.py", "toy-bird")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "5 of 96 answers failed" in line, line
    assert f"most often (4 of 5): HTTP 500 from {server.base_url} after 1 attempt(s)" in line, line
    failures = pd.read_csv(root / "data" / "attributes" / "toy-bird" / "failures.csv")
    assert list(failures.columns) == ["unit", "key", "error"] and len(failures) == 5
    assert list(failures.unit) == [dataset.train.image_id.iloc[i] for i in (0, 0, 1, 2, 3)]
    assert failures.key.value_counts().to_dict() == {keys[0].key: 4, keys[1].key: 1}
    assert not (root / "data" / "attributes" / "toy-bird" / "values.parquet").exists()
