"""``sampling.vllm.mode: server`` without vLLM: how the weights are cut into pushes, and the one-line
errors for a server nobody answers at (``zenalign validate --check-server``, ``zenalign run``), for
one without dev mode or zenalign's extension, and for one that fails or goes away mid-run (a
localhost HTTP server answering as vLLM's does); stopping a server's whole process group. The tests with a real vLLM server are in
test_vllm_server.py (marked vllm)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import RECIPES, REVERSE_POLICY, cli_in_process, error_line, free_port, run_cli
from zenalign.errors import GenerationServerError
from zenalign.generation.vllm_engine import vllm_installed
from zenalign.generation.vllm_server import VLLMServer, weight_buckets
from zenalign.recipe.schema import SamplingSection, VLLMSection

QUICKSTART = str(RECIPES / "quickstart.yaml")


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


@pytest.mark.parametrize("override, expected", [
    ("sampling.vllm.server_url=gpu:8000", "sampling.vllm.server_url: 'gpu:8000' is not a URL; give the server's root, "
                                          "e.g. http://gpu-host:8000 (no /v1)"),
    ("sampling.vllm.server_python=/nowhere/python", "sampling.vllm.server_python: '/nowhere/python' is not an "
                                                    "interpreter here; give the path of a Python with vLLM"),
    pytest.param("sampling.vllm.server_python=null", "sampling.vllm.server_url is null, so the run starts a vLLM server "
                 "with this interpreter, which has no vLLM; name one that has it in sampling.vllm.server_python",
                 marks=pytest.mark.skipif(vllm_installed(), reason="vllm is installed here")),
], ids=["url", "server-python", "no-vllm-here"])
def test_validate_refuses_a_server_it_could_not_reach_or_start(override, expected, tmp_path):
    done = cli_in_process("validate", QUICKSTART, "sampling.decoder=vllm", "sampling.vllm.mode=server", override)
    assert expected in error_line(done, during_run=False)


def test_a_server_nobody_answers_at_is_one_line_at_validate_and_at_run(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    server = ["sampling.decoder=vllm", "sampling.vllm.mode=server", f"sampling.vllm.server_url={url}"]
    done = run_cli("validate", QUICKSTART, *server, "--check-server", cwd=tmp_path)
    message = error_line(done, during_run=False)
    assert message.startswith(f"zenalign: error: sampling.vllm.server_url: the vLLM server at {url}: nobody answers")
    assert "VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model" in message
    assert "--worker-extension-cls zenalign.generation.vllm_worker.WeightReceiver" in message
    assert "leave server_url null" in message
    assert cli_in_process("validate", QUICKSTART, *server).returncode == 0  # not asked

    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *server, f"run.output_dir={out}", "run.progress_bar=false",
                   "engine.num_threads=1", cwd=tmp_path)
    assert error_line(done, during_run=True) == message
    assert not (out / "metrics.jsonl").exists()  # refused before step 1


class VLLMLike:
    """A real HTTP server on localhost that answers what vLLM's server answers (the shapes observed from
    vLLM 0.32: /v1/models, /collective_rpc, its 404 without dev mode, its 500 for a worker method it
    lacks), serving the quickstart's policy; ``routes`` maps a path to (status, JSON body) instead, or
    to a function of the request's JSON body that returns them."""

    def __init__(self, **routes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from zenalign.generation.vllm_worker import directory_fingerprint, directory_shapes

        described = {"model": str(REVERSE_POLICY), "vocab_size": 384, "architectures": ["LlamaForCausalLM"],
                     "max_model_len": 64, "logprobs_mode": "processed_logprobs", "fingerprint":
                     directory_fingerprint(REVERSE_POLICY), "shapes": directory_shapes(REVERSE_POLICY)}
        self.routes = {"/v1/models": (200, {"data": [{"id": "policy"}]}),
                       "/collective_rpc": (200, {"results": [described]}), **routes}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                self.answer()

            def answer(self) -> None:
                route = outer.routes.get(self.path, (404, {"detail": "Not Found"}))
                code, body = route(getattr(self, "body", None)) if callable(route) else route
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def connect_to(server: VLLMLike) -> VLLMServer:
    return VLLMServer(server.url, REVERSE_POLICY, VLLMSection(mode="server", server_url=server.url, request_timeout_s=5))


@pytest.mark.parametrize("route, missing", [
    ((404, {"detail": "Not Found"}), "has no /collective_rpc route: start it with the environment variable "
                                     "VLLM_SERVER_DEV_MODE=1"),
    ((500, {"error": {"message": "Call to collective_rpc method failed: Worker failed with error ''CPUWorker' object "
                                 "has no attribute 'zenalign_describe''", "code": 500}}),
     "lacks zenalign's worker extension: start it with --worker-extension-cls "
     "zenalign.generation.vllm_worker.WeightReceiver"),
], ids=["no-dev-mode", "no-extension"])
def test_a_server_without_dev_mode_or_the_extension_is_refused_naming_what_is_missing(route, missing):
    server = VLLMLike(**{"/collective_rpc": route})
    try:
        with pytest.raises(GenerationServerError) as refused:
            connect_to(server)
        assert str(refused.value) == f"sampling.vllm.server_url: the vLLM server at {server.url} {missing}"
    finally:
        server.close()


def test_a_server_that_fails_or_goes_away_mid_run_is_one_line_naming_it():
    server = VLLMLike(**{"/v1/completions": (500, {"error": {"message": "EngineCore died", "code": 500}})})
    client = connect_to(server)
    sampling = SamplingSection(max_new_tokens=4)
    prompts = [[10, 20, 30], [40, 50]]
    try:
        with pytest.raises(GenerationServerError) as failed:
            client.generate(prompts, 2, [1, 2], sampling, [1])
        assert str(failed.value).startswith(f"sampling.vllm.server_url: the vLLM server at {server.url} answered 500 "
                                            f"to /v1/completions: ")
        assert "EngineCore died" in str(failed.value)
        server.close()
        with pytest.raises(GenerationServerError) as gone:
            client.generate(prompts, 2, [1, 2], sampling, [1])
        assert str(gone.value).startswith(f"sampling.vllm.server_url: the vLLM server at {server.url} stopped "
                                          f"answering (/v1/completions: ConnectError")
        assert "\n" not in str(gone.value)
    finally:
        client.close()


def test_a_connection_dropped_under_a_request_is_tried_again_then_named():
    """vLLM's server closes a connection idle for 5 s, which can meet a request on a reused one (seen
    once in CI as "ReadError: Connection reset by peer" with the server alive): a request whose
    connection is reset without an answer goes again, up to three tries, then stops the run naming
    the server."""
    import socket
    import struct

    server = VLLMLike(**{"/flaky": (200, {"ok": True}), "/dead": (200, {"ok": True})})
    drops = {"/flaky": 2, "/dead": 10}
    handler = server.http.RequestHandlerClass
    answer = handler.answer

    def dropping(self):
        if drops.get(self.path, 0) > 0:
            drops[self.path] -= 1
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)  # a reset, with no answer
            self.close_connection = True
            return
        answer(self)

    handler.answer = dropping
    client = connect_to(server)
    try:
        assert client.request("POST", "/flaky", {}) == {"ok": True} and drops["/flaky"] == 0  # the third try
        with pytest.raises(GenerationServerError) as gone:
            client.request("POST", "/dead", {})
        assert drops["/dead"] == 7  # three tries
        assert str(gone.value).startswith(f"sampling.vllm.server_url: the vLLM server at {server.url} stopped "
                                          f"answering (/dead: ")
    finally:
        client.close()
        server.close()


def test_stopping_a_server_stops_its_whole_process_group_even_after_its_leader_died():
    """vLLM's engine core and workers outlive a dead API server, in its process group: stop_process
    ends them too. Here a leader that starts a child (``sleep``) and exits."""
    import subprocess
    import sys

    from zenalign.generation.vllm_server import group_members, stop_process

    leader = subprocess.Popen([sys.executable, "-c", "import subprocess; print(subprocess.Popen(['sleep', '600']).pid)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(leader.stdout.readline())
    leader.wait()
    leader.stdout.close()
    try:
        assert group_members(leader.pid) == [child]  # an orphan, in the dead leader's group
        stop_process(leader)
        assert group_members(leader.pid) == []
    finally:
        subprocess.run(["kill", "-9", str(child)], stderr=subprocess.DEVNULL)


AGREEING = r"""
import json, os, sys
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from zenalign.errors import GenerationServerError
from zenalign.generation.vllm_server import StartStopped, VLLMServer, connect, on_every_process
from zenalign.recipe.schema import SamplingSection, VLLMSection
from zenalign.train.distributed import Dist, leave_process_group

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=20))  # a collective left unpaired fails in 20 s
group = Dist(rank=rank, world_size=2)
url, model, no_vllm, logs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
client = VLLMServer(url, model, VLLMSection(mode="server", server_url=url, request_timeout_s=5))
prompts = [[11, 12]] if rank == 0 else [[99, 12]]  # the server fails requests for prompts that start with 99
said = {}


def generate():
    return client.generate(prompts, 2, [rank], SamplingSection(max_new_tokens=2), [1])


def outcome(name, work):
    try:
        said[name] = ["returned", on_every_process(group, work)]
    except GenerationServerError as exc:
        said[name] = ["raised", str(exc)] + (["StartStopped"] if isinstance(exc, StartStopped) else [])


outcome("generate", generate)
outcome("push", lambda: client.request("POST", "/push", {}) if rank == 0 else None)  # rank 0 pushes alone
outcome("nested", lambda: on_every_process(group, generate))
outcome("connect", lambda: connect(model, VLLMSection(mode="server", server_python=no_vllm), 64, "fp32", group,
                                   logs / str(rank)))
outcome("stopped", lambda: connect(model, VLLMSection(mode="server", server_python=no_vllm), 64, "fp32", group,
                                   logs / str(rank), stop_requested=lambda: True))  # a signal while it loads
said["after"] = group.max([float(rank)])[0]  # the collectives still pair up
client.close()
print(json.dumps(said))
leave_process_group()
"""


def completions(body: dict) -> tuple[int, dict]:
    """/v1/completions: a 500 for a prompt starting with token 99, else ``n`` two-token completions."""
    if body["prompt"][0] == 99:
        return 500, {"error": {"message": "EngineCore died", "code": 500}}
    return 200, {"choices": [{"index": i, "token_ids": [5, 1], "logprobs": {"token_logprobs": [-0.5, -0.25]}}
                             for i in range(body["n"])]}


def test_a_server_failing_on_one_process_stops_every_process_at_the_same_point(tmp_path):
    """Two processes share a server. When it fails under one process's requests (or rank 0's weight
    push, or rank 0's start of the server, or a stop signal while it starts), every process raises
    the server error at that point (a stop as a stop), the others naming the process whose output
    holds it; none goes on alone into a collective the others never reach (the update's all-reduce
    would meet their checkpoint's barrier), and an error agreed on by an inner call is not agreed
    on again. Real gloo, a real HTTP server, zenalign's launch of a server whose interpreter has no
    vLLM (/bin/false)."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    server = VLLMLike(**{"/v1/completions": completions, "/push": (500, {"error": {"message": "out of memory"}})})
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), WORLD_SIZE="2")
    try:
        ranks = [subprocess.Popen([sys.executable, "-c", AGREEING, server.url, str(REVERSE_POLICY), "/bin/false",
                                   str(tmp_path)], cwd=REPO, env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        outs = [rank.communicate(timeout=180) for rank in ranks]
    finally:
        server.close()
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outs]
    said = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    failed = f"sampling.vllm.server_url: the vLLM server at {server.url} answered 500 to "
    elsewhere = "sampling.vllm: the generation server failed on process {} (its error is in that process's output)"
    for case in ("generate", "nested"):
        assert said[0][case] == ["raised", elsewhere.format(1)]
        assert said[1][case][0] == "raised" and said[1][case][1].startswith(failed + "/v1/completions: ")
    assert said[0]["push"] == ["raised", failed + '/push: {"error": {"message": "out of memory"}}']
    assert said[1]["push"] == ["raised", elsewhere.format(0)]
    assert said[0]["connect"][1].startswith("sampling.vllm: the vLLM server zenalign started exited with 1 before "
                                            "answering")
    assert said[1]["connect"] == ["raised", elsewhere.format(0)]
    assert said[0]["stopped"][1].startswith("sampling.vllm: a stop signal came while the vLLM server zenalign started "
                                            "was loading; it was stopped") and said[0]["stopped"][2] == "StartStopped"
    assert said[1]["stopped"] == ["raised", elsewhere.format(0), "StartStopped"]  # a stop, though no signal came here
    assert said[0]["after"] == said[1]["after"] == 1.0


class Sampler:
    """/v1/completions of a localhost server for a whole run: ``n`` completions of ``max_tokens``
    tokens, a function of the request (prompt and seed) as vLLM's seeded sampling is; the
    ``fail_at``-th sampling request (n > 1, counted over every process) answers 500 instead."""

    def __init__(self, fail_at: int = 0):
        import threading

        self.fail_at, self.sampled, self.lock = fail_at, 0, threading.Lock()

    def __call__(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.sampled += body["n"] > 1
            if body["n"] > 1 and self.sampled == self.fail_at:
                return 500, {"error": {"message": "EngineCore died", "code": 500}}
        base = sum(body["prompt"]) + 31 * body.get("seed", 0)  # greedy requests carry none
        return 200, {"choices": [{"index": i, "token_ids": [97 + (base + 7 * i + 3 * j) % 26 for j in range(body["max_tokens"])],
                                  "logprobs": {"token_logprobs": [-1.0] * body["max_tokens"]}} for i in range(body["n"])]}


@pytest.mark.slow
@pytest.mark.parametrize("lag", [0, 1])
def test_two_processes_stop_together_when_the_server_fails_one_of_their_requests(tmp_path, lag):
    """torchrun, 2 ranks, one server: the server fails one request of step 2 (one rank's), serving
    the other rank's. Both ranks stop with the same line and one checkpoint of step 1 (no
    collective left unpaired, so no collective timeout), and --resume auto finishes the run. With
    lag 1 step 2's batch is generated in the background during step 1, and the failure met when
    step 2 takes it. The server is a localhost HTTP server answering as vLLM's does (:class:`Sampler`)."""
    import sys

    from helpers import REPO, launch, metrics
    from zenalign.train import checkpoint as ckpt

    server = VLLMLike(**{"/v1/completions": Sampler(fail_at=9), "/reset_prefix_cache": (200, {})})  # 8 prompts a step
    out = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), "-m", "zenalign", "run",
            QUICKSTART, "sampling.decoder=vllm", "sampling.vllm.mode=server", f"sampling.vllm.server_url={server.url}",
            "run.steps=3", "run.eval_interval=0", "data.eval_size=4", "engine.collective_timeout_s=30",
            "run.progress_bar=false", f"sampling.lag={lag}", f"run.output_dir={out}"]
    try:
        done = launch(sys.executable, *args)
        assert done.returncode != 0
        stopped = [line for line in done.stderr.splitlines() if line.startswith("zenalign: error:")]
        assert len(stopped) == 2 and all("the run stopped after step 1 with a checkpoint: start the server again, then "
                                         "run again with --resume auto" in line for line in stopped), done.stderr[-3000:]
        assert sum("the generation server failed on process" in line for line in stopped) == 1  # the other rank's
        assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001"]
        assert [m["step"] for m in metrics(out)] == [1]
        resumed = launch(sys.executable, *args, "--resume", "auto")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    finally:
        server.close()


FAKE_VLLM = """import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""

LAUNCHER = """import sys, time
from pathlib import Path
from zenalign.generation.vllm_server import launch_server
from zenalign.recipe.schema import VLLMSection

process, url, log = launch_server(Path(sys.argv[1]), VLLMSection(mode="server", server_python=sys.argv[2]), 64, "fp32")
print(process.pid, flush=True)
time.sleep(600)
"""


def test_a_server_zenalign_started_stops_when_the_trainer_is_sigkilled(tmp_path):
    """A trainer killed with SIGKILL runs no exit hook, yet the server it started gets SIGTERM from
    Linux (the parent-death signal) and stops: no orphan holding the GPU when the run is resumed. The
    server here answers /health and nothing else (``server_python`` a script that ignores
    ``-m vllm...``); the launch is zenalign's."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO
    from zenalign.generation.vllm_server import group_members

    (tmp_path / "fake_vllm.py").write_text(FAKE_VLLM)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {tmp_path / 'fake_vllm.py'} \"$@\"\n")
    python.chmod(0o755)
    trainer = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(REVERSE_POLICY), str(python)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    server = int(trainer.stdout.readline())
    try:
        assert group_members(server) == [server]  # up, answering /health
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 10
        while group_members(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(server) == []
    finally:
        trainer.stdout.close()
        subprocess.run(["kill", "-9", "--", f"-{server}"], stderr=subprocess.DEVNULL)


def test_a_stop_signal_while_the_server_loads_stops_it_and_the_run_at_once(tmp_path):
    """A preemption signal while the server zenalign started loads (minutes for a large model on a
    GPU) does not wait for it: the server's process group is stopped and the run ends as a stopped
    one (exit 128 + 15, nothing written), resumable. The server here never answers /health."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO
    from zenalign.generation.vllm_server import group_members

    python, pid_file, out = tmp_path / "python", tmp_path / "server.pid", tmp_path / "run"
    python.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 600\n")
    python.chmod(0o755)
    run = subprocess.Popen([sys.executable, "-m", "zenalign", "run", QUICKSTART, "sampling.decoder=vllm",
                            "sampling.vllm.mode=server", f"sampling.vllm.server_python={python}",
                            f"run.output_dir={out}", "run.progress_bar=false"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        server = int(pid_file.read_text())
        assert group_members(server) == [server]  # loading
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
        assert run.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert err.strip().splitlines()[-1] == "zenalign: stopped by SIGTERM at step 0; resume with --resume auto"
        assert group_members(server) == []
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        run.kill()
        run.communicate()
        if pid_file.is_file():
            subprocess.run(["kill", "-9", "--", f"-{pid_file.read_text().strip()}"], stderr=subprocess.DEVNULL)


def test_nccl_weight_transfer_without_a_gpu_is_one_line_before_anything_is_sent():
    """weight_transfer: nccl is vLLM's GPU route: on a machine without CUDA the first sync says so, and no
    weight reaches the server (its /collective_rpc sees only the description; a push would be a second
    call). A server zenalign starts for it gets vLLM's NCCL engine."""
    from transformers import AutoModelForCausalLM

    from zenalign.generation.vllm_server import server_command

    server = VLLMLike()
    calls = []
    handler = server.http.RequestHandlerClass
    answer = handler.answer
    handler.answer = lambda self: (calls.append(self.path), answer(self))[1]
    client = VLLMServer(server.url, REVERSE_POLICY, VLLMSection(mode="server", server_url=server.url,
                                                                weight_transfer="nccl", request_timeout_s=5))
    try:
        calls.clear()
        with pytest.raises(GenerationServerError, match="^sampling.vllm.weight_transfer: nccl needs a CUDA GPU in the "
                                                        "trainer; use files$"):
            client.load_weights(AutoModelForCausalLM.from_pretrained(REVERSE_POLICY).state_dict())
        assert calls == []
    finally:
        client.close()
        server.close()
    command = server_command("python", REVERSE_POLICY, nccl=True)
    assert command[-2:] == ["--weight-transfer-config", '{"backend": "nccl"}']
    assert "--weight-transfer-config" not in server_command("python", REVERSE_POLICY)
