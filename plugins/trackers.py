"""Experiment trackers, chosen with ``run.report_to: [tensorboard, wandb, mlflow, trackio]``.

Each goes through its own library's API, on the main process only:

- every training step's metrics (``metrics.jsonl``) and every evaluation's (``eval.jsonl``) as
  scalars at their step; a NaN or missing value is left out. MLflow gets ``.`` for ``/`` in their
  names (``eval.reward_mean.accuracy``): its file store keeps a metric per file;
- the resolved recipe as the run's config (W&B and trackio config, MLflow params flattened to
  dotted keys, TensorBoard text);
- at each log step, a completions table (prompt, completion, each objective's reward, advantage):
  a W&B or trackio Table, TensorBoard text (Markdown), an MLflow JSON artifact ``completions/step-N.json``.

TensorBoard writes ``RUN/tensorboard``. W&B writes under ``RUN/wandb`` and follows its own settings
(``WANDB_MODE=offline`` to log without an account, ``WANDB_PROJECT``, default project
``zenalign``); MLflow follows ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` (default
``zenalign``). trackio (TRL's default tracker) logs locally only, to the SQLite store in
``TRACKIO_DIR`` (default ``~/.cache/huggingface/trackio``, read when trackio is imported), project
``TRACKIO_PROJECT`` (default ``zenalign``); ``trackio show`` opens it, ``trackio sync`` publishes
it. zenalign turns off its CPU/GPU monitors and refuses TRACKIO_SPACE_ID / TRACKIO_SERVER_URL
(they would send the run over the network). The run is named run.name, or after the run directory (trackio:
with the first 8 characters of the run id added, since trackio resumes a run by its name).

A resumed run continues the same tracker run: TensorBoard purges the steps after the checkpoint
(``purge_step``), so a step the killed attempt logged past it is shown once, with the resumed
attempt's values; W&B resumes the run whose id is the run directory's (``run_id``), and MLflow the
run whose id ``RUN/trackers.json`` recorded, trackio the run of the same name. None of W&B, MLflow
and trackio can drop logged points: they keep the killed attempt's values of those steps beside the
resumed ones (the same values when the run is deterministic).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from contextlib import contextmanager, redirect_stdout
from typing import Any

import yaml

from zenalign import hookimpl
from zenalign.errors import PluginError, RecipeError, one_line

log = logging.getLogger("zenalign")
_active: list["Tracker"] = []  # the trackers of the run in progress (one run at a time per process)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a tracker can plot: finite numbers (not the step counter)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def table(samples: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """A completions table: prompt, completion, reward/<objective>..., advantage."""
    objectives = list(samples[0]["rewards"])
    columns = ["prompt", "completion", *(f"reward/{name}" for name in objectives), "advantage"]
    rows = [[s["prompt"], s["completion"], *(s["rewards"][name] for name in objectives), s["advantage"]] for s in samples]
    return columns, rows


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"grpo": {"kl_coef": 0.01}}`` -> ``{"grpo.kl_coef": "0.01"}`` (MLflow params are strings)."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(data)[:6000]}


class Tracker:
    def __init__(self, context: Any, start_step: int) -> None: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def completions(self, samples: list[dict[str, Any]], step: int) -> None: ...
    def finish(self) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, context, start_step):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides what the stopped attempt logged after its checkpoint (steps > start_step)
        self.writer = SummaryWriter(log_dir=str(context.output_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("recipe", "```yaml\n" + yaml.safe_dump(context.recipe, sort_keys=False) + "```", start_step)

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run that stops keeps what it logged

    def completions(self, samples, step):
        columns, rows = table(samples)
        cell = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text("completions", "\n".join(lines), step)

    def finish(self):
        self.writer.close()


def run_name(context) -> str:
    """run.name (TRL's run_name), or the run directory's name."""
    return context.recipe.get("run", {}).get("name") or context.output_dir.name


class TableRun(Tracker):
    """W&B and trackio: a run object that logs a dict at a step, and the library's Table."""

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def completions(self, samples, step):
        columns, rows = table(samples)
        self.run.log({"completions": self.library.Table(columns=columns, data=rows)}, step=step)


class WandB(TableRun):
    def __init__(self, context, start_step):
        import wandb

        self.library = wandb
        try:  # the run directory's id: every attempt of the run logs to the same W&B run
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "zenalign"), name=run_name(context),
                                  id=context.run_id or None, resume="allow", dir=str(context.output_dir),
                                  config=context.recipe, reinit="create_new")
        except Exception as exc:
            raise RecipeError(f"run.report_to: wandb could not start a run ({type(exc).__name__}: {one_line(exc)[:200]}); "
                              f"log in with `wandb login`, or set WANDB_MODE=offline to write it to "
                              f"{context.output_dir}/wandb and `wandb sync` it later") from exc

    def finish(self):
        self.run.finish()


class MLflow(Tracker):
    def __init__(self, context, start_step):
        import mlflow

        self.mlflow = mlflow
        record = context.output_dir / "trackers.json"
        earlier = recorded(record).get("mlflow") if start_step else None
        try:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "zenalign"))
            self.run = self._start(earlier, run_name(context))
        except Exception as exc:
            raise RecipeError(f"run.report_to: mlflow could not start a run ({type(exc).__name__}: {one_line(exc)[:200]}); "
                              f"set MLFLOW_TRACKING_URI to a tracking server or database") from exc
        record.write_text(json.dumps({**recorded(record), "mlflow": self.run.info.run_id}) + "\n", encoding="utf-8")
        if earlier != self.run.info.run_id:  # a resumed run's params are logged already (they cannot change)
            params = flatten(context.recipe)
            keys = list(params)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params({k: params[k] for k in keys[i:i + 100]})

    def _start(self, earlier, name):
        """The run the earlier attempts logged to, if the tracking store still has it; else a new one."""
        if earlier:
            try:
                return self.mlflow.start_run(run_id=earlier)
            except self.mlflow.exceptions.MlflowException:
                pass
        return self.mlflow.start_run(run_name=name)

    def log(self, metrics, step):
        # "." for "/": MLflow's file store keeps each metric in a file named after it, so
        # "reward_mean" and "reward_mean/accuracy" could not both exist there
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()}, step=step)

    def completions(self, samples, step):
        columns, rows = table(samples)
        self.mlflow.log_dict({"columns": columns, "data": rows}, f"completions/step-{step:08d}.json")

    def finish(self):
        self.mlflow.end_run()


class Trackio(TableRun):
    def __init__(self, context, start_step):
        remote = [name for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL") if os.environ.get(name)]
        if remote:
            raise RecipeError(f"run.report_to: trackio logs locally only, but {remote[0]} is set; unset it, and "
                              f"publish the project afterwards with `trackio sync`")
        import trackio

        self.library = trackio
        project = os.environ.get("TRACKIO_PROJECT", "zenalign")
        name = f"{run_name(context)}-{context.run_id[:8]}" if context.run_id else run_name(context)
        try:
            with quiet():  # trackio prints its progress; the log says where the run went
                self.run = trackio.init(project=project, name=name, config=context.recipe, resume="allow",
                                        embed=False, auto_log_cpu=False, auto_log_gpu=False)
        except Exception as exc:
            raise RecipeError(f"run.report_to: trackio could not start a run ({type(exc).__name__}: "
                              f"{one_line(exc)[:200]})") from exc
        log.info("trackio: run '%s' of project '%s' in %s (view it with `trackio show --project %s`)", name, project,
                 os.environ.get("TRACKIO_DIR", "~/.cache/huggingface/trackio"), project)

    def finish(self):
        with quiet():  # waits for trackio's writer thread to store what is queued; clears trackio's current run
            self.library.finish()


@contextmanager
def quiet():
    """trackio's own lines go to the debug log, not to stdout."""
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            log.debug("trackio: %s", line)


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def recorded(path) -> dict[str, str]:
    """``RUN/trackers.json``: the tracker runs this run directory logs to ({} when there is none)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


@hookimpl
def zenalign_on_train_start(context, start_step):
    finish_all()  # a run in this process that stopped early left its trackers open
    if context.is_main:
        for name in context.recipe.get("run", {}).get("report_to", []):
            _active.append(TRACKERS[name](context, start_step))


@hookimpl
def zenalign_on_step_end(context, step, metrics, samples):
    for tracker in _active:
        with reported(tracker, step):
            tracker.log(scalars(metrics), step)
            if samples:
                tracker.completions(samples, step)


@hookimpl
def zenalign_on_eval_end(context, step, metrics):
    for tracker in _active:
        with reported(tracker, step):
            tracker.log(scalars(metrics), step)


@contextmanager
def reported(tracker: Tracker, step: int):
    """A tracker that fails stops the run with one line naming it (metrics.jsonl has the step)."""
    try:
        yield
    except Exception as exc:
        name = next(k for k, v in TRACKERS.items() if isinstance(tracker, v))
        raise PluginError(f"run.report_to: {name} failed to log step {step}: {type(exc).__name__}: "
                          f"{one_line(exc)[:300]}") from exc


@hookimpl
def zenalign_on_train_end(context, step):
    finish_all()


def finish_all() -> None:
    while _active:
        _active.pop().finish()
