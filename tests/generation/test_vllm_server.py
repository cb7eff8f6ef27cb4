"""Sampling on vLLM's own server (``sampling.vllm.mode: server``), with vLLM installed
(``pytest -m vllm tests/generation/test_vllm_server.py`` in its environment; elsewhere these skip).

One server, started once for the module on the quickstart's policy, serves nearly all of them: a
sync in whole-layer buckets through /dev/shm equals a one-shot inline sync and the trainer's
forward; the server draws what the colocated engine draws from the same seeds; a sync of the wrong
shape is refused before anything reaches the server; a run on another model is refused before step
1; the quickstart learns on it with lag 0, step for step as colocated (conftest's vllm_quickstart);
two torchrun ranks share it; LoRA runs reach vLLM, colocated or served, as merged weights; lag 1
learns. A second server dies under a lag-1 run, which then resumes, is SIGKILLed, and resumes
again on a server it starts itself, ending as the uninterrupted run. The errors that need no vLLM
are in test_vllm_server_checks.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import EOS, RECIPES, REVERSE_POLICY, cli_in_process, error_line, free_port, metrics, read, run_cli
from helpers import same_draws, start_vllm_server, wait_healthy
from zenalign.errors import ModelLoadError
from zenalign.generation.vllm_engine import vllm_installed
from zenalign.generation.vllm_server import VLLMServer, stop_process
from zenalign.generation.vllm_worker import EXTENSION
from zenalign.recipe.schema import SamplingSection, VLLMSection

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_installed(), reason="vllm not installed")]

QUICKSTART = str(RECIPES / "quickstart.yaml")
# Byte ids of "reverse kite:", "reverse hello:" and "abc:" (the byte tokenizer adds 3 to each byte).
PROBES = [[b + 3 for b in text.encode()] for text in ("reverse kite:", "reverse hello:", "abc:")]
GREEDY = SamplingSection(max_new_tokens=8)


def policy(noise_seed: int | None = None) -> torch.nn.Module:
    """The quickstart's policy in float32, every weight moved by N(0, 0.05) noise when a seed is given
    (its tied LM head too: it is the embedding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REVERSE_POLICY, dtype=torch.float32)
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for weight in model.parameters():
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.05)
    return model


def client(url: str, **options) -> VLLMServer:
    return VLLMServer(url, REVERSE_POLICY, VLLMSection(mode="server", server_url=url, **options), 64)


def greedy(server: VLLMServer) -> list[tuple[list[int], list[float]]]:
    return [group[0] for group in server.generate(PROBES, 1, None, GREEDY, [EOS])]


def forward_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> tuple[list[int], torch.Tensor]:
    """The trainer's forward on prompt + completion: its greedy choice and log-prob of each completion token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1: -1]   # (Tc, V)
    logps = torch.log_softmax(logits, dim=-1)
    return logps.argmax(-1).tolist(), logps.gather(1, torch.tensor(completion)[:, None])[:, 0]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """vLLM's server on the quickstart's policy with zenalign's extension, for the module's other tests
    (each leaves it holding the policy's own weights)."""
    from helpers import REPO

    workdir = tmp_path_factory.mktemp("vllm-server")
    port = int(free_port())
    started = time.monotonic()
    server = start_vllm_server(REVERSE_POLICY, "policy", port, workdir, "--max-model-len", "64", "--logprobs-mode",
                               "processed_logprobs", "--worker-extension-cls", EXTENSION, VLLM_SERVER_DEV_MODE="1",
                               PYTHONPATH=str(REPO))
    try:
        wait_healthy(server, port, workdir / "server.log")
        print(f"vLLM's server with zenalign's extension answered /health after {time.monotonic() - started:.0f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(server)


def test_a_bucketed_sync_equals_a_one_shot_inline_sync_and_the_trainers_forward(server_url):
    original, moved = policy(), policy(noise_seed=0)
    bucketed, one_shot = client(server_url, sync_bucket_mb=0.5), client(server_url)
    one_shot.sync_dir = None  # the weights inside the request, as for a server on another machine
    assert bucketed.sync_dir is not None and str(bucketed.sync_dir) == "/dev/shm"
    try:
        before = greedy(bucketed)
        bucketed.load_weights(moved.state_dict())
        # embedding 0.19 MB | layers 0-3, 0.94 MB each (over 0.5: alone) | final norm + LM head 0.19 MB
        assert len(bucketed.bucket_seconds) == 6
        after_buckets = greedy(bucketed)
        one_shot.load_weights(original.state_dict())
        assert greedy(one_shot) == before  # back to the policy's own weights
        one_shot.load_weights(moved.state_dict())
        assert len(one_shot.bucket_seconds) == 1
        after_inline = greedy(one_shot)
        assert [ids for ids, _ in after_inline] == [ids for ids, _ in after_buckets] != [ids for ids, _ in before]
        worst = 0.0
        for prompt, (ids, logps), (_, inline) in zip(PROBES, after_buckets, after_inline):
            assert max(abs(a - b) for a, b in zip(logps, inline)) <= 1e-6
            choices, trained = forward_logprobs(moved, prompt, ids)
            assert choices == ids  # the server's greedy tokens are the moved policy's (its new LM head too)
            worst = max(worst, float((trained - torch.tensor(logps)).abs().max()))
        print(f"after a sync: max |log pi_server - log pi_trainer| = {worst:.1e}; buckets of "
              f"{[round(s * 1000) for s in bucketed.bucket_seconds]} ms")
        assert worst < 1e-5
    finally:
        one_shot.load_weights(original.state_dict())
        bucketed.close()
        one_shot.close()


def test_the_server_draws_what_the_colocated_engine_draws(server_url):
    """The same seeds (one per group, n = the group size), the same sampler settings: the same tokens
    and log-probs from vLLM's server as from the in-process engine."""
    from zenalign.generation.vllm_engine import VLLMEngine, group_seed
    from zenalign.generation.gumbel import completion_keys

    sampling = SamplingSection(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95)
    keys = completion_keys(seed=3, step=1, first_completion=0, count=len(PROBES) * 4)
    seeds = [group_seed(keys[p * 4]) for p in range(len(PROBES))]
    engine = VLLMEngine(REVERSE_POLICY, VLLMSection(), "fp32", 64, seed=0, device_type="cpu")
    server = client(server_url)
    try:
        colocated = engine.generate(PROBES, 4, seeds, sampling, [EOS])
        served = server.generate(PROBES, 4, seeds, sampling, [EOS])
    finally:
        engine.close()
        server.close()
    assert [[ids for ids, _ in group] for group in served] == [[ids for ids, _ in group] for group in colocated]
    assert len({tuple(ids) for group in served for ids, _ in group}) > len(PROBES)  # the groups are not all greedy
    for group, other in zip(served, colocated):
        for (_, logps), (_, others) in zip(group, other):
            assert logps == pytest.approx(others, abs=1e-6)


def test_a_sync_of_the_wrong_shape_is_refused_before_anything_is_sent(server_url):
    server = client(server_url)
    try:
        before = greedy(server)
        weights = dict(policy(noise_seed=1).state_dict())  # well-shaped, moved weights ...
        weights["model.layers.2.mlp.up_proj.weight"] = torch.zeros(512, 64)  # ... but one of 512 x 128
        with pytest.raises(ModelLoadError) as refused:
            server.load_weights(weights)
        assert str(refused.value) == (
            f"sampling.decoder vllm: the policy's weights do not match the model the vLLM server at {server_url} "
            f"serves: not there [], not in the policy [], other shapes ['model.layers.2.mlp.up_proj.weight (512, 64) "
            f"vs (512, 128)']")
        assert greedy(server) == before  # none of the moved tensors reached it
    finally:
        server.close()


def test_a_run_on_another_model_than_the_server_serves_is_refused_before_step_1(server_url, tmp_path):
    """``validate --check-server`` accepts the server for the quickstart; a run of
    recipes/models/hhh-policy, which has the quickstart policy's shapes but not its weights, is refused."""
    done = cli_in_process("validate", QUICKSTART, "sampling.backend=vllm", "sampling.vllm.mode=server",
                   f"sampling.vllm.server_url={server_url}", "--check-server")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        f"--check-server: the vLLM server at {server_url} serves model.path with zenalign's extension (vocabulary 384, "
        f"sequences up to 64 tokens, weights sent through /dev/shm)")
    out = tmp_path / "run"
    done = cli_in_process("run", QUICKSTART, "model.path=models/hhh-policy", "sampling.backend=vllm", "sampling.vllm.mode=server",
                   f"sampling.vllm.server_url={server_url}", f"run.output_dir={out}", "run.progress_bar=false",
                   "engine.num_threads=1")
    assert error_line(done, during_run=True) == (
        f"zenalign: error: sampling.vllm.server_url: the vLLM server at {server_url} serves '{REVERSE_POLICY}', whose "
        f"weights are not those of model.path '{RECIPES / 'models' / 'hhh-policy'}' (same shapes); start it on "
        f"model.path")
    assert not (out / "metrics.jsonl").exists()


def test_two_processes_share_one_server_and_sample_what_one_process_samples(server_url, vllm_quickstart, tmp_path):
    """torchrun with 2 ranks on the module's server: each rank sends its own share of the groups, rank
    0 pushes the weights between barriers; the rewards and completion lengths equal one process's
    (vllm_quickstart's first 2 steps: one process on a server samples what the colocated engine
    samples, test_lag_0_...) step for step, and the server's log-probs stay the trainer's after every
    sync."""
    import sys

    from helpers import VLLM_QUICKSTART, launch

    two = tmp_path / "two"
    try:
        done = launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      free_port(), "-m", "zenalign", "run", *VLLM_QUICKSTART, "sampling.vllm.mode=server",
                      f"sampling.vllm.server_url={server_url}", "run.steps=2", "-q", f"run.output_dir={two}")
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        restore_policy(server_url)
    steps = metrics(two)
    assert len(steps) == 2 and all(m["vllm/sync_s"] > 0 for m in steps)
    same_draws([steps], metrics(vllm_quickstart))


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_lora_runs_send_vllm_the_merged_weights(mode, request, tmp_path):
    """model.lora, colocated or on the module's server: vLLM samples from W + the adapters' delta, so its
    log-probs stay the trainer's (without the merge they would be the base model's, which the KL shows
    to differ)."""
    where = [f"sampling.vllm.server_url={request.getfixturevalue('server_url')}"] if mode == "server" else []
    out = tmp_path / "run"
    try:
        done = run_cli("run", QUICKSTART, "model.lora={r: 8, target_modules: all-linear}", "grpo.learning_rate=2.0e-2",
                       "sampling.backend=vllm", f"sampling.vllm.mode={mode}", *where, "run.steps=3", "run.eval_interval=0",
                       f"run.output_dir={out}", "run.progress_bar=false", "engine.num_threads=1", timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        if mode == "server":
            server = client(request.getfixturevalue("server_url"))
            server.load_weights(policy().state_dict())
            server.close()
    steps = metrics(out)
    print(f"LoRA, vLLM {mode}: logp_diff {[m['vllm/logp_diff'] for m in steps]}, kl {[m['kl'] for m in steps]}")
    assert all(m["vllm/sync_s"] > 0 for m in steps[1:])
    assert all(m["vllm/logp_diff"] < 1e-4 for m in steps)
    assert steps[-1]["kl"] > 0.1  # the adapters moved the policy away from the base vLLM started with


# ------------------------------------------------------------------------------ pipelined (sampling.lag)

LAGGED = [QUICKSTART, "sampling.backend=vllm", "sampling.vllm.mode=server", "sampling.lag=1", "run.steps=16",
          "run.checkpoint_interval=2", "run.eval_interval=0", "run.log_interval=1", "run.progress_bar=false",
          "engine.num_threads=1"]


def untimed(steps: list[dict]) -> list[dict]:
    """Metrics without the wall-clock ones (the sync's time among them)."""
    from helpers import without_timing

    return [{k: v for k, v in m.items() if k != "vllm/sync_s"} for m in without_timing(steps)]


def restore_policy(url: str) -> None:
    server = client(url)
    server.load_weights(policy().state_dict())
    server.close()


@pytest.fixture(scope="module")
def lagged_run(server_url, tmp_path_factory):
    """16 quickstart steps with lag 1 on the module's server: step n + 1's batch is generated on the
    server, from the policy after step n - 1, while step n's update runs."""
    out = tmp_path_factory.mktemp("lagged") / "run"
    try:
        done = run_cli("run", *LAGGED, f"sampling.vllm.server_url={server_url}", f"run.output_dir={out}", timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        restore_policy(server_url)
    return out


def test_lag_0_on_a_server_learns_the_quickstart_step_for_step_as_the_colocated_engine(server_url, vllm_quickstart,
                                                                                   tmp_path):
    """20 quickstart steps on the module's server with lag 0: what test_a_short_quickstart_run_with_vllm_learns
    asserts of the colocated engine (the held-out accuracy), and its very steps: the same draws, so the
    same rewards and lengths, and the same update to rounding."""
    from helpers import VLLM_QUICKSTART

    out = tmp_path / "served"
    try:
        done = run_cli("run", *VLLM_QUICKSTART, "sampling.vllm.mode=server", "sampling.lag=0",
                       f"sampling.vllm.server_url={server_url}", f"run.output_dir={out}", timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        restore_policy(server_url)
    evals, steps = read(out / "eval.jsonl"), metrics(out)
    first, last = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
    print(f"quickstart on vLLM's server: held-out greedy accuracy {first:.3f} -> {last:.3f} in 20 steps; syncs "
          f"{[round(m['vllm/sync_s'], 3) for m in steps[1:4]]} s ...")
    assert first < 0.1 and last - first > 0.25
    assert all(m["vllm/sync_s"] > 0 for m in steps)  # a sync before every generation: a server may hold old weights
    assert len(steps) == 20 and all("policy_lag" not in m for m in steps)
    same_draws([steps], metrics(vllm_quickstart))
    colocated = [e["eval/reward_mean"] for e in read(vllm_quickstart / "eval.jsonl")]
    assert [e["eval/reward_mean"] for e in evals] == pytest.approx(colocated, abs=0.011)  # 2 of 200 words: rounding


def test_lag_1_on_a_server_learns_from_samples_one_update_stale(lagged_run):
    steps, evals = metrics(lagged_run), read(lagged_run / "eval.jsonl")
    first, last = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
    print(f"lag 1 on vLLM's server: held-out greedy accuracy {first:.3f} -> {last:.3f} in 16 steps; logp_diff "
          f"{[round(m['vllm/logp_diff'], 3) for m in steps[:4]]} ...; sync {[m['vllm/sync_s'] for m in steps[:4]]} s")
    assert [m["policy_lag"] for m in steps] == [0.0] + [1.0] * 15
    assert steps[0]["vllm/logp_diff"] < 1e-5  # step 1 samples with the policy it updates
    assert all(m["vllm/logp_diff"] > 1e-3 for m in steps[1:])  # later steps train on stale samples, corrected
    # a push during every step but the last, which starts no next batch
    assert [m["vllm/sync_s"] > 0 for m in steps] == [True] * 15 + [False]
    assert first < 0.1 and last - first > 0.15  # 0.020 -> 0.325 here


def api_server_of(run: subprocess.Popen) -> int:
    """The pid of the vLLM API server ``run`` started (its child), once it is there."""
    while True:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv, parent = cmdline.read_bytes().split(b"\0"), (cmdline.parent / "stat").read_text()
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in argv and int(parent.rsplit(")", 1)[1].split()[1]) == run.pid:
                return int(cmdline.parent.name)
        assert run.poll() is None, "the run ended before it started a server"
        time.sleep(0.2)


def test_a_server_death_then_a_sigkill_each_resumed_end_as_the_uninterrupted_run(server_url, lagged_run, tmp_path):
    """The lagged run, interrupted twice:
    1. it starts its own server (``server_url`` null), whose API server process dies (SIGKILL) after
       step 3: the run stops with one line, a checkpoint of its last whole step and nothing
       half-written, and it leaves none of that server's processes (vLLM's engine core and worker
       outlive its API server) behind;
    2. ``--resume auto`` on a live server (the module's) is SIGKILLed two steps later, its next batch
       generating (with lag 1 a checkpoint holds the version that batch samples from, and the resumed
       run regenerates it from its keys);
    3. ``--resume auto`` on that server again ends as the uninterrupted run."""
    from helpers import REPO, kill_after, start
    from zenalign.generation.vllm_server import group_members

    out, clock = tmp_path / "run", [time.monotonic()]
    run = subprocess.Popen([sys.executable, "-m", "zenalign", "run", *LAGGED, f"run.output_dir={out}"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server = api_server_of(run)
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before its server could die"
            time.sleep(0.05)
        clock.append(time.monotonic())
        assert len(group_members(server)) >= 2  # the API server and its engine core (and worker), a group of their own
        os.kill(server, signal.SIGKILL)
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:  # a failed assertion: SIGTERM, and the run stops its server
            run.terminate()
            run.communicate(timeout=120)
    clock.append(time.monotonic())
    line = error_line(subprocess.CompletedProcess(run.args, run.returncode, "", stderr), during_run=True)
    url = re.search(r"vLLM server on (http://127\.0\.0\.1:\d+) answered after \d+ s", stderr)[1]
    stopped = int(re.search(r"the run stopped after step (\d+) with a checkpoint", line)[1])
    assert url in line and "--resume auto" in line
    assert len(metrics(out)) == stopped and (out / "checkpoints" / f"step-{stopped:08d}").is_dir()
    assert group_members(server) == []  # the run stopped what was left of its server

    try:
        killed = kill_after(start(*LAGGED, f"sampling.vllm.server_url={server_url}", f"run.output_dir={out}",
                                  "--resume", "auto"), out / "metrics.jsonl", steps=stopped + 2, timeout=300)
        clock.append(time.monotonic())
        assert stopped + 2 <= killed < 16
        done = run_cli("run", *LAGGED, f"sampling.vllm.server_url={server_url}", f"run.output_dir={out}", "--resume",
                       "auto", timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        restore_policy(server_url)
    clock.append(time.monotonic())
    print("a server death then a SIGKILL: " + ", ".join(
        f"{what} {b - a:.0f} s" for what, a, b in zip(["server up and 3 steps", "the run stops", "resumed and killed",
                                                       "resumed to the end"], clock, clock[1:])))
    assert untimed(metrics(out)) == untimed(metrics(lagged_run))
