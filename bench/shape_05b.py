"""zenalign at a Qwen2-0.5B shape, built in-process (random weights, a word-level tokenizer over
Qwen2's 151,936 ids; nothing downloaded), in bf16: one full GRPO step, the update alone on a fixed
batch, and one log-prob pass (forward and backward) on the lean forward against transformers'
forward with SDPA attention. Each with its seconds, tokens/s and peak memory. Written for the GPU
check (bench/gpu_check.py); ``--toy`` runs the same on a toy Qwen2 (the dry run on a CPU).

    python bench/shape_05b.py --device cuda --out shape.json
    python bench/shape_05b.py --toy --device cpu --out shape.json

Shape (Qwen2-0.5B's): hidden 896, 24 layers, 14 heads over 2 key/value heads, MLP 4,864, tied
embeddings: 494M parameters. A step: 4 prompts x 8 completions of 128 new tokens (a random model
emits no EOS, so every completion is 128 tokens), a dense reward, mu = 1, beta = 0. The fixed
batch: 32 rows of 64 prompt + 448 completion tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=4096)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=4096, max_position_embeddings=512)
# (prompts per step, group size, new tokens; fixed batch rows, prompt, completion tokens)
WORK = {"0.5b": (4, 8, 128, 32, 64, 448), "toy": (2, 4, 8, 8, 8, 24)}


class Meter:
    """Seconds and peak memory of a block: on a GPU ``max_memory_allocated`` above what was
    allocated at its start, each block timed to its end; on a CPU the process's peak RSS."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"

    def __call__(self, fn):
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if self.cuda:
            return out, seconds, {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
                                  "added_gpu_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
        from perf import peak_rss_mb

        return out, seconds, {"peak_rss_mb": peak_rss_mb()}


def build(shape: dict, device: str, seed: int = 0):
    """The model, built on ``device`` (fp32 weights: bf16 is autocast over them), and its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from make_bench_models import word_tokenizer
    from perf import reverse_prompts

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                         use_sliding_window=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    words = [r["prompt"].split()[1].rstrip(":") for r in reverse_prompts(256)]
    return model, word_tokenizer(shape["vocab_size"], words)


def fixed_batch(rows: int, prompt: int, completion: int, vocab: int, device: str):
    """A Rollout of random tokens (one prompt per group of 8 rows) and advantages."""
    import torch

    from zenalign.grpo.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (max(1, rows // 8), prompt), generator=g).repeat_interleave(8, dim=0)[:rows]
    completions = torch.randint(3, vocab, (rows, completion), generator=g)
    sequences = torch.cat([prompts, completions], dim=1).to(device)
    completion_mask = torch.ones(rows, completion, dtype=torch.long, device=device)
    rollout = Rollout(sequences=sequences, attention_mask=torch.ones_like(sequences), prompt_length=prompt,
                      completion_mask=completion_mask, truncated=torch.ones(rows, dtype=torch.bool, device=device),
                      completions=[""] * rows, completion_ids=completions.tolist())
    return rollout, torch.randn(rows, generator=g)


def logprob_pass(model, rollout, autocast, lean: bool):
    """One log-prob pass of the update's kind, forward and backward (each group's prompt once)."""
    from zenalign.grpo.logprobs import completion_logprobs

    model.zero_grad(set_to_none=True)
    with autocast():
        logp = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, lean=lean)
    logp.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return logp.detach().float()


def run(args) -> dict:
    import torch

    from perf import letters_in_place, reverse_prompts
    from zenalign import GRPOTrainer
    from zenalign.train.batch import StepBatch

    size = "toy" if args.toy else "0.5b"
    shape = TOY if args.toy else QWEN2_05B
    prompts_per_step, group, new_tokens, rows, prompt_len, completion_len = WORK[size]
    meter = Meter(args.device)
    (model, tokenizer), build_s, _ = meter(lambda: build(shape, args.device))
    params = sum(p.numel() for p in model.parameters())
    records = reverse_prompts(256)
    out = {"size": size, "device": args.device, "parameters": params, "shape": shape, "build_s": build_s}
    with tempfile.TemporaryDirectory(prefix="shape-05b-") as tmp:
        trainer = GRPOTrainer(model=model, tokenizer=tokenizer, reward_model=letters_in_place, group_size=group,
                              prompts_per_step=prompts_per_step, max_new_tokens=new_tokens, temperature=1.0, kl_coef=0.0,
                              learning_rate=1e-6, precision="bf16", device=args.device, steps=args.steps + 1, seed=0,
                              output_dir=str(Path(tmp) / "run"), progress_bar=False, checkpoint_interval=0,
                              eval_interval=0, log_samples=0, skip_zero_advantage=False)
        trainer.setup(records, records[:8])
        walls, phases = [], []
        for step in range(args.steps + 1):  # the first is warm-up
            trainer.state.step += 1
            metrics, seconds, memory = meter(trainer.train_step)
            if step:
                walls.append(seconds)
                phases.append({k[5:]: v for k, v in metrics.items() if k.startswith("time/")})
        completions = prompts_per_step * group
        step_s = statistics.median(walls)
        out["step"] = {"seconds": step_s, "completions_per_s": completions / step_s,
                       "completion_len": metrics["completion_len"], "phases": phases[-1], **memory}
        rollout, advantages = fixed_batch(rows, prompt_len, completion_len, shape["vocab_size"], args.device)
        tokens = rows * (prompt_len + completion_len)
        trainer.updater(StepBatch.for_update(rollout, advantages))  # warm-up
        update, seconds, memory = meter(lambda: trainer.updater(StepBatch.for_update(rollout, advantages)))
        out["update"] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "rows": rows, "tokens": tokens,
                         "loss": update["loss"], "grad_norm": update["grad_norm"], **memory}
        model = trainer.engine.model
        passes = {}
        for name, lean in (("transformers_sdpa", False), ("lean", True)):
            logprob_pass(model, rollout, trainer.engine.autocast, lean)  # warm-up
            logp, seconds, memory = meter(lambda lean=lean: logprob_pass(model, rollout, trainer.engine.autocast, lean))
            passes[name] = (logp, {"seconds": seconds, "tokens_per_s": tokens / seconds, **memory})
        diff = float((passes["lean"][0] - passes["transformers_sdpa"][0]).abs().max())
        out["logprob_pass"] = {name: figures for name, (_, figures) in passes.items()}
        out["logprob_pass"]["max_logp_diff"] = diff
        out["logprob_pass"]["lean_speedup"] = passes["transformers_sdpa"][1]["seconds"] / passes["lean"][1]["seconds"]
        trainer.cleanup()
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    out["torch"] = torch.__version__
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--toy", action="store_true", help="a toy Qwen2 instead of the 0.5B shape")
    parser.add_argument("--steps", type=int, default=1, help="timed full steps (after one warm-up step)")
    parser.add_argument("--out", type=Path, required=True, help="write the results as JSON here")
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("parameters", "step", "update", "logprob_pass")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
