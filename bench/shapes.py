"""zenalign at a realistic shape: where a sampling step's time goes, and the update's memory at a
152k vocabulary. (The side-by-side against TRL at these shapes is bench/perf.py's job.)

    python bench/shapes.py sampling              # 135m shape: per-token forward, LM head, sampler, bandwidth floor
    python bench/shapes.py memory                # V = 151,936, 512-token completions: the update's peak RSS
    python bench/shapes.py sampling --precision bf16
    python bench/shapes.py fastpaths [--precision bf16]   # each CPU fast path on and off at this shape

The model is SmolLM-135M-shaped (Llama: hidden 576, 30 layers, 9 heads / 3 kv heads, intermediate
1536, tied embeddings), randomly initialised in-process; nothing is downloaded. ``sampling``
decodes 4 prompts x 8 completions (32 rows) on the lean decoder three times, with an argmax, with
the keyed sampler and with the full Gumbel-max draw it replaced above 4,096 ids, and prints the
time per new token of each, the LM head's share, and the floor of a token at this machine's
measured memory bandwidth (the weights' bytes read once). ``memory`` runs one update pass
(log-probs with gradient, backward) on 8 completions of 512 tokens over 151,936 ids in a child
process per setting and prints each one's peak RSS: logits computed at once, in chunks (the
default), and chunks with gradient checkpointing. ``fastpaths`` times each CPU-specific fast path
against the plain computation it replaces, in alternating pairs: the lean forward against
transformers' forward (decoding 32 rows x 32 tokens, and an update pass of 32 rows x 16 + 128
tokens); in decoding, MKL's packed weights (fp32), the MLP's weights-first products and the
written-out single-query attention; in the update, the LM head's log-probs as one autograd
function, the layer halves that recompute instead of keeping activations, and float32 attention
under bf16 autocast. ``--only lean,decode,update`` picks groups.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPE_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  intermediate_size=1536, tie_word_embeddings=True, max_position_embeddings=2048)


def build_model(vocab: int, precision: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SHAPE_135M))
    return model.to(torch.bfloat16) if precision == "bf16" else model


def timed(fn, repeats: int = 5, device: str = "cpu") -> float:
    """Median seconds of ``fn()`` after a warm-up call; on a GPU each call is timed to its end."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_gb_s(device: str = "cpu") -> float:
    """Read bandwidth: summing a 1 GiB fp32 tensor (median of 5)."""
    import torch

    x = torch.ones(1 << 28, device=device)
    return (x.numel() * 4) / timed(lambda: x.sum(), 5, device) / 1e9


def sampling(precision: str) -> None:
    import torch

    from zenalign.generation.gumbel import FULL_VOCAB, GumbelSampler, completion_keys
    from zenalign.generation.decode import sample_loop
    from zenalign.models.lean import LeanDecoder, lean_model

    vocab, prompts_n, group, prompt_len, new_tokens = 49_152, 4, 8, 16, 32
    rows = prompts_n * group
    model = build_model(vocab, precision).eval()
    params = sum(p.numel() for p in model.parameters())
    lean = lean_model(model)
    prompts = torch.randint(3, vocab, (prompts_n, prompt_len))
    mask = torch.ones_like(prompts)
    keys = completion_keys(0, 1, 0, rows)
    never = torch.tensor([-1])  # no EOS: every row decodes all new_tokens

    def decode(processor):
        with torch.inference_mode():
            tokens, logits, step_logits = LeanDecoder(lean).start(prompts, mask, group, new_tokens)
            return sample_loop(tokens, logits, step_logits, new_tokens, never, 0, processor)

    seen = []
    greedy = timed(lambda: decode(lambda ids, scores: seen.append(scores) or scores), 3) / new_tokens
    hidden = torch.randn(rows, 576, dtype=next(model.parameters()).dtype)
    ids = torch.zeros(rows, prompt_len + new_tokens // 2, dtype=torch.long)
    flat = seen[new_tokens // 2].float()  # this random model's own logits: nearly uniform, the tail's worst case
    peaked = flat * (8.0 / flat.std())  # the same, spread like a trained model's (sd 8)
    with torch.inference_mode():
        head = timed(lambda: lean.head(hidden))
        draws = {(name, logits_name): timed(lambda: sampler(ids, logits).argmax(-1), 10)
                 for name, sampler in (("keyed", GumbelSampler(keys, prompt_len, 1.0)),
                                       ("full", GumbelSampler(keys, prompt_len, 1.0, full_vocab=10**9)))
                 for logits_name, logits in (("flat", flat), ("peaked", peaked))}
    bandwidth = bandwidth_gb_s()
    weight_bytes = params * (2 if precision == "bf16" else 4)
    floor = weight_bytes / bandwidth / 1e9
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    peak = 2 * 1024 ** 3 / timed(lambda: a @ b, 8) / 1e9  # GFLOP/s
    compute = 2 * params * rows / peak / 1e9  # every row multiplies through every weight once
    print(f"135m shape ({params / 1e6:.1f}M parameters, V={vocab:,}, {precision}), {rows} rows decoding {new_tokens} "
          f"tokens after a {prompt_len}-token prompt, {torch.get_num_threads()} threads, per new token:")
    print(f"  the forward (decode with an argmax) {1e3 * greedy:.1f} ms, of which the LM head's product {1e3 * head:.1f} ms")
    for logits_name, what in (("flat", "this random model's nearly uniform logits"), ("peaked", "logits spread to sd 8")):
        keyed, full = draws["keyed", logits_name], draws["full", logits_name]
        print(f"  on {what}: the keyed sampler {1e3 * keyed:.1f} ms ({100 * keyed / (greedy + keyed):.0f}% of the token), "
              f"the full Gumbel-max draw it replaces above {FULL_VOCAB:,} ids {1e3 * full:.1f} ms "
              f"({100 * full / (greedy + full):.0f}%)")
    keyed = greedy + draws["keyed", "peaked"]
    print(f"  memory bandwidth {bandwidth:.1f} GB/s: reading the weights once ({weight_bytes / 1e6:.0f} MB) takes "
          f"{1e3 * floor:.1f} ms; matmul peak {peak:.0f} GFLOP/s: the {rows} rows' products take at least "
          f"{1e3 * compute:.1f} ms. The floor of a token is the larger, {1e3 * max(floor, compute):.1f} ms "
          f"({'compute' if compute > floor else 'bandwidth'}-bound); the keyed token is {keyed / max(floor, compute):.2f}x it")


def ab(plain, fast, pairs: int = 3) -> tuple[float, float]:
    """Median seconds of ``plain()`` and ``fast()``, called in alternating pairs after a warm-up each."""
    plain(), fast()
    a, b = [], []
    for _ in range(pairs):
        for fn, out in ((plain, a), (fast, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def patched(owner, name: str, value, fn):
    """``fn`` with ``owner.name`` set to ``value`` for the call."""
    def run():
        old = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return fn()
        finally:
            setattr(owner, name, old)
    return run


def fastpaths(precision: str, only: str = "") -> None:
    import contextlib

    import torch
    import torch.nn.functional as F

    from zenalign.generation.gumbel import GumbelSampler, completion_keys
    from zenalign.models import logprobs as logprobs_module
    from zenalign.models.logprobs import completion_logprobs
    from zenalign.generation.rollout import decode_groups
    from zenalign.models.lean import LeanDecoder, kernels
    from zenalign.models.lean import model as lean_lm
    from zenalign.models.attention import float32_attention_on_cpu

    vocab, prompts_n, group, prompt_len, new_tokens, update_tokens = 49_152, 4, 8, 16, 32, 128
    rows = prompts_n * group
    model = build_model(vocab, "fp32")  # fp32 weights; bf16 is autocast over them, as the engine runs it
    bf16 = precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    prompts = torch.randint(3, vocab, (prompts_n, prompt_len))
    mask = torch.ones_like(prompts)
    keys = completion_keys(0, 1, 0, rows)

    def decode(lean=True):
        def run():
            model.eval()
            with autocast(), torch.inference_mode():
                return decode_groups(model, prompts, mask, group, new_tokens, [-1], 0,
                                     [GumbelSampler(keys, prompt_len, 1.0)], lean=lean)
        return run

    sequences = torch.cat([prompts.repeat_interleave(group, 0), torch.randint(3, vocab, (rows, update_tokens))], dim=1)
    full_mask = torch.ones_like(sequences)

    def update(lean=True):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            with autocast():
                logp = completion_logprobs(model, sequences, full_mask, prompt_len, 1.0, lean=lean)
            logp.mean().backward()
        return run

    results = []

    def report(name: str, plain_name: str, fast_name: str, plain_s: float, fast_s: float, unit: float = 1.0):
        results.append(name)
        print(f"  {name}: {plain_name} {plain_s / unit * 1e3:.1f} ms, {fast_name} {fast_s / unit * 1e3:.1f} ms "
              f"({plain_s / fast_s:.2f}x)", flush=True)

    print(f"135m shape, V={vocab:,}, {precision}{' (autocast over fp32 weights)' if bf16 else ''}, "
          f"{torch.get_num_threads()} threads; medians of alternating pairs")
    groups = set(only.split(",")) if only else {"lean", "decode", "update"}
    if "lean" in groups:
        report("lean forward, decoding (per token)", "transformers' forward", "lean", *ab(decode(False), decode(True)),
               new_tokens)
        report("lean forward, update pass (log-probs + backward)", "transformers' forward", "lean",
               *ab(update(False), update(True), 2))
    if "decode" in groups:
        if not bf16 and kernels._MKL_LINEAR is not None:  # packed copies are float32 only
            plain = patched(kernels, "_MKL_LINEAR", None, decode(True))
            report("MKL packed weights, decoding (per token)", "unpacked", "packed", *ab(plain, decode(True), 5),
                   new_tokens)
        plain = patched(lean_lm, "_weights_first", lambda x: False,
                        patched(kernels, "_MKL_LINEAR", None, decode(True)))
        fast = patched(kernels, "_MKL_LINEAR", None, decode(True))
        report("MLP weights-first products, decoding (per token; without MKL packing, or bf16)", "plain x @ W.T",
               "weights-first", *ab(plain, fast, 5), new_tokens)

        def fused_one(self, q, k, v, bias):
            out = F.scaled_dot_product_attention(q[:, :, None], k.to(q.dtype), v.to(q.dtype), attn_mask=bias == 0,
                                                 scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
            return out.squeeze(2)

        plain = patched(LeanDecoder, "attend_one", fused_one, decode(True))
        report("written-out single-query attention, decoding (per token)", "fused sdpa", "written out",
               *ab(plain, decode(True), 5), new_tokens)
    if "update" in groups:
        from torch.utils.checkpoint import checkpoint

        def through_autograd(hidden, head, targets, temperature, entropy, vocab, budget=None):
            """What chunked_token_logprobs did before _LinearLogProbs: each chunk of positions
            through autograd's log_softmax and gather, under checkpointing."""
            step = max(1, (budget or logprobs_module.LOGIT_CHUNK) // (targets.shape[0] * vocab))

            def chunk(h, t):
                return logprobs_module._token_logprobs(head(h), t, temperature, entropy)

            return torch.cat([checkpoint(chunk, hidden[:, i:i + step], targets[:, i:i + step], use_reentrant=False)
                              for i in range(0, targets.shape[1], step)], dim=1)

        plain = patched(logprobs_module, "chunked_token_logprobs", through_autograd, update(True))
        report("LM-head log-probs as one function, update pass", "log_softmax + gather, checkpointed chunks",
               "_LinearLogProbs", *ab(plain, update(True), 2))
        plain = patched(lean_lm, "_saves_less", lambda x, w: False, update(True))
        report("layer halves that recompute (norm + product, SwiGLU + down), update pass", "autograd", "recomputing",
               *ab(plain, update(True), 2))
    if bf16 and "update" in groups:
        def sdpa_in(implementation):
            def run():
                model.set_attn_implementation(implementation)
                return update(False)()
            return run

        float32_attention_on_cpu(model, torch.device("cpu"), "bf16")  # registers zenalign's float32 attention
        fp32_name = model.config._attn_implementation
        report("float32 attention under bf16, transformers' update pass", "bf16 sdpa", "float32",
               *ab(sdpa_in("sdpa"), sdpa_in(fp32_name), 2))


def memory_child(setting: str) -> dict:
    """One update pass at V = 151,936 with 512-token completions; this process's peak RSS."""
    import torch

    from zenalign.models import logprobs as lp

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vocab, rows, prompt_len, completion_len = 151_936, 8, 16, 512
    model = build_model(vocab, "fp32").train()
    if setting == "at once":
        lp.LOGIT_CHUNK = 1 << 62
    if setting == "chunks + checkpointing":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    sequences = torch.randint(3, vocab, (rows, prompt_len + completion_len))
    mask = torch.ones_like(sequences)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    logp = lp.completion_logprobs(model, sequences, mask, prompt_len, 1.0, lean=True)
    logp.mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"setting": setting, "peak_rss_mb": peak, "model_loaded_mb": loaded, "start_mb": before, "seconds": seconds}


def memory() -> None:
    print("update pass at V=151,936: 8 completions x 512 tokens (+16 prompt), 135m shape, fp32 "
          "(full logits of this batch: 8 x 512 x 151,936 x 4 B = 2.5 GB, and log_softmax's copy as much again)")
    for setting in ("at once", "chunks", "chunks + checkpointing"):
        done = subprocess.run([sys.executable, __file__, "memory-child", "--setting", setting], capture_output=True,
                              text=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
        if done.returncode != 0:
            print(f"  {setting}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {setting}: peak RSS {r['peak_rss_mb']:.0f} MB ({r['peak_rss_mb'] - r['model_loaded_mb']:.0f} MB above "
              f"the loaded model and batch), {r['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sampling", "memory", "memory-child", "fastpaths"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--setting", default="chunks")
    parser.add_argument("--only", default="", help="fastpaths: a comma-separated subset of lean, decode, update")
    args = parser.parse_args()
    if args.what == "sampling":
        sampling(args.precision)
    elif args.what == "memory":
        memory()
    elif args.what == "fastpaths":
        fastpaths(args.precision, args.only)
    else:
        print(json.dumps(memory_child(args.setting)))


if __name__ == "__main__":
    main()
