"""LoRA adapters from the recipe (peft): only the adapters train, the KL reference is the same
module with its adapters off (no second copy of the weights), checkpoints hold the adapter and the
optimizer state of the trainable parameters, exact resume after SIGKILL, export with and without
--merge, DeepSpeed ZeRO-2 on two processes, learning, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import RECIPES, REPO, build_tiny_llama, byte_tokenizer, cli_in_process, run_cli
from helpers import kill_after, read, start, without_timing
from zenalign import GRPOTrainer
from zenalign.errors import RecipeError
from zenalign.grpo.gumbel import completion_keys
from zenalign.grpo.logprobs import completion_logprobs
from zenalign.models.lora import add_adapters, forward_module, is_adapted, linear_module_names
from zenalign.recipe.schema import LoraSection
from zenalign.train import checkpoint as ckpt

peft = pytest.importorskip("peft", reason="peft not installed (pip install 'zenalign[lora]')")

QUICKSTART = str(RECIPES / "quickstart.yaml")
LORA = ["model.lora={r: 8, alpha: 16}", "grpo.learning_rate=5.0e-3"]
COMMON = ["run.steps=6", "run.checkpoint_interval=2", "run.eval_interval=0", "data.eval_size=16",
          "run.log_interval=2", "run.progress_bar=false", "run.keep_checkpoints=2", *LORA]
PROMPTS = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite", "moon", "tree"]]


def token_sum(completion_ids):
    """A dense reward for a random tiny model (which never earns an exact answer): every group varies."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def test_only_the_adapters_train():
    model = add_adapters(build_tiny_llama(), LoraSection(r=4, alpha=8.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear: q/k/v/o and gate/up/down of both layers, never the LM head; A and B each
    assert len(trainable) == 2 * 7 * 2
    layer = forward_module(model).model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape == (4, 32) and layer.scaling["default"] == 8.0 / 4


def test_target_modules_naming_no_module_lists_the_linear_ones():
    with pytest.raises(RecipeError, match=r"model.lora.target_modules: qkv_proj names no linear module of the model; "
                                          r"its linear modules: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"):
        add_adapters(build_tiny_llama(), LoraSection(target_modules=["q_proj", "qkv_proj"]))
    assert "v_proj" in linear_module_names(build_tiny_llama())


@pytest.fixture
def lora_trainer(tmp_path, tiny_model_dir):
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=token_sum, lora={"r": 4}, kl_coef=0.05, group_size=4,
                          prompts_per_step=2, max_new_tokens=6, learning_rate=0.05, steps=2, seed=3,
                          output_dir=str(tmp_path / "run"), progress_bar=False)
    trainer.setup(PROMPTS)
    yield trainer
    trainer.cleanup()


def storages(*modules) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]}


def test_adapter_config_lists_target_modules_in_the_same_order_in_every_process(tmp_path):
    """Issue 30, item 7: peft keeps target_modules as a set, so adapter_config.json listed them in
    the order of Python's string hashing, which changes from process to process."""
    script = ("import json, sys; from helpers import build_tiny_llama; from zenalign.models.lora import add_adapters;"
              "from zenalign.recipe.schema import LoraSection;"
              "add_adapters(build_tiny_llama(), LoraSection(r=2, target_modules=sys.argv[1].split(',') "
              "if sys.argv[1] != 'all-linear' else 'all-linear')).save_pretrained(sys.argv[2])")
    found = {}
    for seed in ("1", "2", "3"):
        for targets in ("all-linear", "v_proj,q_proj,o_proj,k_proj"):
            out = tmp_path / f"{seed}-{targets}"
            env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO / "tests"))
            subprocess.run([sys.executable, "-c", script, targets, str(out)], env=env, check=True, cwd=REPO)
            found.setdefault(targets, set()).add(tuple(json.loads((out / "adapter_config.json").read_text())["target_modules"]))
    [every_linear] = found["all-linear"]  # peft resolves all-linear to each layer's modules: 2 layers x 7
    assert len(every_linear) == 14 and list(every_linear) == sorted(every_linear)
    assert every_linear[:2] == ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj")
    assert found["v_proj,q_proj,o_proj,k_proj"] == {("k_proj", "o_proj", "q_proj", "v_proj")}


def test_the_reference_is_the_base_model_without_a_second_copy(lora_trainer, tiny_model_dir):
    t = lora_trainer
    assert is_adapted(t.model) and t.reference is None and t.updater.base_reference
    # every tensor the run holds is the policy's own: base weights once, plus the adapters
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert len(storages(t.model, t.reference)) == len(storages(t.model))
    assert sum(p.numel() for p in t.model.parameters()) - sum(p.numel() for p in base.parameters()) == \
        sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    for _ in range(2):  # move the adapters (B starts at zero, so the first step changes only B)
        t.state.step += 1
        t.train_step()
    rollout = t.sample(PROMPTS[:2], completion_keys(0, 99, 0, 8))
    reference = t.updater.reference_logprobs(rollout)
    with torch.no_grad():
        plain = completion_logprobs(base, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 1.0)
        policy = t.updater.logprobs(t.model, rollout)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(reference[mask], plain[mask], atol=1e-5)
    assert (policy[mask] - plain[mask]).abs().max() > 1e-3  # the adapters moved the policy away from its base


def test_a_lora_run_saves_the_adapter_and_the_trainable_optimizer_state(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=2", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    latest = ckpt.list_checkpoints(out)[-1]
    policy = latest / "policy"
    assert (policy / "adapter_model.safetensors").is_file() and not (policy / "model.safetensors").exists()
    adapter = load_file(str(policy / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    state = torch.load(latest / "engine" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) == len(adapter)  # Adam moments for the adapters only
    assert ckpt.verify(latest)["fingerprint"]["model.lora"]["r"] == 8


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_lora_run(tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "run"
    done = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={whole}")
    assert done.returncode == 0, done.stderr
    assert kill_after(start(QUICKSTART, *COMMON, f"run.output_dir={out}"), out / "metrics.jsonl", steps=3) < 6
    done = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume", "auto")
    assert done.returncode == 0, done.stderr
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        assert without_timing(read(out / name)) == without_timing(read(whole / name)), name
    resumed, reference = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (out, whole))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_export_writes_the_adapter_or_a_merged_model_and_both_load(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=2", "grpo.learning_rate=0.05", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    assert run_cli("export", str(out), str(tmp_path / "adapter")).returncode == 0
    merged_run = run_cli("export", str(out), str(tmp_path / "merged"), "--merge")
    assert merged_run.returncode == 0, merged_run.stderr
    assert "loads with AutoModelForCausalLM.from_pretrained" in merged_run.stdout
    base_dir = RECIPES / "models" / "reverse-policy"
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        a, m, b = (model(input_ids=ids).logits for model in (adapted.eval(), merged.eval(), base.eval()))
    assert torch.allclose(a, m, atol=1e-4) and (a - b).abs().max() > 1e-3
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    refused = cli_in_process("export", str(RECIPES.parent / "nowhere"), str(tmp_path / "x"), "--merge")
    assert refused.returncode == 2


@pytest.mark.slow
def test_lora_under_deepspeed_zero2_on_two_processes_matches_one(tmp_path):
    from helpers import free_port, launch, metrics

    args = [*COMMON, "run.steps=3", "run.checkpoint_interval=0", "-q"]
    one = run_cli("run", QUICKSTART, *args, f"run.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                 "-m", "zenalign", "run", QUICKSTART, *args, "engine.backend=deepspeed", "engine.zero_stage=2",
                 f"run.output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    got, want = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):  # same samples, so equal rewards; floats to operation order (1e-4 relative)
        assert (g["reward_mean"], g["completion_len"]) == (w["reward_mean"], w["completion_len"])
        for key in ("loss", "kl", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-7), (g["step"], key)


@pytest.mark.slow
def test_lora_learns_the_quickstart_task(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, "model.lora={r: 8, target_modules: all-linear}", "grpo.learning_rate=5.0e-3",
                   f"run.output_dir={out}", "run.progress_bar=false", "-q")
    assert done.returncode == 0, done.stderr
    evals = read(out / "eval.jsonl")
    before, after = evals[0]["eval/reward_mean/accuracy"], evals[-1]["eval/reward_mean/accuracy"]
    assert before < 0.1 and after >= before + 0.5, (before, after)


def test_r_of_zero_is_a_one_line_error():
    done = cli_in_process("validate", QUICKSTART, "model.lora={r: 0}")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "model.lora.r: must be >= 1 (got 0)" in done.stderr


def test_lora_without_peft_names_the_install_command(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "peft.py").write_text("raise ImportError('peft is blocked for this test')\n")
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-m", "zenalign", "validate", QUICKSTART, "model.lora={r: 8}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("zenalign: error: model.lora: LoRA needs peft, which is not installed; "
                                   "pip install 'zenalign[lora]'")


def test_target_modules_naming_nothing_is_a_one_line_error_at_run(tmp_path):
    done = cli_in_process("run", QUICKSTART, "model.lora={target_modules: [qkv]}", "run.steps=1",
                   f"run.output_dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model.lora.target_modules: qkv names no linear module of the model; its linear modules:" in done.stderr


@pytest.mark.slow
def test_resuming_across_lora_and_full_checkpoints_is_refused(tmp_path):
    full, lora = tmp_path / "full", tmp_path / "lora"
    base = ["run.steps=2", "run.checkpoint_interval=0", "run.eval_interval=0", "data.eval_size=8", "-q"]
    assert run_cli("run", QUICKSTART, *base, f"run.output_dir={full}").returncode == 0
    assert run_cli("run", QUICKSTART, *base, *LORA, f"run.output_dir={lora}").returncode == 0
    into_lora = cli_in_process("run", QUICKSTART, *base, "run.steps=3", f"run.output_dir={lora}", "--resume", "auto")
    assert into_lora.returncode == 2 and "holds LoRA adapters (its run set model.lora)" in into_lora.stderr
    into_full = cli_in_process("run", QUICKSTART, *base, *LORA, "run.steps=3", f"run.output_dir={full}", "--resume", "auto")
    assert into_full.returncode == 2 and "holds a full model (its run had no model.lora)" in into_full.stderr
    for done in (into_lora, into_full):
        assert done.stderr.strip().count("\n") == 0
    assert len(read(lora / "metrics.jsonl")) == 2 and len(read(full / "metrics.jsonl")) == 2  # nothing lost


def test_the_lean_forward_falls_back_for_adapters_and_says_why_once(caplog):
    from zenalign.models.lean import lean_model

    module = forward_module(add_adapters(build_tiny_llama(), LoraSection(r=2)))
    with caplog.at_level("INFO", logger="zenalign"):
        assert lean_model(module) is None and lean_model(module) is None
    said = [r.getMessage() for r in caplog.records if "lean forward does not run" in r.getMessage()]
    assert said == ["the lean forward does not run LlamaForCausalLM (projections that are not plain nn.Linear "
                    "(adapters or quantised layers)); using transformers' forward"]
    assert lean_model(build_tiny_llama()) is not None  # the same model without adapters takes it


def test_the_python_api_takes_a_ready_peft_model(tmp_path, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ready = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer = GRPOTrainer(model=ready, tokenizer=byte_tokenizer(), reward_model=token_sum, kl_coef=0.05,
                          group_size=4, prompts_per_step=2, max_new_tokens=4, learning_rate=0.05, steps=1,
                          output_dir=str(tmp_path / "run"), progress_bar=False)
    trainer.train(PROMPTS)
    assert trainer.model is ready and trainer.reference is None and trainer.updater.base_reference
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    with pytest.raises(RecipeError, match="already has peft adapters; leave out lora"):
        GRPOTrainer(model=ready, tokenizer=byte_tokenizer(), reward_model=token_sum, lora={"r": 2},
                    output_dir=str(tmp_path / "again")).train(PROMPTS)


def test_a_peft_model_without_trainable_parameters_is_refused(tmp_path, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    frozen = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    frozen.requires_grad_(False)
    with pytest.raises(RecipeError, match=r"no trainable parameters; .*is_trainable=True"):
        GRPOTrainer(model=frozen, tokenizer=byte_tokenizer(), reward_model=token_sum, steps=1,
                    output_dir=str(tmp_path / "run")).train(PROMPTS)


def test_resetting_the_reference_with_adapters_is_a_clear_error(lora_trainer):
    with pytest.raises(RecipeError, match="resetting the reference policy is not supported with model.lora"):
        lora_trainer.reset_reference_to_policy()


def test_the_base_reference_is_computed_in_eval_mode(lora_trainer):
    seen = []
    module = forward_module(lora_trainer.model)
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        lora_trainer.model.train()
        lora_trainer.updater.reference_logprobs(lora_trainer.sample(PROMPTS[:2], completion_keys(0, 1, 0, 8)))
    finally:
        hook.remove()
    assert seen and not any(seen) and lora_trainer.model.training  # eval for the pass, train mode restored


@pytest.mark.slow
def test_a_lora_checkpoint_without_consolidation_still_holds_the_adapter(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=2", "engine.backend=deepspeed", "engine.zero_stage=2",
                   "engine.consolidate_checkpoints=false", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    assert (ckpt.list_checkpoints(out)[-1] / "policy" / "adapter_model.safetensors").is_file()
    merged = run_cli("export", str(out), str(tmp_path / "merged"), "--merge")
    assert merged.returncode == 0, merged.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


def test_save_model_writes_the_adapter_or_the_merged_model(tmp_path, tiny_model_dir):
    """Issue 35: trainer.save_model(dir), as in TRL: a LoRA policy's adapter, or with merge=True the
    model with the adapter merged in (what `zenalign export [--merge]` writes); both load back."""
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=token_sum, lora={"r": 4}, kl_coef=0.0, group_size=4,
                          prompts_per_step=2, max_new_tokens=6, learning_rate=0.05, steps=1, seed=3,
                          output_dir=str(tmp_path / "run"), progress_bar=False)
    trainer.train(PROMPTS)
    adapter, merged = trainer.save_model(tmp_path / "adapter"), trainer.save_model(tmp_path / "merged", merge=True)
    assert (adapter / "adapter_model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        live, a, m, b = (model.eval()(input_ids=ids).logits for model in (
            trainer.model, reloaded, AutoModelForCausalLM.from_pretrained(merged),
            AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    assert torch.equal(live, a) and torch.allclose(a, m, atol=1e-5) and (a - b).abs().max() > 1e-4
    assert (merged / "tokenizer_config.json").is_file()
    with pytest.raises(RecipeError, match=r"save_model\(merge=True\): give an output_dir for the merged model"):
        trainer.save_model(merge=True)
