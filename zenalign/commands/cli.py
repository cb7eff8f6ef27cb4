"""The ``zenalign`` command.

    zenalign run RECIPE [key.path=value ...] [--resume auto|PATH]   train (or continue)
    zenalign validate RECIPE [key.path=value ...] [--check-server]
                                                    check the recipe and every plugin's options (and the vLLM server)
    zenalign plugins [RECIPE]                       list every plugin type and its options
    zenalign schema [--format json|markdown|trl]    the recipe's JSON Schema (editor completion), its docs
    zenalign export CHECKPOINT OUT [--merge]        a checkpoint's policy as a plain HF directory
    zenalign sweep RECIPE [key.path=value ...]      one run per point of the recipe's sweep section
    zenalign train-rm RECIPE [key.path=value ...]   a Bradley-Terry reward model from preference pairs
    zenalign critique-revise RECIPE                 Constitutional AI's critique-and-revise data
    zenalign plot RUN_DIR... [--out DIR]            reward curves, Pareto front and its hypervolume

Several processes: start the same command under ``torchrun --nproc_per_node N -m zenalign run ...``
or ``deepspeed --num_gpus N --module zenalign run ...``.

Mistakes in the input are reported as one line on stderr with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from zenalign.errors import ZenalignError
from zenalign.train.preemption import StopSignals, Stopped

log = logging.getLogger("zenalign")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zenalign", description="GRPO training from declarative recipes.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback (anywhere on the line)")
    # The deepspeed launcher passes --local_rank=N; the rank is also in the environment (LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train with a recipe")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe fields")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    run.add_argument("--resume", metavar="auto|PATH",
                     help="continue from a checkpoint: auto = the newest in run.output_dir (or start fresh if none), "
                     "or a checkpoint / run directory")
    run.set_defaults(handler=cmd_run)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*", metavar="key.path=value")
    validate.add_argument("--check-server", action="store_true", help="also ask sampling.vllm.server_url's vLLM server")
    validate.set_defaults(handler=cmd_validate)

    plugins = sub.add_parser("plugins", help="list installed reward sources, normalizers and tasks")
    plugins.add_argument("recipe", nargs="?", help="also load the plugins this recipe names")
    plugins.set_defaults(handler=cmd_plugins)

    schema = sub.add_parser("schema", help="print the recipe schema")
    schema.add_argument("--format", choices=("json", "markdown", "trl"), default="json")  # trl: docs/from-trl.md's table
    schema.set_defaults(handler=cmd_schema)

    sweep = sub.add_parser("sweep", help="run a recipe once per point of its sweep section")
    sweep.add_argument("recipe")
    sweep.add_argument("overrides", nargs="*", metavar="key.path=value")
    sweep.set_defaults(handler=cmd_sweep)

    plot = sub.add_parser("plot", help="reward curves and the Pareto front of runs, as PNG files")
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("--out", default="plots", help="directory for the PNG files (default: plots)")
    plot.add_argument("--reference", type=float, default=0.0,
                      help="reference value of every objective for the hypervolume (default 0)")
    plot.set_defaults(handler=cmd_plot)

    for name, handler, what in (("train-rm", cmd_train_rm, "train a Bradley-Terry reward model from preference pairs"),
                                ("critique-revise", cmd_critique_revise,
                                 "Constitutional AI's supervised phase: critique and revise responses")):
        command = sub.add_parser(name, help=what)
        command.add_argument("recipe")
        command.add_argument("overrides", nargs="*", metavar="key.path=value")
        command.set_defaults(handler=handler)

    export = sub.add_parser("export", help="write a checkpoint's policy as a plain Hugging Face directory")
    export.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoints/step-...) or a run directory")
    export.add_argument("out", help="new directory to write")
    export.add_argument("--merge", action="store_true",
                        help="LoRA checkpoints: merge the adapters into the base model (otherwise the adapter is written)")
    export.add_argument("--base", metavar="DIR",
                        help="with --merge: the base model directory (default: the one the adapter records)")
    export.set_defaults(handler=cmd_export)
    return parser


def quiet_libraries() -> None:
    """Keep transformers' own progress bars and notices out of the run's output."""
    from zenalign.train.distributed import prepare_deepspeed_env

    prepare_deepspeed_env()  # transformers may import DeepSpeed; tell it there is no GPU up front
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def cmd_run(args) -> int:
    """The run prints its own progress and summary (zenalign.train.console), as the Python API's does."""
    import atexit

    import torch.distributed as dist

    from zenalign.recipe.loader import load_recipe
    from zenalign.train.distributed import leave_process_group
    from zenalign.train.trainer import GRPOTrainer

    loaded = load_recipe(args.recipe, args.overrides)
    if args.quiet:
        loaded.recipe.run.log_level = "warning"
    if loaded.recipe.run.log_level in ("debug", "info") and os.environ.get("RANK", "0") == "0":
        log.info("recipe %s -> %s", loaded.source, loaded.output_dir)
    given = dist.is_available() and dist.is_initialized()
    ended_well = False
    try:
        GRPOTrainer.from_recipe(loaded).train(resume=args.resume)
        ended_well = True
    except Stopped:  # every process agreed to stop, its checkpoint written: as clean an end
        ended_well = True
        raise
    finally:
        if ended_well and not given:  # the group this run joined (not a caller's), destroyed as the process exits
            atexit.register(leave_process_group)
    return 0


def cmd_validate(args) -> int:
    from zenalign.models.loading import check_model_dir
    from zenalign.recipe.loader import load_recipe
    from zenalign.train.trainer import GRPOTrainer

    loaded = load_recipe(args.recipe, args.overrides)
    r = loaded.recipe
    if r.model.path is None:
        raise ZenalignError(f"{loaded.source}: model.path: required field is missing; give a local Hugging Face model directory")
    check_model_dir(loaded.base_dir / r.model.path, "model.path")
    if r.model.reference_path and r.grpo.kl_coef > 0:
        check_model_dir(loaded.base_dir / r.model.reference_path, "model.reference_path")
    trainer = GRPOTrainer.from_recipe(loaded)
    trainer.check()  # builds data, rewards and normalizer; loads no policy
    rewards = ", ".join(f"{bound.name} [{bound.type_name}]" for bound in trainer.scorer.rewards)
    server = None
    if getattr(args, "check_server", False):  # a Namespace built without the flag (a test harness)
        from zenalign.generation.vllm_server import check_server

        server = check_server(r.sampling, loaded.base_dir / r.model.path)
    print(f"{loaded.source}: valid (data: {r.data.type}; rewards: {rewards}; normalizer: {r.normalizer.type}; output: {loaded.output_dir})")
    if server:
        print(server)
    return 0


def cmd_plugins(args) -> int:
    from pathlib import Path

    from zenalign.plugins import KINDS
    from zenalign.plugins import collect_registry
    from zenalign.recipe.loader import read_yaml
    from zenalign.recipe.docs import default_text, type_name

    if args.recipe:
        from zenalign.plugins import load_plugins

        path = Path(args.recipe)
        load_plugins(read_yaml(path).get("plugins") or [], path.resolve().parent)
    registry = collect_registry()
    for kind, (_, _, noun) in KINDS.items():
        print(f"{noun} types:")
        default = registry.default(kind)
        for name in registry.names(kind):
            ptype = registry.types[kind][name]
            mark = " (default)" if name == default else ""
            print(f"  {name}{mark} - {ptype.summary()}  [from {registry.providers[(kind, name)]}]")
            for field_name, field in ptype.options.model_fields.items():
                print(f"      {field_name}: {type_name(field.annotation)} = {default_text(field).strip('`')}  {field.description or ''}")
        print()
    return 0


def cmd_schema(args) -> int:
    from zenalign.plugins import collect_registry
    from zenalign.recipe.schema import build_recipe_model
    from zenalign.recipe.docs import recipe_reference

    if args.format == "trl":
        from zenalign.recipe.docs import trl_table

        sys.stdout.write(trl_table())
        return 0
    registry = collect_registry()
    if args.format == "markdown":
        sys.stdout.write(recipe_reference(registry))
    else:
        print(json.dumps(build_recipe_model(registry).model_json_schema(), indent=2))
    return 0


def configure_logging() -> None:
    """zenalign's messages go to stderr, once (a run keeps them clear of its progress bar)."""
    from zenalign.train.console import console_handler

    console_handler()
    log.setLevel(logging.INFO)
    log.propagate = False


def cmd_sweep(args) -> int:
    from pathlib import Path

    from zenalign.commands.sweep import run_sweep

    results = run_sweep(Path(args.recipe), args.overrides)  # each run keeps its lines clear of its progress bar
    for point, out, final in results:
        scores = "  ".join(f"{k.removeprefix('eval/reward_mean/')} {v:.3f}" for k, v in final.items()
                           if k.startswith("eval/reward_mean/") and isinstance(v, float))
        print(f"{point.name}: {scores}  ({out})")
    return 0


def cmd_plot(args) -> int:
    from pathlib import Path

    from zenalign.commands.plot import plot_runs

    report = plot_runs([Path(r) for r in args.runs], Path(args.out), args.reference)
    print(f"wrote {report['curves']} and {report['front_plot']}")
    print(f"Pareto front ({', '.join(report['objectives'])}): {', '.join(report['front'])}")
    print(f"hypervolume: {report['hypervolume']:.4f} (reference {args.reference:g} in every objective)")
    return 0


def cmd_train_rm(args) -> int:
    from pathlib import Path

    from zenalign.commands.train_rm import train_rm

    report = train_rm(Path(args.recipe), args.overrides)
    print(f"held-out pairwise accuracy: {report['eval_accuracy_before']:.3f} -> {report['eval_accuracy']:.3f} "
          f"({report['eval_pairs']} pairs; trained on {report['train_pairs']})")
    print(f"reward model: {report['output_dir']} (load it with a learned_rm reward source)")
    return 0


def cmd_critique_revise(args) -> int:
    from pathlib import Path

    from zenalign.commands.critique_revise import critique_revise

    report = critique_revise(Path(args.recipe), args.overrides)
    out = report["output_dir"]
    print(f"{report['prompts']} prompts critiqued and revised: {out}/sft.jsonl; "
          f"{report['preference_pairs']} preference pairs (revised over original): {out}/preferences.jsonl")
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from zenalign.commands.export import export_checkpoint

    out, kind = export_checkpoint(Path(args.checkpoint), Path(args.out), merge=args.merge,
                                  base=Path(args.base) if args.base else None)
    print(f"exported {out} ({kind})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the command too: `zenalign run R --debug`
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    # key=value overrides may come after options (`run RECIPE -q seed=3`); argparse stops at the option.
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging()
    quiet_libraries()
    try:
        if args.command == "run":  # a preemption signal while the run loads stops it before its first step
            with StopSignals():
                return args.handler(args)
        return args.handler(args)
    except Stopped as exc:  # a preemption signal: checkpointed, resumable (zenalign.train.preemption)
        if os.environ.get("RANK", "0") == "0":
            print(f"zenalign: {exc}", file=sys.stderr)
        return exc.exit_code
    except ZenalignError as exc:
        if debug:
            raise
        print(f"zenalign: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zenalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
