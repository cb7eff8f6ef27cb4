"""zenalign.memory: freed memory stays in the process for the next step (glibc thresholds)."""

import subprocess
import sys

import pytest

import zenalign.trainer as trainer_module
from zenalign import GRPOTrainer

# 40 rounds of what a step does with its activations: allocate six 8 MiB buffers, write them,
# free them all at the end.
CYCLES = """
import resource, sys, torch
from zenalign.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    buffers = [torch.empty(1 << 21) for _ in range(6)]
    for b in buffers:
        b.fill_(1.0)
step()  # the first touch is paid either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True)
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept, faulted = page_faults("keep")
    _, default = page_faults("default")
    assert kept == "True"
    # 8 MiB is 2048 pages. By default glibc trims the freed top of the heap, and over 40 rounds
    # the six buffers' pages are faulted in again at least once (7 to 240 times as many pages as
    # one buffer, by the heap's layout). Kept: at most one buffer's pages are ever new.
    assert default >= 6 * 2048, default
    assert faulted <= 2048 + 256, (faulted, default)


@pytest.mark.parametrize("flag, calls", [(True, 1), (False, 0)])
def test_the_trainer_keeps_freed_memory_on_cpu_unless_told_not_to(tmp_path, tiny_model_dir, monkeypatch, flag, calls):
    seen = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: seen.append(1) or True)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=lambda completions: [0.0] * len(completions),
                          steps=1, group_size=2, prompts_per_step=2, max_new_tokens=2, progress_bar=False,
                          output_dir=str(tmp_path / "run"), keep_freed_memory=flag)
    trainer.setup([{"prompt": "a"}, {"prompt": "b"}])
    assert len(seen) == calls
    trainer.cleanup()
