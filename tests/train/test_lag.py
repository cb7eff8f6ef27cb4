"""Pipelined training with a fixed lag (``sampling.lag``, issue 33): which policy samples which step,
the background sampler, the off-policy correction's inputs, and exact resumption.

The on-policy case (lag 0) is today's behaviour to the bit: tests/test_quickstart_metrics.py
compares the quickstart's metrics.jsonl with its committed fixture, with lag 0 the default.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import RECIPES, REPO, kill_after, read, run_cli, start, without_timing
from zenalign.generation.rollout import generate_groups
from zenalign.models.logprobs import completion_logprobs
from zenalign.models.lora import forward_module
from zenalign.recipe.loader import load_recipe
from zenalign.train import checkpoint as ckpt
from zenalign.train.lag import PolicyVersions, sampling_version
from zenalign.train.trainer import GRPOTrainer

QUICKSTART = str(RECIPES / "quickstart.yaml")
SHORT = ["run.eval_interval=0", "run.progress_bar=false", "engine.num_threads=1", "data.eval_size=16"]


def test_step_n_samples_with_the_policy_after_step_n_minus_1_minus_lag():
    assert [sampling_version(n, 0) for n in range(1, 6)] == [0, 1, 2, 3, 4]  # on-policy
    assert [sampling_version(n, 1) for n in range(1, 6)] == [0, 0, 1, 2, 3]
    assert [sampling_version(n, 3) for n in range(1, 7)] == [0, 0, 0, 0, 1, 2]


def test_policy_versions_keep_only_what_a_later_step_samples_with(tmp_path):
    live = {"w": torch.zeros(2)}
    versions = PolicyVersions(2, lambda: {k: v.clone() for k, v in live.items()})
    for step in range(1, 6):  # during step n, before its update, the live policy is version n - 1
        live["w"].fill_(step - 1)
        versions.snapshot(step)
        if step < 5:
            versions.prune(step)
    # step 5's collection failed before it was done (a server lost): a checkpoint after step 4 needs 2 and 3
    assert sorted(versions.kept) == [2, 3, 4]
    versions.save(tmp_path / "rewound", step=4)
    assert sorted(p.name for p in (tmp_path / "rewound").iterdir()) == ["v00000002.safetensors", "v00000003.safetensors"]
    versions.prune(5)  # it was done: steps 6 and 7 sample with versions 3 and 4; 0-2 are gone
    assert sorted(versions.kept) == [3, 4]
    assert versions.of(3, live=5)["w"].tolist() == [3.0, 3.0] and versions.of(5, live=5) is None
    with pytest.raises(RuntimeError, match="version 2 is needed but not kept"):
        versions.of(2, live=5)
    versions.save(tmp_path / "lagged", step=5)  # a checkpoint after step 5: steps 6, 7 need versions 3, 4
    assert sorted(p.name for p in (tmp_path / "lagged").iterdir()) == ["v00000003.safetensors", "v00000004.safetensors"]
    again = PolicyVersions(2, dict)
    again.load(tmp_path / "lagged", 5, load_file)
    assert again.kept[4]["w"].tolist() == [4.0, 4.0]
    with pytest.raises(Exception, match="holds no weights for policy version 2, which sampling.lag 3"):
        PolicyVersions(3, dict).load(tmp_path / "lagged", 5, load_file)


def test_a_saved_version_keeps_a_tied_head_tied(tmp_path):
    """vLLM is sent a tied LM head by name (it keeps its own copy), so a version kept for it holds the
    head as the embedding's tensor: saved once, and both names again once loaded."""
    from zenalign.generation.generator import cpu_copy

    embedding = torch.arange(6.0).view(3, 2)
    kept = cpu_copy({"embed.weight": embedding, "lm_head.weight": embedding, "norm.weight": torch.ones(2)})
    assert kept["lm_head.weight"].data_ptr() == kept["embed.weight"].data_ptr() != embedding.data_ptr()
    versions = PolicyVersions(1, lambda: kept)
    versions.snapshot(2)  # version 1
    versions.save(tmp_path / "lagged", step=2)
    assert sorted(load_file(str(tmp_path / "lagged" / "v00000001.safetensors"))) == ["embed.weight", "norm.weight"]
    again = PolicyVersions(1, dict)
    again.load(tmp_path / "lagged", 2, load_file)
    assert sorted(again.kept[1]) == ["embed.weight", "lm_head.weight", "norm.weight"]
    assert torch.equal(again.kept[1]["lm_head.weight"], embedding)


def lagged_trainer(tmp_path: Path, *overrides: str) -> GRPOTrainer:
    loaded = load_recipe(QUICKSTART, ["sampling.lag=1", "run.steps=4", f"run.output_dir={tmp_path / 'run'}", *SHORT,
                                      *overrides])
    trainer = GRPOTrainer.from_recipe(loaded)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_batch_is_what_the_policy_two_steps_back_samples_with_the_steps_keys(tmp_path, lora):
    """lag 1: step 3's batch equals what the policy after step 1 samples with step 3's prompts and
    keys, token for token; its sampler log-probs are that policy's, and the sample carries version 1.
    With LoRA the background copy takes the adapters (the trainable weights) of each version."""
    trainer = lagged_trainer(tmp_path, *(["model.lora.r=4", "grpo.learning_rate=0.02"] if lora else []))
    seen, weights = {}, {}
    collect = trainer.collect.collect

    def recording(step, timer):
        batch = collect(step, timer)
        seen[step] = (batch.prompts, batch.rollout)
        return batch

    trainer.collect.collect = recording
    try:
        policy = forward_module(trainer.model)
        for step in (1, 2, 3):
            weights[step - 1] = copy.deepcopy(policy.state_dict())  # version step - 1
            trainer.state.step = step
            metrics = trainer.train_step()
            assert metrics["policy_lag"] == (0.0 if step == 1 else 1.0)
        prompts, rollout = seen[3]
        assert rollout.policy_version == 1
        old = copy.deepcopy(policy)
        old.load_state_dict(weights[1])
        from zenalign.generation.gumbel import completion_keys

        sampling = trainer.recipe.sampling
        keys = completion_keys(trainer.recipe.run.seed, 3, 0, len(rollout))
        again = generate_groups(old, trainer.tokenizer, prompts, sampling, trainer.eos_ids, sampling.group_size, keys=keys)
        assert torch.equal(again.sequences, rollout.sequences)
        with torch.no_grad():
            logp = completion_logprobs(old, rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                                       sampling.temperature) * rollout.completion_mask
            now = completion_logprobs(policy, rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                                      sampling.temperature) * rollout.completion_mask
        torch.testing.assert_close(rollout.sampler_logp, logp, atol=1e-5, rtol=0)
        assert float((rollout.sampler_logp - now).abs().max()) > 1e-3  # stale: the policy moved since
        assert metrics["sampler/logp_diff"] > 0 and metrics["time/generate_background"] > 0
    finally:
        trainer.cleanup()


def test_a_lag_the_run_cannot_pipeline_is_refused_in_one_line(tmp_path, scripted_agent_dir):
    from zenalign.errors import RecipeError

    from test_agents import GO, echo

    trainer = GRPOTrainer(model=str(scripted_agent_dir), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          tools=[echo], num_generations=2, prompts_per_step=1, max_completion_length=200, steps=1,
                          output_dir=str(tmp_path / "run"), progress_bar=False, lag=1)
    with pytest.raises(RecipeError, match="sampling.lag: multi-turn episodes"):
        trainer.train([{"prompt": GO}])


@pytest.fixture(scope="module")
def lag_run(tmp_path_factory) -> Path:
    """The quickstart with lag 1 and dynamic sampling (refills from the same lagged policy), 8 steps."""
    out = tmp_path_factory.mktemp("lag") / "run"
    done = run_cli("run", QUICKSTART, *LAG_RUN, f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


LAG_RUN = ["sampling.lag=1", "run.steps=8", "run.checkpoint_interval=2", "run.log_interval=1", *SHORT,
           'filters=[{"type": "dynamic_sampling", "max_extra_rounds": 2}]']


def test_a_lagged_run_learns_and_logs_its_lag(lag_run):
    metrics = read(lag_run / "metrics.jsonl")
    assert [m["policy_lag"] for m in metrics] == [0.0] + [1.0] * 7
    assert any(m["filter/rounds"] > 1 for m in metrics)  # refills happened
    assert all(m["sampler/logp_diff"] is not None for m in metrics) and metrics[0]["sampler/logp_diff"] < 1e-5
    state = ckpt.verify(ckpt.list_checkpoints(lag_run)[-1])
    assert state["fingerprint"]["sampling.lag"] == 1
    # the last checkpoint holds version 7, which a continued run's step 9 samples with
    assert (ckpt.list_checkpoints(lag_run)[-1] / "lagged" / "v00000007.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_with_lag_1_equals_the_uninterrupted_run(tmp_path, lag_run):
    """The checkpoint after step 4 holds version 3 (step 5's batch was being generated from it when
    the run was killed); the resumed run draws and samples that batch again, and the rest follows."""
    out = tmp_path / "run"
    kill_after(start(QUICKSTART, *LAG_RUN, f"run.output_dir={out}"), out / "metrics.jsonl", steps=5)
    assert ckpt.list_checkpoints(out)[-1].name == "step-00000004"
    done = run_cli("run", QUICKSTART, *LAG_RUN, f"run.output_dir={out}", "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        assert without_timing(read(out / name)) == without_timing(read(lag_run / name)), name
    final, reference = load_file(str(out / "final" / "model.safetensors")), load_file(str(lag_run / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_generation_server_lost_while_the_next_batch_starts_keeps_what_the_resume_needs(tmp_path, lag_run,
                                                                                       monkeypatch):
    """The server goes away while step 4 starts step 5's batch (its weights push fails): step 4 is
    drawn again after a resume, so the checkpoint written after step 3 must still hold version 2,
    which step 4 samples with. The resumed run loses the server at its final evaluation: the
    checkpoint of step 8 keeps its last steps, and the next resume ends as the uninterrupted run. (In-process, the push
    made to fail: test_vllm_server.py kills a real server.) Reward sources that learn from scored
    batches were not shown step 4's, which the resumed run scores again."""
    from zenalign.errors import GenerationServerError
    from zenalign.grpo.scoring import Scorer
    from zenalign.train.collect import BatchCollector

    hold, observe, observed = BatchCollector.hold, Scorer.observe, []

    def observing(self, batch, rewards, objectives, context):
        observed.append(context.step)
        observe(self, batch, rewards, objectives, context)

    def failing(self, step):
        if step == 5:
            raise GenerationServerError("sampling.vllm.server_url: the vLLM server at http://127.0.0.1:9 stopped answering")
        hold(self, step)

    monkeypatch.setattr(BatchCollector, "hold", failing)
    monkeypatch.setattr(Scorer, "observe", observing)
    loaded = load_recipe(QUICKSTART, [*LAG_RUN, f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(GenerationServerError, match="the run stopped after step 3 with a checkpoint"):
        GRPOTrainer.from_recipe(loaded).train()
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "lagged" / "v00000002.safetensors").is_file()
    assert sorted(set(observed)) == [1, 2, 3]
    monkeypatch.undo()

    evaluate = GRPOTrainer.evaluate  # then the server goes away at the final evaluation: steps 7 and 8 are kept

    def final_fails(self):
        if self.state.step == 8:
            raise GenerationServerError("sampling.vllm.server_url: the vLLM server at http://127.0.0.1:9 stopped answering")
        return evaluate(self)

    monkeypatch.setattr(GRPOTrainer, "evaluate", final_fails)
    with pytest.raises(GenerationServerError, match="the run stopped after step 8 with a checkpoint"):
        GRPOTrainer.from_recipe(loaded).train(resume="auto")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")][-1] == "step-00000008"
    monkeypatch.undo()
    GRPOTrainer.from_recipe(loaded).train(resume="auto")
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert without_timing(read(tmp_path / "run" / name)) == without_timing(read(lag_run / name)), name


def test_resuming_with_another_lag_is_refused(tmp_path, lag_run):
    done = run_cli("run", QUICKSTART, *LAG_RUN, "sampling.lag=2", f"run.output_dir={lag_run}", "run.steps=10",
                   "--resume", "auto")
    assert done.returncode == 2 and "sampling.lag = 1; this run has 2" in done.stderr


@pytest.mark.slow
def test_two_processes_with_lag_1_sample_what_one_process_samples(tmp_path, lag_run):
    """torchrun with 2 ranks: each rank's background sampler generates its share of the groups with
    the same policy version, so rewards and lengths equal the one-process run step for step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                           "-m", "zenalign", "run", QUICKSTART, *LAG_RUN, f"run.output_dir={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read(lag_run / "metrics.jsonl"), read(out / "metrics.jsonl")
    assert len(two) == 8
    for a, b in zip(one, two):
        assert (a["reward_mean"], a["completion_len"], a["policy_lag"], a["filter/rounds"]) == (
            b["reward_mean"], b["completion_len"], b["policy_lag"], b["filter/rounds"])
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-6)  # all-reduced gradients: rounding
