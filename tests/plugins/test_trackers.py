"""run.report_to: TensorBoard, W&B (offline), MLflow (a local file store) and trackio (its local
SQLite store) each get the step metrics, the eval metrics, the recipe and the completions tables of
a real run; read back with each library's own reader."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import RECIPES, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"file://{root / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": "trackers-test",
           "TRACKIO_DIR": str(root / "trackio"), "TRACKIO_PROJECT": "trackers-test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        done = run_cli("run", str(RECIPES / "quickstart.yaml"), "run.steps=4", "run.log_interval=2", "run.eval_interval=2",
                       "data.eval_size=16", "run.report_to=[tensorboard, wandb, mlflow, trackio]",
                       f"run.output_dir={out}", "-q")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert done.returncode == 0, done.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    return out, root, metrics, evals


def test_tensorboard_gets_scalars_recipe_and_completions(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, metrics, evals = tracked
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    reward = events.Scalars("reward_mean")
    assert [e.step for e in reward] == [1, 2, 3, 4]
    assert [e.value for e in reward] == pytest.approx([m["reward_mean"] for m in metrics], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/reward_mean/accuracy")] == [0, 2, 4]
    assert [e.value for e in events.Scalars("eval/reward_mean/accuracy")] == pytest.approx(
        [e["eval/reward_mean/accuracy"] for e in evals], rel=1e-6)
    tables = events.Tensors("completions/text_summary")
    assert [t.step for t in tables] == [2, 4]
    text = tables[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | completion | reward/accuracy | advantage |") and "reverse " in text
    recipe = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "kl_coef: 0.01" in recipe and "report_to:" in recipe


def wandb_records(path: Path):
    """The records of a W&B offline run file (LevelDB's log format: 32 KiB blocks, each record a
    7-byte header of CRC, length and kind, kinds full / first / middle / last)."""
    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + chunk
        elif kind == 4:
            yield pending + chunk


def test_wandb_offline_run_holds_history_config_and_tables(tracked):
    from wandb.proto import wandb_internal_pb2 as pb

    out, _, metrics, evals = tracked
    [run_dir] = (out / "wandb").glob("offline-run-*")
    history, config = {}, {}
    for raw in wandb_records(next(run_dir.glob("run-*.wandb"))):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    assert [history[s]["reward_mean"] for s in (1, 2, 3, 4)] == pytest.approx([m["reward_mean"] for m in metrics])
    assert [history[s]["eval/reward_mean/accuracy"] for s in (0, 2, 4)] == pytest.approx(
        [e["eval/reward_mean/accuracy"] for e in evals])
    assert config["grpo"]["kl_coef"] == 0.01 and config["run"]["report_to"] == ["tensorboard", "wandb", "mlflow", "trackio"]
    assert history[2]["completions/_type"] == "table-file"
    tables = sorted((run_dir / "files" / "media" / "table").glob("completions_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "completion", "reward/accuracy", "advantage"]
    assert len(table["data"]) == 2 * 8  # run.log_samples groups of group_size completions


def test_mlflow_file_store_holds_metrics_params_and_tables(tracked):
    from mlflow.tracking import MlflowClient

    out, root, metrics, evals = tracked
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(f"file://{root / 'mlruns'}")
    [run] = client.search_runs([client.get_experiment_by_name("trackers-test").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert [(m.step, m.value) for m in history] == [(m["step"], pytest.approx(m["reward_mean"])) for m in metrics]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval.reward_mean.accuracy")] == [0, 2, 4]
    assert run.data.params["grpo.kl_coef"] == "0.01" and run.data.params["sampling.group_size"] == "8"
    names = [f.path for f in client.list_artifacts(run.info.run_id, "completions")]
    assert names == ["completions/step-00000002.json", "completions/step-00000004.json"]
    local = client.download_artifacts(run.info.run_id, names[0], str(root / "download"))
    assert json.loads(Path(local).read_text())["columns"] == ["prompt", "completion", "reward/accuracy", "advantage"]


TRACKIO_READER = """
import json, sys, trackio
from trackio.sqlite_storage import SQLiteStorage
runs = [{"name": r.name, "config": r.config, "logs": SQLiteStorage.get_logs(r.project, r.name, run_id=r.id)}
        for r in trackio.Api().runs(sys.argv[1])]
print(json.dumps(runs, default=str))
"""


def trackio_runs(trackio_dir: Path, project: str) -> list[dict]:
    """The runs of a trackio project as trackio's own reader returns them (in a subprocess: trackio
    reads TRACKIO_DIR once, when it is imported)."""
    done = subprocess.run([sys.executable, "-c", TRACKIO_READER, project], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRACKIO_DIR=str(trackio_dir)))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_trackio_local_store_holds_metrics_config_and_tables(tracked):
    out, root, metrics, evals = tracked
    run_id = json.loads((out / "zenalign-run.json").read_text())["run_id"]
    [run] = trackio_runs(root / "trackio", "trackers-test")
    assert run["name"] == f"run-{run_id[:8]}"
    assert run["config"]["grpo"]["kl_coef"] == 0.01 and run["config"]["run"]["report_to"][-1] == "trackio"
    by_step = lambda key: [(row["step"], row[key]) for row in run["logs"] if key in row]
    assert by_step("reward_mean") == [(m["step"], pytest.approx(m["reward_mean"])) for m in metrics]
    assert by_step("eval/reward_mean/accuracy") == [(0, evals[0]["eval/reward_mean/accuracy"]),
                                                    (2, pytest.approx(evals[1]["eval/reward_mean/accuracy"])),
                                                    (4, pytest.approx(evals[2]["eval/reward_mean/accuracy"]))]
    tables = by_step("completions")
    assert [step for step, _ in tables] == [2, 4]
    rows = tables[0][1]["_value"]
    assert len(rows) == 2 * 8 and list(rows[0]) == ["prompt", "completion", "reward/accuracy", "advantage"]
    assert rows[0]["prompt"].startswith("reverse ")


def test_trackio_refuses_a_space_or_server(tmp_path):
    """zenalign logs trackio runs locally only: a Space or a server in the environment is one line."""
    saved = os.environ.get("TRACKIO_SPACE_ID")
    os.environ["TRACKIO_SPACE_ID"] = "someone/somewhere"
    try:
        done = run_cli("run", str(RECIPES / "quickstart.yaml"), "run.steps=1", "data.eval_size=4", "run.report_to=[trackio]",
                       f"run.output_dir={tmp_path / 'run'}", "-q")
    finally:
        os.environ.pop("TRACKIO_SPACE_ID") if saved is None else os.environ.__setitem__("TRACKIO_SPACE_ID", saved)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("run.report_to: trackio logs locally only, but TRACKIO_SPACE_ID is set; unset it, and publish the project "
            "afterwards with `trackio sync`") in done.stderr


def test_a_tracker_that_is_not_installed_is_one_line_at_validate(monkeypatch):
    import importlib.util

    from zenalign.errors import RecipeError
    from zenalign.recipe.loader import load_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match=r"run.report_to.*wandb not installed; pip install 'zenalign\[wandb\]'"):
        load_recipe(RECIPES / "quickstart.yaml", ["run.report_to=[wandb]"])


def test_a_resumed_run_continues_the_same_tracker_runs_and_tensorboard_shows_each_step_once(tmp_path):
    """Issue 30, item 7: after a resume, TensorBoard showed steps 3 and 4 twice, and W&B and MLflow
    started new runs. Resumed from the step-2 checkpoint of a finished 4-step run, steps 3 and 4
    are logged again: TensorBoard purges the first attempt's (purge_step), W&B resumes the run with
    the run directory's id, MLflow the run trackers.json recorded, trackio the run of the same name."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": "resume-test",
           "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "resume-test"}
    args = ["run", str(RECIPES / "quickstart.yaml"), "run.steps=4", "run.checkpoint_interval=2", "run.eval_interval=0",
            "data.eval_size=8", "run.report_to=[tensorboard, wandb, mlflow, trackio]", f"run.output_dir={out}", "-q"]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        first = run_cli(*args)
        assert first.returncode == 0, first.stderr
        second = run_cli(*args, "--resume", str(out / "checkpoints" / "step-00000002"))
        assert second.returncode == 0, second.stderr
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run_id = json.loads((out / "zenalign-run.json").read_text())["run_id"]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("reward_mean")] == pytest.approx([m["reward_mean"] for m in metrics], rel=1e-6)

    attempts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts)

    client = MlflowClient(f"file://{tmp_path / 'mlruns'}")
    [run] = client.search_runs([client.get_experiment_by_name("resume-test").experiment_id])
    assert json.loads((out / "trackers.json").read_text()) == {"mlflow": run.info.run_id}
    # MLflow keeps every logged point: the first attempt's steps 3 and 4, then the resumed ones
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward_mean")] == [1, 2, 3, 4, 3, 4]

    # trackio too, in the one run of the run directory's name
    [tracked_run] = trackio_runs(tmp_path / "trackio", "resume-test")
    assert tracked_run["name"] == f"run-{run_id[:8]}"
    assert [row["step"] for row in tracked_run["logs"] if "reward_mean" in row] == [1, 2, 3, 4, 3, 4]
