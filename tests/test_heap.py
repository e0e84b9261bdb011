"""heap.keep_freed_memory: after it, a training step takes its temporaries from memory the
previous step freed, instead of faulting fresh zeroed pages in from the kernel.

Counted, not timed: minor page faults (getrusage) over steady-state training steps, in a fresh
process each, since the malloc settings are process-wide."""
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
from charrnn import bench, config, heap, trainer
if sys.argv[1] == "keep":
    assert heap.keep_freed_memory()
cfg = config.load(None, ["model.hidden_size=512", "train.batch_size=32", "train.seq_len=100"])
model = trainer.build_trainer(cfg, bench.synthetic_data(65))
for _ in range(3):
    model.step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    model.step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings exist in glibc only")
def test_steps_reuse_freed_memory_instead_of_faulting_in_new_pages():
    kept, default = faults_per_step("keep"), faults_per_step("default")
    # one step of this model allocates about 30 MB of temporaries (7,000 pages of 4 KiB)
    assert kept < 20, f"{kept} page faults per step with freed memory kept"
    assert default > 5 * max(kept, 1), f"the default allocator faulted only {default} pages per step"


def test_it_is_idempotent_and_says_whether_it_applied():
    from charrnn import heap
    first = heap.keep_freed_memory()
    assert heap.keep_freed_memory() is first
    assert first == (platform.libc_ver()[0] == "glibc")
