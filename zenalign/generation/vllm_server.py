"""Sampling on vLLM's own server (``sampling.vllm.mode: server``): generation requests go over HTTP to
vLLM's OpenAI-compatible server, a process of its own (here or on another machine), which every
process of the run shares. The policy's weights reach it after each optimizer step through the
server's ``/collective_rpc`` route and zenalign's worker extension
(:mod:`zenalign.generation.vllm_worker`).

:class:`VLLMServer` has :class:`~zenalign.generation.vllm_engine.VLLMEngine`'s interface, so the
generator, :func:`~zenalign.generation.vllm_engine.vllm_rollout` and the episodes drive either.
:func:`launch_server` starts a server for a one-machine run.

Where this departs from the colocated engine:
1. A step's requests (one per group, ``n`` = the group size, seeded as the engine seeds them) go
   out concurrently and vLLM batches them; the tokens and log-probs are the engine's.
2. The weights travel in buckets of whole decoder layers (vLLM fuses q/k/v and gate/up: a bucket
   holding part of a fused module corrupts it), as safetensors files in a directory both sides
   read (``sync_dir``, /dev/shm on one machine) or base64 inside the request.
3. Only rank 0 pushes weights, between barriers; every rank sends its own share of the requests.
4. A server lost under some processes' requests stops every process at the same point
   (:func:`on_every_process`), so they checkpoint together.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar
from urllib.parse import urlparse

import torch

from zenalign.errors import GenerationServerError, one_line
from zenalign.generation.vllm_engine import PRECISION_DTYPE, check_prompts, checked_weights, request_sampling
from zenalign.generation.vllm_worker import EXTENSION, directory_fingerprint, directory_shapes
from zenalign.recipe.schema import SamplingSection, VLLMSection

log = logging.getLogger("zenalign")

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
LAYER = re.compile(r"layers\.(\d+)\.")
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # the /collective_rpc and /reset_prefix_cache routes


T = TypeVar("T")


class StartStopped(GenerationServerError):
    """A stop signal came while the server zenalign started was loading: it was stopped, unfinished."""


def on_every_process(dist: Any, work: Callable[[], T]) -> T:
    """``work()``, a call to the generation server that every process makes at the same point of
    the run, and what all of them made of it: when it failed on any process (the server lost under
    one process's requests, or under rank 0's weight push), it raises :class:`GenerationServerError`
    on every one, there (:class:`StartStopped` on every one when that was the failure). A process
    that went on alone would meet the others in another collective (the update's all-reduce against
    their checkpoint's barrier) and wait for the collective timeout, or worse. One all-reduce of two
    scalars with several processes, none with one."""
    error: Optional[GenerationServerError] = None
    try:
        result = work()
    except GenerationServerError as exc:
        if getattr(exc, "agreed", False):  # an inner call already agreed on it, with every process
            raise
        error = exc
    if dist is not None and dist.active:
        failed, stopped = (int(v) for v in dist.max([float(dist.rank + 1 if error is not None else 0),
                                                    float(isinstance(error, StartStopped))]))
        if failed and error is None:
            kind = StartStopped if stopped else GenerationServerError
            error = kind(f"sampling.vllm: the generation server failed on process {failed - 1} (its error is in that "
                         f"process's output)")
    if error is not None:
        error.agreed = True
        raise error
    return result


def require_httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise GenerationServerError("sampling.vllm.mode server talks to vLLM's server with httpx, which is not "
                                    "installed: pip install httpx") from None
    return httpx


def server_command(python: str, model_dir: Path, port: int | str = 8000, max_model_len: int | str = "N",
                   dtype: str = "float32", nccl: bool = False) -> list[str]:
    """vLLM's server on ``model_dir`` with what zenalign needs: its worker extension, and the log-probs
    of the sampler's distribution (after temperature, top-k, top-p), as the colocated engine returns;
    with ``nccl``, vLLM's NCCL weight-transfer engine."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
            "--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager",
            "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", EXTENSION,
            *(["--weight-transfer-config", '{"backend": "nccl"}'] if nccl else [])]


class NCCLTransfer:
    """``weight_transfer: nccl`` (GPU only): vLLM's own trainer-side NCCL engine
    (``NCCLTrainerWeightTransferEngine``) over its HTTP client for the server's weight-transfer routes.
    This process joins the server's workers as rank 0 of a transfer group once; each sync then
    declares the names, dtypes and shapes and broadcasts the tensors from this GPU, packed."""

    def __init__(self, url: str, timeout_s: float, world_size: int, address: str):
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        class Weights(WeightSource):  # the sync's weights, re-iterable, in one order for both channels
            current: dict[str, torch.Tensor] = {}

            def metadata(self) -> list[Any]:
                return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.current.items()]

            def __iter__(self):
                return ((name, t.detach().contiguous()) for name, t in self.current.items())

        self.source = Weights()
        info = NCCLTrainerInitInfo(master_address=address, master_port=free_port(), world_size=world_size + 1, rank=0)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=HTTPVLLMWeightSyncClient(url, timeout_s), source=self.source)

    def send(self, weights: dict[str, torch.Tensor]) -> None:
        self.source.current = weights
        self.engine.send_weights()


def how_to_start(model_dir: Path) -> str:
    return ("VLLM_SERVER_DEV_MODE=1 " + " ".join(server_command("python", model_dir))
            + " (zenalign importable there: pip install --no-deps zenalign pluggy)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``; where there is no /proc, ``[pgid]``
    while the group can be signalled."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue  # it ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_process(process: subprocess.Popen) -> None:
    """Stop the server ``process`` leads, its whole process group: SIGTERM, then SIGKILL after 30 s.
    The group is signalled even when the leader has exited (vLLM's engine core and workers outlive a
    dead API server); returns once no member is left, or 10 s after the SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()  # reaps the leader
            if not group_members(process.pid):
                return
            time.sleep(0.1)
    process.poll()


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return one_line(lines[-1])[:300] if lines else "(no output)"


def terminated_with(parent: int) -> Optional[Callable[[], None]]:
    """For a server zenalign starts: a function for the child, between fork and exec, that asks
    Linux to send it SIGTERM when ``parent`` (this process; its starting thread, strictly) dies,
    SIGKILL included, so a killed trainer leaves no server behind (vLLM's API server stops its
    engine core and workers on SIGTERM). None where there is no ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG, <linux/prctl.h>

    def in_child() -> None:
        prctl(set_parent_death_signal, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # it died before prctl: nobody will send the signal
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def launch_server(model_dir: Path, options: VLLMSection, max_model_len: int, precision: str,
                  log_dir: Optional[Path] = None,
                  stop_requested: Optional[Callable[[], bool]] = None) -> tuple[subprocess.Popen, str, Path]:
    """vLLM's server on ``model_dir`` started on a free localhost port with ``options.server_python``
    in its own process group, its output in ``log_dir``/vllm-server.log (a temporary directory
    without one), stopped at interpreter exit; returns it once /health answers, with its URL and log.
    While it loads (minutes for a large model on a GPU), ``stop_requested()`` true (a preemption
    signal came) stops it and raises :class:`StartStopped`, rather than waiting it out."""
    httpx = require_httpx()

    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="zenalign-vllm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path, port = log_dir / "vllm-server.log", free_port()
    dtype = PRECISION_DTYPE[precision] if options.dtype == "auto" else options.dtype
    command = server_command(options.server_python or sys.executable, model_dir, port, max_model_len, dtype,
                             nccl=options.weight_transfer == "nccl")
    root = str(Path(__file__).resolve().parents[2])  # this zenalign, for the worker extension
    env = dict(os.environ, **SERVER_ENV, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(options.kv_cache_gb))))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    command += ["--host", "127.0.0.1", "--served-model-name", "policy"]
    with log_path.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   preexec_fn=terminated_with(os.getpid()))
    atexit.register(stop_process, process)
    url, started = f"http://127.0.0.1:{port}", time.monotonic()
    while time.monotonic() - started < options.server_start_timeout_s:
        if stop_requested is not None and stop_requested():
            stop_process(process)
            raise StartStopped(f"sampling.vllm: a stop signal came while the vLLM server zenalign started was loading; "
                               f"it was stopped (log: {log_path})")
        if process.poll() is not None:
            raise GenerationServerError(f"sampling.vllm: the vLLM server zenalign started exited with "
                                        f"{process.returncode} before answering: {last_line(log_path)} (log: {log_path})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                log.info("vLLM server on %s answered after %.0f s (log: %s)", url, time.monotonic() - started, log_path)
                return process, url, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_process(process)
    raise GenerationServerError(f"sampling.vllm.server_start_timeout_s: the vLLM server zenalign started did not answer "
                                f"/health within {options.server_start_timeout_s:g} s: {last_line(log_path)} "
                                f"(log: {log_path})")


def weight_buckets(weights: dict[str, torch.Tensor], cap_bytes: float) -> list[list[str]]:
    """The names of ``weights`` in pushes of at most ``cap_bytes``: each decoder layer's tensors stay
    together (vLLM fuses q/k/v and gate/up), each other tensor is a group of its own; groups fill a
    bucket in order, and a group over the cap goes alone."""
    groups: dict[str, list[str]] = {}
    for name in weights:
        layer = LAYER.search(name)
        groups.setdefault(f"layer {layer.group(1)}" if layer else name, []).append(name)
    buckets: list[list[str]] = []
    size = 0.0
    for names in groups.values():
        group_bytes = sum(weights[n].numel() * weights[n].element_size() for n in names)
        if not buckets or size + group_bytes > cap_bytes:
            buckets.append([])
            size = 0.0
        buckets[-1] += names
        size += group_bytes
    return buckets


class VLLMServer:
    """A client of vLLM's server at ``url``, checked to serve ``model_dir`` with zenalign's extension:
    sample groups, push weights. ``process``: a server :func:`launch_server` started, stopped on
    :meth:`close`."""

    def __init__(self, url: str, model_dir: Path, options: VLLMSection, max_model_len: Optional[int] = None,
                 process: Optional[subprocess.Popen] = None, log_path: Optional[Path] = None):
        httpx = require_httpx()
        self.httpx, self.url, self.model_dir, self.process = httpx, url.rstrip("/"), Path(model_dir), process
        self.where = f"sampling.vllm.server_url: the vLLM server at {self.url}" + (f" (log: {log_path})" if log_path else "")
        # vLLM's server closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); httpx keeps one for 5 s
        # too, so a reused connection could be closed under a request: keep them 2 s
        self.http = httpx.Client(timeout=options.request_timeout_s,
                                 limits=httpx.Limits(max_connections=64, keepalive_expiry=2.0))
        self.bucket_bytes = options.sync_bucket_mb * 2**20
        self.sync_dir = self.resolve_sync_dir(options.sync_dir)
        self.bucket_seconds: list[float] = []
        self.name = self.served_name()
        served = self.describe()
        self.vocab_size, self.shapes = served["vocab_size"], {k: tuple(v) for k, v in served["shapes"].items()}
        self.max_model_len = served["max_model_len"]
        self.check_served(served, max_model_len)
        self.nccl: Optional[NCCLTransfer] = None
        self.transfer = options.weight_transfer
        self.request_timeout_s = options.request_timeout_s

    def start_nccl(self) -> None:
        """Join the server's workers in vLLM's NCCL transfer group (``weight_transfer: nccl``; rank 0, a
        GPU, vLLM importable here); a refusal is one line."""
        if not torch.cuda.is_available():
            raise GenerationServerError("sampling.vllm.weight_transfer: nccl needs a CUDA GPU in the trainer; use files")
        if importlib.util.find_spec("vllm") is None:
            raise GenerationServerError("sampling.vllm.weight_transfer: nccl uses vLLM's trainer-side engine, which "
                                        "this interpreter cannot import; pip install vllm here, or use files")
        world = self.request("GET", "/get_world_size")["world_size"]
        host = urlparse(self.url).hostname
        address = "127.0.0.1" if host in LOCAL_HOSTS else socket.gethostbyname(socket.gethostname())
        try:
            self.nccl = NCCLTransfer(self.url, self.request_timeout_s, int(world), address)
        except Exception as exc:
            raise GenerationServerError(f"{self.where} could not join vLLM's NCCL weight transfer ({type(exc).__name__}: "
                                        f"{one_line(exc)[:200]}); was it started with --weight-transfer-config "
                                        f"'{{\"backend\": \"nccl\"}}'?") from None

    def resolve_sync_dir(self, sync_dir: Optional[str]) -> Optional[Path]:
        if sync_dir is not None:
            return Path(sync_dir)
        if urlparse(self.url).hostname not in LOCAL_HOSTS:
            return None  # another machine: the weights go inside the request
        return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())

    # ------------------------------------------------------------------------------------------ the server

    def request(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        """The server's JSON answer; a connection error, a timeout or an error status raises
        :class:`GenerationServerError` naming the server. A connection dropped under a request (reset,
        closed before answering) is tried twice more: a kept-alive connection the server closed as it
        was reused (every request zenalign sends may be sent again: seeded sampling, file loads)."""
        dropped = (self.httpx.ReadError, self.httpx.WriteError, self.httpx.RemoteProtocolError)
        for attempt in range(3):
            try:
                answer = self.http.request(method, f"{self.url}{path}", json=body)
                break
            except self.httpx.TransportError as exc:
                if isinstance(exc, dropped) and attempt < 2:
                    continue
                raise GenerationServerError(f"{self.where} stopped answering ({path}: {type(exc).__name__}: "
                                            f"{one_line(str(exc))[:200]})") from None
        if answer.status_code >= 400:
            raise GenerationServerError(f"{self.where} answered {answer.status_code} to {path}: "
                                        f"{one_line(answer.text)[:300]}")
        try:
            return answer.json() if answer.content else None
        except ValueError:  # not JSON: not vLLM's server answering (a proxy's page, another service)
            raise GenerationServerError(f"{self.where} answered {path} with something that is not JSON: "
                                        f"{one_line(answer.text)[:200]}") from None

    def rpc(self, method: str, *args: Any) -> list[Any]:
        """``method`` of zenalign's worker extension on every worker of the server; their results."""
        return self.request("POST", "/collective_rpc", {"method": method, "args": list(args)})["results"]

    def served_name(self) -> str:
        try:
            answer = self.http.get(f"{self.url}/v1/models", timeout=10)
        except self.httpx.TransportError:
            raise GenerationServerError(f"{self.where}: nobody answers there; start one serving model.path with: "
                                        f"{how_to_start(self.model_dir)}; or leave server_url null for zenalign to "
                                        f"start one") from None
        if answer.status_code != 200:
            raise GenerationServerError(f"{self.where} answered {answer.status_code} to /v1/models: is it vLLM's "
                                        f"OpenAI-compatible server? start one with: {how_to_start(self.model_dir)}")
        return answer.json()["data"][0]["id"]

    def describe(self) -> dict[str, Any]:
        try:
            return self.rpc("zenalign_describe")[0]
        except GenerationServerError as exc:
            if " 404 " in str(exc):
                missing = "has no /collective_rpc route: start it with the environment variable VLLM_SERVER_DEV_MODE=1"
            elif "zenalign_describe" in str(exc):
                missing = f"lacks zenalign's worker extension: start it with --worker-extension-cls {EXTENSION}"
            else:
                raise
            raise GenerationServerError(f"{self.where} {missing}") from None

    def check_served(self, served: dict[str, Any], needed: Optional[int]) -> None:
        """The server serves model.path's model (vocabulary, architectures, tensor names and shapes),
        samples with the log-probs the update corrects for, and holds sequences of ``needed`` tokens."""
        config = json.loads((self.model_dir / "config.json").read_text())
        config = {**config, **config.get("text_config", {})}
        local = (config.get("vocab_size"), list(config.get("architectures") or []))
        shapes = directory_shapes(self.model_dir)
        if local != (served["vocab_size"], served["architectures"]) or (shapes and shapes != self.shapes):
            differ = sorted(set(shapes) ^ set(self.shapes)) + [n for n in shapes if self.shapes.get(n, shapes[n]) != shapes[n]]
            raise GenerationServerError(
                f"{self.where} serves '{served['model']}' ({', '.join(served['architectures'])}, vocabulary "
                f"{served['vocab_size']}), not model.path '{self.model_dir}' ({', '.join(local[1])}, vocabulary "
                f"{local[0]}{f'; tensors differ: {differ[:3]}' if differ else ''}); start it on model.path")
        if shapes and served["fingerprint"] != directory_fingerprint(self.model_dir):
            raise GenerationServerError(f"{self.where} serves '{served['model']}', whose weights are not those of "
                                        f"model.path '{self.model_dir}' (same shapes); start it on model.path")
        if served.get("logprobs_mode") not in ("processed_logprobs", "LogprobsMode.PROCESSED_LOGPROBS"):
            raise GenerationServerError(f"{self.where} returns {served.get('logprobs_mode')}, not the sampler's "
                                        f"log-probs: start it with --logprobs-mode processed_logprobs")
        if needed is not None and needed > self.max_model_len:
            raise GenerationServerError(f"{self.where} holds sequences of {self.max_model_len} tokens "
                                        f"(--max-model-len), the run needs {needed}; restart it with --max-model-len "
                                        f"{needed}")

    # ------------------------------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], group_size: int, seeds: Optional[list[int]], sampling: SamplingSection,
                 eos_ids: Sequence[int]) -> list[list[tuple[list[int], list[float]]]]:
        """As :meth:`VLLMEngine.generate`: one request per prompt, all at once."""
        self.check_prompts(prompts, sampling.max_new_tokens)
        n = group_size if seeds is not None else 1
        return self._completions([(ids, request_sampling(sampling, n, sampling.max_new_tokens,
                                                         None if seeds is None else seeds[p], eos_ids))
                                  for p, ids in enumerate(prompts)])

    def turns(self, rows: list[list[int]], max_tokens: list[int], seeds: Optional[list[int]], sampling: SamplingSection,
              eos_ids: Sequence[int]) -> list[tuple[list[int], list[float]]]:
        """As :meth:`VLLMEngine.turns`: one turn for each row, all at once."""
        asked = [(ids, request_sampling(sampling, 1, budget, None if seeds is None else seeds[i], eos_ids))
                 for i, (ids, budget) in enumerate(zip(rows, max_tokens))]
        return [group[0] for group in self._completions(asked)]

    def _completions(self, asked: list[tuple[list[int], dict[str, Any]]]) -> list[list[tuple[list[int], list[float]]]]:
        """Each request's completions, in order: (ids through the EOS, the sampler's log-prob of each)."""
        def one(item: tuple[list[int], dict[str, Any]]) -> list[tuple[list[int], list[float]]]:
            ids, params = item
            body = {"model": self.name, "prompt": ids, "logprobs": 0, "return_token_ids": True,
                    **{k: v for k, v in params.items() if v is not None}}
            choices = sorted(self.request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            return [(list(c["token_ids"]), list(c["logprobs"]["token_logprobs"])) for c in choices]

        if not asked:
            return []
        with ThreadPoolExecutor(max_workers=min(32, len(asked)), thread_name_prefix="zenalign-vllm") as pool:
            return list(pool.map(one, asked))

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        check_prompts(prompts, max_new_tokens, self.vocab_size, self.max_model_len)

    # ------------------------------------------------------------------------------------------ weights

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """The policy's weights (Hugging Face names) into the server, in buckets of whole layers, then
        its prefix cache dropped. Names and shapes are checked before anything is sent."""
        checked = checked_weights(weights, self.shapes, f"the model the vLLM server at {self.url} serves")
        if self.transfer == "nccl":
            if self.nccl is None:
                self.start_nccl()
            try:
                self.nccl.send(checked)
            except Exception as exc:
                raise GenerationServerError(f"{self.where}: vLLM's NCCL weight transfer failed ({type(exc).__name__}: "
                                            f"{one_line(exc)[:200]})") from None
            self.request("POST", "/reset_prefix_cache")
            return
        self.bucket_seconds = []
        for names in weight_buckets(checked, self.bucket_bytes):
            start = time.perf_counter()
            self.push({name: checked[name].detach().to("cpu", copy=True).contiguous() for name in names})
            self.bucket_seconds.append(time.perf_counter() - start)
        self.request("POST", "/reset_prefix_cache")

    def push(self, bucket: dict[str, torch.Tensor]) -> None:
        """One bucket: a safetensors file in ``sync_dir`` (deleted once loaded), or inline."""
        from safetensors.torch import save, save_file

        if self.sync_dir is None:
            self.rpc("zenalign_load_inline", base64.b64encode(save(bucket)).decode("ascii"))
            return
        handle, path = tempfile.mkstemp(prefix="zenalign-weights-", suffix=".safetensors", dir=self.sync_dir)
        os.close(handle)
        try:
            save_file(bucket, path)
            self.rpc("zenalign_load_file", path)
        finally:
            os.unlink(path)

    def close(self) -> None:
        """Stop talking to the server, and stop the server if zenalign started it."""
        self.http.close()
        process, self.process = self.process, None
        if process is not None:
            stop_process(process)  # the exit hook finds it stopped


def check_server(sampling: SamplingSection, model_dir: Path) -> str:
    """``zenalign validate --check-server``: one line saying what answers at ``sampling.vllm.server_url``
    (raises :class:`GenerationServerError` as a run would on starting)."""
    options = sampling.vllm
    if sampling.decoder != "vllm" or options.mode != "server":
        return "--check-server: no server to check (the recipe does not set sampling.decoder vllm, vllm.mode server)"
    if options.server_url is None:
        return "--check-server: sampling.vllm.server_url is null: the run starts its own vLLM server"
    server = VLLMServer(options.server_url, model_dir, options, options.max_model_len)
    server.close()
    return (f"--check-server: the vLLM server at {server.url} serves model.path with zenalign's extension (vocabulary "
            f"{server.vocab_size}, sequences up to {server.max_model_len} tokens, weights sent "
            f"{f'through {server.sync_dir}' if server.sync_dir else 'inline'})")


def connect(model_dir: Path, options: VLLMSection, max_model_len: int, precision: str, dist: Any,
            log_dir: Optional[Path] = None, stop_requested: Optional[Callable[[], bool]] = None) -> VLLMServer:
    """The run's server: ``options.server_url``, else one rank 0 starts (its port shared with the
    other ranks; ``stop_requested`` as :func:`launch_server` takes it), checked against ``model_dir``
    by every rank."""
    if options.server_url is not None:
        return on_every_process(dist, lambda: VLLMServer(options.server_url, model_dir, options, max_model_len))
    process = log_path = None
    port = 0

    def start() -> None:
        nonlocal process, port, log_path
        if dist.is_main:
            process, url, log_path = launch_server(model_dir, options, max_model_len, precision, log_dir,
                                                   stop_requested)
            port = urlparse(url).port

    on_every_process(dist, start)  # the others do not wait for a port that never comes
    port = int(dist.max([float(port)])[0]) if dist.active else port
    try:
        return on_every_process(dist, lambda: VLLMServer(f"http://127.0.0.1:{port}", model_dir, options, max_model_len,
                                                         process, log_path))
    except BaseException:
        if process is not None:
            stop_process(process)
        raise
