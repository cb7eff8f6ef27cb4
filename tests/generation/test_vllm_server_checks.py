"""``sampling.vllm.mode: server`` without vLLM: how the weights are cut into pushes, and the one-line
errors for a server nobody answers at (``zenalign validate --check-server``, ``zenalign run``). The
tests with a real vLLM server are in test_vllm_server.py (marked vllm)."""

from __future__ import annotations

import torch

from helpers import RECIPES, error_line, free_port, run_cli
from zenalign.generation.vllm_server import weight_buckets


def test_buckets_keep_each_decoder_layer_whole_and_fill_up_to_the_cap():
    weights = {"model.embed_tokens.weight": torch.zeros(100),                 # 400 bytes
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(50),    # layer 0: 200 + 200 = 400 bytes
               "model.layers.0.self_attn.k_proj.weight": torch.zeros(50),
               "model.layers.1.self_attn.q_proj.weight": torch.zeros(50),    # layer 1: 200 + 800 = 1000 bytes
               "model.layers.1.mlp.up_proj.weight": torch.zeros(200),
               "model.norm.weight": torch.zeros(25),                         # 100 bytes
               "lm_head.weight": torch.zeros(100)}                           # 400 bytes
    assert weight_buckets(weights, cap_bytes=800) == [
        ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"],
        ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"],  # 1000 > 800: alone
        ["model.norm.weight", "lm_head.weight"]]                                          # 100 + 400 <= 800
    assert weight_buckets(weights, cap_bytes=10**6) == [list(weights)]
    assert len(weight_buckets(weights, cap_bytes=1)) == 5  # one per group: embed, layer 0, layer 1, norm, head


def test_a_server_nobody_answers_at_is_one_line_at_validate_and_at_run(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    server = ["sampling.decoder=vllm", "sampling.vllm.mode=server", f"sampling.vllm.server_url={url}"]
    done = run_cli("validate", str(RECIPES / "quickstart.yaml"), *server, "--check-server", cwd=tmp_path)
    message = error_line(done, during_run=False)
    assert message.startswith(f"zenalign: error: sampling.vllm.server_url: the vLLM server at {url}: nobody answers")
    assert "VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model" in message
    assert "--worker-extension-cls zenalign.generation.vllm_worker.WeightReceiver" in message
    assert "leave server_url null" in message
    assert run_cli("validate", str(RECIPES / "quickstart.yaml"), *server, cwd=tmp_path).returncode == 0  # not asked

    out = tmp_path / "run"
    done = run_cli("run", str(RECIPES / "quickstart.yaml"), *server, f"run.output_dir={out}", "run.progress_bar=false",
                   "engine.num_threads=1", cwd=tmp_path)
    assert error_line(done, during_run=True) == message
    assert not (out / "metrics.jsonl").exists()  # refused before step 1
