"""Helpers the tests share: tiny real models built in-process, the prompts and rollouts the
sampling and log-prob tests share, CLI runs (a subprocess, or main() in-process), and
assertions on log-probs and sampled draws. Importable from any test module (pyproject.toml puts
tests/ on pytest's path): ``from helpers import build_tiny_causal_lm, PROMPTS``."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
REVERSE_POLICY = RECIPES / "models" / "reverse-policy"
# The quickstart sampled by a colocated vLLM engine (conftest's vllm_quickstart): what the vLLM tests run,
# or compare with, step for step.
VLLM_QUICKSTART = (str(RECIPES / "quickstart.yaml"), "sampling.backend=vllm", "run.steps=20", "run.eval_interval=0",
                   "run.progress_bar=false", "engine.num_threads=1")

# The byte tokenizer's ids (and the tiny models' config): </s> ends a completion, <pad> pads it.
EOS, PAD = 1, 0
# Three prompts of different lengths: byte-tokenized and left-padded, they carry 0, 25 and 33 padding columns.
PROMPTS = ["reverse abc:", "hi", "a much longer prompt than the others:"]

# ---------------------------------------------------------------------------------------------- tiny models

# Qwen2, Qwen3 and Mistral at the tiny size: 4 query heads over 2 key/value heads.
TINY_SIZE = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
# Every architecture build_tiny_causal_lm builds (the ones the lean forward covers).
TINY_ARCHS = ("llama", "llama-biased-rope-scaled", "qwen2", "qwen3", "mistral")


def build_tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides):
    """A real LlamaForCausalLM over the 384-id byte vocabulary, small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=384, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **overrides,
    )
    return LlamaForCausalLM(config)


def build_tiny_causal_lm(arch: str, seed: int = 0, **overrides):
    """A tiny real causal LM over the byte vocabulary, one of TINY_ARCHS, with its weights drawn
    after ``torch.manual_seed(seed)``; ``overrides`` go into its config.

    llama: :func:`build_tiny_llama`. llama-biased-rope-scaled: the same with biases on every
    projection and llama3 rope scaling. qwen2, qwen3, mistral: TINY_SIZE (Mistral without its
    sliding window)."""
    import transformers

    if arch == "llama":
        return build_tiny_llama(seed=seed, **overrides)
    if arch == "llama-biased-rope-scaled":
        return build_tiny_llama(seed=seed, attention_bias=True, mlp_bias=True,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16}, **overrides)
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{name}Config")(**{**TINY_SIZE, **overrides})
    if arch == "mistral":
        config.sliding_window = None
    return getattr(transformers, f"{name}ForCausalLM")(config)


def byte_tokenizer():
    from transformers import ByT5Tokenizer

    from zenalign.models.loading import prepare_tokenizer

    return prepare_tokenizer(ByT5Tokenizer())


# ---------------------------------------------------------------------------------------------- devices

# The devices a device test runs on: the CPU always, CUDA under the gpu marker (skipped without one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# ---------------------------------------------------------------------------------------------- rollouts

def sample_groups(model, group_size: int = 4, max_new_tokens: int = 10, seed: int = 0, step: int = 1,
                  lean_forward: bool = True, **sampling):
    """``group_size`` sampled completions of each of PROMPTS (rows prompt-major), drawn with the
    Gumbel keys of completions 0, 1, ... of (``seed``, ``step``); ``sampling`` sets the other
    SamplingSection fields (temperature, top_k, top_p, decoder)."""
    from zenalign.generation.gumbel import completion_keys
    from zenalign.generation.rollout import generate_groups
    from zenalign.recipe.schema import SamplingSection

    keys = completion_keys(seed=seed, step=step, first_completion=0, count=len(PROMPTS) * group_size)
    return generate_groups(model, byte_tokenizer(), PROMPTS, SamplingSection(max_new_tokens=max_new_tokens, **sampling),
                           [EOS], group_size=group_size, keys=keys, lean_forward=lean_forward)


def end_some_completions_early(rollout, eos: int = EOS):
    """A random model rarely samples EOS: end four of a 12-row rollout's completions early by
    hand (EOS, then padding), so batches hold ragged completions next to truncated ones."""
    tp = rollout.prompt_length
    for row, length in ((1, 3), (4, 1), (6, 6), (11, 2)):
        rollout.sequences[row, tp + length - 1] = eos
        rollout.sequences[row, tp + length:] = PAD
        rollout.completion_mask[row, length:] = 0
        rollout.attention_mask[row, tp + length:] = 0
        rollout.truncated[row] = False
    return rollout


def ragged_rollout(model):
    """4 completions for each of the 3 left-padded PROMPTS, sampled with transformers' forward
    (10 tokens at temperature 1), four of them ending early (EOS) and the others truncated."""
    return end_some_completions_early(sample_groups(model, lean_forward=False))


def logprobs_and_grads(model, rollout, rows, *, share: bool = True, lean: bool = False, temperature: float = 0.7,
                       autocast: bool = False):
    """Completion log-probs of ``rollout[rows]`` (``share``: each group's prompt run once; ``lean``:
    the lean forward; ``autocast``: under bf16 autocast on the rollout's device), masked, and every
    parameter's gradient of a loss that weighs each token differently (so any misplaced log-prob shows)."""
    from zenalign.models.logprobs import completion_logprobs

    model.zero_grad(set_to_none=True)
    with torch.autocast(rollout.sequences.device.type, dtype=torch.bfloat16, enabled=autocast):
        logp = completion_logprobs(model, rollout.sequences[rows], rollout.attention_mask[rows], rollout.prompt_length,
                                   temperature, share_prompts=share, lean=lean)
    mask = rollout.completion_mask[rows]
    weights = torch.linspace(0.5, 2.0, mask.numel()).reshape(mask.shape).to(mask.device) * mask
    (logp * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach() * mask, grads


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `zenalign` command in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "zenalign", *args],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def cli_in_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`zenalign ARGS` by calling the CLI's ``main`` in this process: the exit code, stdout and
    stderr that :func:`run_cli` gives, without starting Python, torch and transformers again. For
    commands that end before a run trains (``validate``, a refused ``run``); zenalign's logger and
    the working directory are restored afterwards. A traceback here is an exception in the test."""
    import contextlib
    import io
    import logging

    from zenalign.commands.cli import main
    from zenalign.plugins import get_plugin_manager

    pm = get_plugin_manager()
    before = set(pm.get_plugins())  # a recipe's plugins: are registered on it; unregistered afterwards
    logger = logging.getLogger("zenalign")
    saved = (list(logger.handlers), logger.level, logger.propagate, os.getcwd())
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
        os.chdir(saved[3])
        for plugin in set(pm.get_plugins()) - before:
            pm.unregister(plugin)
    return subprocess.CompletedProcess(["zenalign", *args], code, out.getvalue(), err.getvalue())


def assert_lean_bf16_as_close_as_transformers(model, rollout, rows) -> None:
    """Under bf16 autocast neither forward equals fp32: the lean pass's largest log-prob error is at
    most twice transformers' bf16 error + 1e-3, and its gradients' largest relative error likewise."""
    exact, exact_grads = logprobs_and_grads(model, rollout, rows, lean=False, share=False)
    plain, plain_grads = logprobs_and_grads(model, rollout, rows, lean=False, share=False, autocast=True)
    lean, lean_grads = logprobs_and_grads(model, rollout, rows, lean=True, autocast=True)
    plain_err, lean_err = float((plain - exact).abs().max()), float((lean - exact).abs().max())
    assert lean_err <= 2 * plain_err + 1e-3, (lean_err, plain_err)

    def grad_err(grads):
        return max(float((grads[n] - g).norm() / g.norm()) for n, g in exact_grads.items())

    assert grad_err(lean_grads) <= 2 * grad_err(plain_grads) + 1e-3, (grad_err(lean_grads), grad_err(plain_grads))


def saved_bytes(fn):
    """The bytes of the tensors (other than parameters) autograd keeps for backward while ``fn``
    runs, and its result."""
    sizes = {}

    def pack(t):  # a tensor saved twice is held once; parameters are there anyway
        if not isinstance(t, torch.nn.Parameter):
            sizes[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes.values()), out


def chi_square_critical(df: int, z: float = 3.29) -> float:
    """The chi-square quantile at the normal quantile z (3.29: one in 2,000), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_draws_follow(draws: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson's chi-square of the draws' counts against ``probs`` (cells expecting under 5 draws
    pooled into one), below the one-in-2,000 critical value."""
    counts = torch.bincount(draws.cpu(), minlength=len(probs)).double()
    probs = probs.cpu()
    expected = probs.double() * len(draws)
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = wanted > 0
    statistic = float(((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum())
    assert statistic < chi_square_critical(int(keep.sum()) - 1), statistic


def captured_gradients(trainer, monkeypatch):
    """Make the engine's optimizer step record the gradients (and not step), so two updates can be
    compared; the list each step appends its ``{name: gradient}`` to."""
    seen = []

    def record():
        seen.append({name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None})
        trainer.model.zero_grad(set_to_none=True)
        return 0.0

    monkeypatch.setattr(trainer.engine, "optimizer_step", record)
    return seen


# ---------------------------------------------------------------------------------------------- runs


def free_port() -> str:
    """A TCP port on localhost that nothing listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start_vllm_server(model: Path, name: str, port: int, workdir: Path, *extra: str, **env: str) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server (this interpreter's vLLM) on 127.0.0.1:port in a process group of
    its own, serving ``model`` as ``name`` in float32 for sequences of 128 tokens unless ``extra``
    arguments say otherwise; its output in workdir/server.log; ``env`` added to the environment."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2", VLLM_CPU_OMP_THREADS_BIND="nobind", **env)
    log = (workdir / "server.log").open("w")
    arguments = ["--max-model-len", "128", *extra]
    return subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--enforce-eager", *arguments], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_healthy(server: subprocess.Popen, port: int, log: Path, deadline_s: float = 300.0) -> None:
    """Returns once the server answers /health; fails the test, with its log, if it exits or never answers."""
    import urllib.request

    until = time.monotonic() + deadline_s
    while time.monotonic() < until:
        if server.poll() is not None:
            pytest.fail(f"the vLLM server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    pytest.fail(f"the vLLM server did not answer /health within {deadline_s:g} s:\n{log.read_text()[-3000:]}")


def launch(*command: str) -> subprocess.CompletedProcess:
    """A launcher command (torchrun, deepspeed) run to its end, one torch thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(list(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> list[dict]:
    """A run directory's metrics.jsonl records."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_draws(runs: list[list[dict]], reference: list[dict]) -> None:
    """vLLM runs of one recipe, each the reference's first steps: the same rewards, lengths and sample
    counts, the KL to rounding, and vLLM's log-probs the trainer's."""
    for run in runs:
        assert len(run) <= len(reference)
        for a, b in zip(reference, run):
            assert (a["reward_mean"], a["completion_len"], a["samples"]) == (b["reward_mean"], b["completion_len"],
                                                                          b["samples"])
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7) and b["vllm/logp_diff"] < 1e-5


def read(path: Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, eval.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock ones, which differ between two runs of the same steps."""
    return [{k: v for k, v in m.items() if not k.startswith("time/") and k != "completions_per_s"} for m in records]


def start(*args: str) -> subprocess.Popen:
    """`zenalign run ARGS` started in the background, its output discarded."""
    return subprocess.Popen([sys.executable, "-m", "zenalign", "run", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after(process: subprocess.Popen, metrics: Path, steps: int, timeout: float = 120) -> int:
    """SIGKILL ``process`` once ``metrics`` holds ``steps`` lines; the lines it then holds."""
    deadline = time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(metrics.read_text().splitlines())


ERROR_PREFIX = "zenalign: error:"  # how the CLI starts its one error line


def base_recipe(model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A valid, very small recipe: one step, 2 prompts x 2 completions of 4 tokens."""
    return {
        "model": {"path": str(model_dir)},
        "data": {"type": "inline", "prompts": ["reverse abc:"], "eval_prompts": []},
        "sampling": {"group_size": 2, "max_new_tokens": 4},
        "grpo": {"prompts_per_step": 2},
        "rewards": [{"type": "length"}],
        "run": {"steps": 1, "progress_bar": False, "output_dir": str(out_dir)},
    }


def error_line(proc, during_run: bool) -> str:
    """Check the shape of a failed command's output and return its error line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    assert proc.returncode == 2, f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, f"expected exactly one error line:\n{proc.stderr}"
    if during_run:
        assert lines[-1].startswith(ERROR_PREFIX), f"the error is not the last line:\n{proc.stderr}"
    else:
        assert lines == errors, f"expected nothing on stderr but the error line:\n{proc.stderr}"
    return lines[-1]


def write_recipe(tmp_path: Path, data: dict[str, Any]) -> Path:
    """``data`` as ``tmp_path/recipe.yaml``."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- agents

CHAT_TEMPLATE = (RECIPES / "models" / "reverse-chat-policy" / "chat_template.jinja").read_text(encoding="utf-8")
GO = [{"role": "user", "content": "go"}]  # the scripted agent's prompt


def echo(text: str) -> str:
    """Say the text back in capitals.

    Args:
        text: what to say back
    """
    return text.upper()


def scripted_turns() -> list[str]:
    """What the scripted agent writes: two tool calls, then an answer."""
    call = '<tool_call>{{"name": "echo", "arguments": {{"text": "{}"}}}}</tool_call>'
    return [call.format("a"), call.format("b"), "done"]


def chat_tokenizer(template: str = CHAT_TEMPLATE):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def train_scripted_agent(path: Path, steps: int = 300, hidden: int = 64) -> Path:
    """A tiny Llama (head size 32, as vLLM's CPU attention takes) that has learnt one episode by
    heart: to GO, with the echo tool, it calls echo("a"), then echo("b"), then answers "done". The
    loss covers the assistant turns only; saved with the byte tokenizer and the tiny chat template."""
    tokenizer = chat_tokenizer()
    messages, labels_at = list(GO), []
    prompt = tokenizer.apply_chat_template(messages, tools=[echo], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for turn, text in enumerate(scripted_turns()):
        turn_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS]
        labels_at += range(len(ids), len(ids) + len(turn_ids))
        ids += turn_ids
        if turn < 2:
            arguments = {"text": "ab"[turn]}
            messages += [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "echo", "arguments": arguments}}]}, {"role": "tool", "name": "echo", "content": echo(**arguments)}]
            full = tokenizer.apply_chat_template(messages, tools=[echo], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    model = build_tiny_llama(seed=0, hidden=hidden, head_dim=32)
    model.config.max_position_embeddings = 512  # rotary positions: a number in the config
    x = torch.tensor([ids])
    labels = torch.full_like(x, -100)
    labels[0, labels_at] = x[0, labels_at]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread, and loses a lot on a busy machine
    try:
        for _ in range(steps):
            loss = model(input_ids=x, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
