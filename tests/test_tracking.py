import pytest
from mlflow.tracking import MlflowClient

from finedefics.config import Params
from finedefics.tracking import repo_root, stage_run, tracking_uri


def test_run_is_written_and_read_back(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-fern")
    params = Params(negatives="simple", tracking={"experiment": "unit"})
    with stage_run("prepare", params, run_name="prepare@toy-bird") as run:
        run.log_metrics({"train_images": 240, "classes": 12})
        (tmp_path / "note.txt").write_text("hello")
        run.log_artifact(tmp_path / "note.txt")
    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "prepare@toy-bird"
    assert client.get_experiment(got.info.experiment_id).name == "unit"
    assert got.data.params["negatives"] == "simple" and got.data.params["model.lora.r"] == "8"
    assert got.data.metrics == {"train_images": 240.0, "classes": 12.0}
    tags = got.data.tags
    assert tags["stage"] == "prepare" and tags["dvc_exp_name"] == "tidy-fern"
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["note.txt"]


def test_failed_stage_marks_the_run_failed(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError):
        with stage_run("mine", Params(tracking={"experiment": "unit"})) as run:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


def test_default_store_is_the_main_repository_even_from_a_dvc_temp_workspace(monkeypatch, tmp_path):
    main = tmp_path / "repo"
    temp = main / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (temp / ".dvc").mkdir(parents=True)
    (temp / "src").mkdir()
    assert repo_root(temp / "src") == main
    assert repo_root(main / ".dvc" / "..") == main
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(temp)
    assert tracking_uri() == f"sqlite:///{main / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"
