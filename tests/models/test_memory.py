"""zenalign.train.memory: freed memory stays in the process for the next step (glibc thresholds)."""

import ctypes
import subprocess
import sys

import pytest

import zenalign.train.trainer as trainer_module
from zenalign import GRPOTrainer

# A 24 MiB block (above glibc's starting mmap threshold of 128 KiB, below the 32 MiB set here),
# then rounds of what a step does with its activations: six 8 MiB buffers allocated, written
# and freed together.
CHECK = """
import ctypes, resource, sys, torch
from zenalign.train.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
mapped = libc.mallinfo2().hblkhd
block = torch.empty(6 << 20)
own_mapping = libc.mallinfo2().hblkhd - mapped >= 24 << 20
del block
def step():
    buffers = [torch.empty(1 << 21) for _ in range(6)]
    for b in buffers:
        b.fill_(1.0)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(kept, own_mapping, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def allocator(mode: str) -> tuple[str, str, int]:
    done = subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True, check=True)
    kept, own_mapping, faults = done.stdout.split()
    return kept, own_mapping, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc >= 2.33 (mallopt, mallinfo2)")
def test_freed_memory_stays_in_the_process_for_the_next_step():
    kept, own_mapping, faults = allocator("keep")
    assert (kept, own_mapping) == ("True", "False")  # the 24 MiB block came from the heap
    assert faults < 256, faults  # 20 more rounds reuse what the first five freed: no page is new
    _, own_mapping, _ = allocator("default")
    assert own_mapping == "True"  # glibc's default: a block this size gets its own mapping, unmapped on free


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
