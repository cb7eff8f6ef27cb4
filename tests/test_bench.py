"""The benchmark's own correctness gate: zenalign's batched loss against the plain per-sequence
reference (bench/reference_loss.py), which bench/perf.py asserts before timing anything."""

import subprocess
import sys

import pytest
import torch

from helpers import DEVICES, REPO

sys.path.insert(0, str(REPO / "bench"))

from reference_loss import check_loss, plain_loss  # noqa: E402


def trainer_for(model_dir, tmp_path, **options):
    from zenalign import GRPOTrainer

    trainer = GRPOTrainer(model=str(model_dir), reward_model=lambda prompts, completions, **_: [0.0] * len(prompts),
                          group_size=4, prompts_per_step=3, max_new_tokens=10, kl_coef=0.0, steps=1,
                          output_dir=str(tmp_path / "run"), progress_bar=False, **options)
    records = [{"prompt": p} for p in ("reverse abc:", "hi", "reverse kite:")]
    trainer.setup(records, records)
    return trainer, records


def test_plain_loss_by_hand():
    # one completion, two tokens, A = 1, eps = 0.2: ratios e^0.5 (clipped to 1.2) and e^-0.1
    logp = [torch.tensor([0.0, -0.1])]
    old = [torch.tensor([-0.5, 0.0])]
    expected = -(min(1.2, 2.718281828 ** 0.5) + 2.718281828 ** -0.1) / 2
    assert plain_loss(logp, old, torch.tensor([1.0]), 0.2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zenalign_loss_matches_the_plain_reference(tiny_model_dir, tmp_path, precision, device):
    """The update's loss and its gradient against the plain per-sequence reference, on each
    device: fp32 within 1e-5, bf16 within check_loss's own bounds (3e-2 on the loss, 1e-1 on the
    gradient, relative)."""
    trainer, records = trainer_for(tiny_model_dir, tmp_path, precision=precision, device=device)
    assert next(trainer.model.parameters()).device.type == device
    result = check_loss(trainer, records)
    assert result["rows"] == 12 and result["clip_frac"] > 0.05
    if precision == "fp32":
        assert result["zenalign"] == pytest.approx(result["reference"], rel=1e-5)
        assert result["grad_rel_diff_mu1"] < 1e-5 and result["grad_rel_diff_clipped"] < 1e-5


def test_the_check_catches_a_wrong_loss(tiny_model_dir, tmp_path):
    """A batched path that forgets to average over completions (sums the per-completion means)
    must fail the check."""
    trainer, records = trainer_for(tiny_model_dir, tmp_path)
    original = trainer.updater.policy_loss

    def wrong(rollout, rows, advantages, weights, old, ref):
        mask = rollout.completion_mask.float()
        return original(rollout, rows, advantages, mask / mask.sum(dim=1, keepdim=True), old, ref)

    trainer.updater.policy_loss = wrong
    with pytest.raises(AssertionError, match="loss check"):
        check_loss(trainer, records)


def test_the_check_catches_a_gradient_that_does_not_reach_every_row(tiny_model_dir, tmp_path, monkeypatch):
    """Log-probs whose values are right but whose gradient is cut for some rows (a gathered cache
    without a backward path, say): every value agrees, so only the gradient check can fail."""
    import zenalign.train.update as update_module

    trainer, records = trainer_for(tiny_model_dir, tmp_path)
    assert check_loss(trainer, records)["grad_rel_diff_mu1"] < 1e-4  # the real path passes
    original = update_module.completion_logprobs

    def half_detached(*args, **kwargs):
        logp = original(*args, **kwargs)
        keep = torch.arange(logp.shape[0])[:, None] < logp.shape[0] // 2
        return torch.where(keep, logp, logp.detach())

    monkeypatch.setattr(update_module, "completion_logprobs", half_detached)
    with pytest.raises(AssertionError, match=r"gradient check \(mu=1\)"):
        check_loss(trainer, records)


@pytest.mark.slow
def test_benchmark_runs_zenalign_side(tmp_path):
    """bench/perf.py end to end without TRL: builds the 1M model, checks the loss, times 3 steps."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "perf.py"), "--sizes", "1m", "--frameworks", "zenalign",
                           "--steps", "3", "--repeats", "2", "--no-learning", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 1m (1.03M) | zenalign |" in done.stdout and "loss check (1m)" in done.stdout
    import json

    result = json.loads(out.read_text())["throughput"]["1m"]["zenalign"]
    assert set(result["phases"]) >= {"sample", "score", "normalize", "update", "log"}
    token = result["sampling_token"]  # the sampler's share and the token's floor, printed per size
    assert token["sampler_s"] > 0 and token["weight_bytes"] == 4 * 1_034_368 and token["bandwidth_gb_s"] > 0
    assert "- 1m: " in done.stdout and "x the floor" in done.stdout
    assert result["loss_check"]["clip_frac"] > 0.05 and result["seconds_per_step"] > 0
    if sys.platform.startswith("linux"):  # the gate's peak is printed apart; the reported one is the steps'
        assert result["loss_check"]["peak_reset"] and result["loss_check"]["peak_rss_mb"] > 0
        assert "the gate's peak RSS" in done.stdout and 0 < result["peak_rss_mb"]
    assert len(result["rounds_seconds_per_step"]) == 2
    assert result["seconds_per_step"] == min(result["rounds_seconds_per_step"])  # the lower median of two


def test_median_round_takes_each_frameworks_median_run_and_keeps_every_ratio():
    sys.path.insert(0, str(REPO / "bench"))
    from perf import median_round

    trl, zen = [1.0, 1.2, 0.9], [0.5, 0.7, 0.6]
    rounds = [{"trl": {"seconds_per_step": t, "id": f"t{i}"}, "zenalign": {"seconds_per_step": z, "id": f"z{i}"}}
              for i, (t, z) in enumerate(zip(trl, zen))]
    pair = median_round(rounds)
    assert pair["trl"]["id"] == "t0" and pair["zenalign"]["id"] == "z2"  # medians 1.0 and 0.6
    assert pair["trl"]["rounds_seconds_per_step"] == trl
    assert pair["zenalign"]["round_ratios"] == pytest.approx([2.0, 1.2 / 0.7, 1.5])


def test_the_135m_vocabulary_and_tokenizer_cover_the_prompts(tmp_path):
    """The realistic shape's word-level vocabulary: the special ids first, the prompt words next,
    then lowercase strings by length; the tokenizer it builds encodes a prompt without <unk>."""
    from make_bench_models import word_vocabulary

    vocab = word_vocabulary(40, ["kite", "a"])
    assert len(vocab) == 40 and sorted(vocab.values()) == list(range(40))
    assert list(vocab)[:8] == ["<pad>", "</s>", "<unk>", "reverse", ":", "kite", "a", "b"]  # "a" kept once
    assert list(vocab)[-1] == "ah"  # after the 7 above: b..z (25 more), then aa..ah (8) make 40
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert backend.encode("reverse kite:").ids == [3, 5, 4]


def test_letters_in_place_by_hand():
    from perf import letters_in_place

    assert letters_in_place(["p"] * 3, ["e t i k", "e t", "x t i k z"], ["etik"] * 3) == [1.0, 0.5, 0.75]


def test_the_header_names_the_cpu_and_its_instruction_sets():
    """bench/perf.py's header line, from /proc/cpuinfo texts written by hand (two processors each:
    the first one's fields count)."""
    from perf import cpu_description

    xeon = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
            "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
            "processor\t: 1\nmodel name\t: something else\nflags\t\t: fpu\n")
    assert cpu_description(xeon) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (AVX2, AVX-512 with BF16, AMX BF16)"
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert cpu_description(epyc) == "AMD EPYC 7B13 64-Core Processor (AVX2, no AVX-512, no AMX)"
    skylake = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: avx avx2 avx512f avx512bw\n"
    assert cpu_description(skylake) == "Intel(R) Xeon(R) Gold 6148 (AVX2, AVX-512, no BF16, no AMX)"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\n"
    assert cpu_description(arm) == "unknown CPU (no AVX2, no AVX-512, no AMX)"
    assert cpu_description("") == "unknown CPU (instruction sets unknown)"


def test_agent_workload_reward_and_response_template():
    """The multi-turn workload's wiring, cheaply: the shared reward reads the last assistant message;
    the response template bench/perf.py gives TRL parses the agent policy's own rendering of a tool
    call and of an answer; TRL's budget is the policy's 96 tokens plus two tool results."""
    from perf import AGENT_MODEL, AGENT_NEW_TOKENS, AGENT_RESPONSE_TEMPLATE, last_answer, trl_agent_budget

    episodes = [[{"role": "assistant", "content": "", "tool_calls": []}, {"role": "tool", "content": "604"},
                 {"role": "assistant", "content": " 604 "}],
                [{"role": "assistant", "content": "123"}], [{"role": "tool", "content": "604"}]]
    assert last_answer(episodes, ["604", "604", "604"]) == [1.0, 0.0, 0.0]

    import transformers

    tokenizer = transformers.ByT5Tokenizer.from_pretrained(str(AGENT_MODEL))
    tokenizer.response_template = AGENT_RESPONSE_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "value of k37?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"key": "k37"}}}
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "value of k37?"},
                                           {"role": "assistant", "content": "", "tool_calls": [call]}],
                                          tokenize=True, return_dict=False)
    assert whole[:len(prompt)] == prompt
    parsed = tokenizer.parse_response(whole[len(prompt):], prefix=prompt)
    assert parsed["tool_calls"] == [call] and not parsed.get("content")
    answer = tokenizer("604</s>", add_special_tokens=False)["input_ids"]
    assert tokenizer.parse_response(answer, prefix=prompt)["content"].strip() == "604"
    budget, suffix = trl_agent_budget(tokenizer)
    assert suffix == len("<|tool|>lookup\n604\n<|assistant|>\n") and budget == AGENT_NEW_TOKENS + 2 * suffix


def test_sampling_backends_table_by_hand():
    """tokens/s is each repeat's tokens over its seconds, the median of three shown; the ratio is of medians."""
    from perf import backends_report

    zen = {"tokens": [4096] * 3, "seconds": [2.0, 4.0, 1.0], "torch_threads": 2}  # 2048, 1024, 4096 tokens/s
    vllm = {"tokens": [4096] * 3, "seconds": [8.0, 8.0, 16.0], "torch_threads": 2}  # 512, 512, 256
    lines = backends_report({"fp32": {"zenalign": zen, "vllm": vllm}})
    assert lines[2] == "| fp32 | zenalign | 2048.0 | 2048.0, 1024.0, 4096.0 | 2.00 | 2 | **4.00x** |"
    assert lines[3] == "| fp32 | vllm | 512.0 | 512.0, 512.0, 256.0 | 8.00 | 2 |  |"


def test_pipeline_table_by_hand():
    """s/step and completions/s from the timed steps' wall time; vLLM's sync as seconds and a share of the
    step; each phase's median; a skipped configuration as a note, and a dropped override named."""
    from perf import first_error, pipeline_report

    colocated = {"what": "vLLM colocated", "seconds_per_step": 8.0, "dropped": ["sampling.lag=0"],
                 "metrics_per_step": [{"time/update": u, "time/sample": s, "vllm/sync_s": v}
                                      for u, s, v in ((2, 5, 0.4), (2, 7, 0.8), (3, 6, 0.6))]}
    own = {"what": "zenalign decoder", "seconds_per_step": 4.0, "dropped": [],
           "metrics_per_step": [{"time/sample": s, "time/update": 1.0} for s in (1, 3, 2)]}
    lines = pipeline_report({"a": colocated, "d": own, "e": {"what": "lag 1", "skipped": "sampling.lag: unknown field"}}, 32)
    assert lines[0] == "| configuration | s/step | completions/s | vllm/sync_s (share) | time/sample | time/update |"
    assert lines[2] == "| (a) vLLM colocated | 8.00 | 4.00 | 0.600 (7.5%) | 6.00 | 2.00 |"
    assert lines[3] == "| (d) zenalign decoder | 4.00 | 8.00 | - | 2.00 | 1.00 |"
    assert lines[4] == ("(a): the recipe has no sampling.lag yet; ran without sampling.lag=0 (what every run does "
                        "today)")
    assert lines[5] == "(e) lag 1: skipped, the recipe rejects its overrides: sampling.lag: unknown field"
    said = ("GRPOTrainer(...): sampling.vllm.mode: unknown field; accepted here: a, b; GRPOTrainer(...): "
            "sampling.lag: unknown field; accepted here: c")
    assert first_error(said) == "sampling.vllm.mode: unknown field (and 1 more)"


def test_overrides_become_sections_the_trainer_checks(tmp_path):
    """A dotted override is a nested section (its value read as YAML); one the recipe lacks is a
    RecipeError naming the field, which --pipeline turns into a skipped configuration."""
    from perf import override_sections, zenalign_trainer

    from zenalign.errors import RecipeError

    assert override_sections(["sampling.vllm.server_url=null", "sampling.lag=1", "sampling.vllm.mode=server"]) == \
        {"sampling": {"vllm": {"server_url": None, "mode": "server"}, "lag": 1}}
    with pytest.raises(RecipeError, match="sampling.no_such_field"):
        zenalign_trainer(REPO / "recipes" / "models" / "reverse-policy", tmp_path / "run", steps=1, precision="fp32",
                         learning_rate=1e-6, kl_coef=0.0, max_new_tokens=4, overrides=["sampling.no_such_field=0"])
