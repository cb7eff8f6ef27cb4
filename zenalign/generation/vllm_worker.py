"""The worker side of ``sampling.vllm.mode: server``: a class vLLM's own server mixes into its
workers (``--worker-extension-cls zenalign.generation.vllm_worker.WeightReceiver``), whose methods
the trainer calls through the server's ``POST /collective_rpc`` (dev mode, ``VLLM_SERVER_DEV_MODE=1``).

It is imported inside vLLM's worker process, so it imports only torch and safetensors. Its method
names start with ``zenalign_`` to stay clear of the worker's own.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import torch

EXTENSION = "zenalign.generation.vllm_worker.WeightReceiver"


def directory_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a directory's safetensors files (headers only); {} without any."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def directory_fingerprint(model_dir: Path) -> str:
    """A hash of each tensor's name and first row in a directory's safetensors files (however they
    are sharded): two directories of the same shapes holding other weights differ in it."""
    from safetensors import safe_open

    rows: dict[str, bytes] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                row = part[0:1] if part.get_shape() else f.get_tensor(name)
                rows[name] = row.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256()
    for name in sorted(rows):
        digest.update(name.encode() + b"\0" + rows[name])
    return digest.hexdigest()


class WeightReceiver:
    """Mixed into vLLM's worker (``self.model_runner`` is vLLM's): describes the served model and
    loads Hugging Face-named weights (any whole-module subset) into it."""

    model_runner: Any

    def zenalign_describe(self) -> dict[str, Any]:
        """What the trainer checks the served model against: vocabulary, architectures, sizes, and the
        name and shape of every tensor in the directory the server loaded."""
        config = self.model_runner.model_config
        text = getattr(config.hf_config, "text_config", None) or config.hf_config
        return {"model": str(config.model), "vocab_size": int(config.get_vocab_size()),
                "architectures": list(getattr(config.hf_config, "architectures", None) or []),
                "hidden_size": getattr(text, "hidden_size", None),
                "num_hidden_layers": getattr(text, "num_hidden_layers", None),
                "max_model_len": int(config.max_model_len), "dtype": str(config.dtype).replace("torch.", ""),
                "logprobs_mode": str(getattr(config, "logprobs_mode", "")),
                "shapes": {name: list(shape) for name, shape in directory_shapes(Path(config.model)).items()},
                "fingerprint": directory_fingerprint(Path(config.model))}

    def zenalign_load_file(self, path: str) -> int:
        """Load the tensors of a safetensors file the trainer wrote where this worker can read it."""
        from safetensors.torch import load_file

        return self.zenalign_reload(load_file(path))

    def zenalign_load_inline(self, data: str) -> int:
        """Load the tensors of a safetensors file sent in the request itself, base64-encoded."""
        from safetensors.torch import load

        return self.zenalign_reload(load(base64.b64decode(data)))

    def zenalign_reload(self, weights: dict[str, torch.Tensor]) -> int:
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)
