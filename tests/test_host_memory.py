"""keep_freed_memory: large freed blocks are reused without page faults (glibc), and undone."""
import resource

import pytest
import torch

from vmat_diffusion.host_memory import _glibc, keep_freed_memory

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is Linux/glibc only")

BLOCK = 64 * 2 ** 20 // 4  # float32 values in 64 MB: above glibc's largest mmap threshold (32 MB)


def faults_of_filling_a_fresh_block() -> int:
    """Minor page faults taken by allocating and writing one 64 MB tensor (then freeing it)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@needs_glibc
def test_freed_block_is_reused_without_page_faults_and_default_restored():
    pages = BLOCK * 4 // 4096
    assert faults_of_filling_a_fresh_block() > pages // 2  # glibc default: a fresh mmap every time
    with keep_freed_memory() as active:
        assert active
        for _ in range(3):  # the heap settles (grows, or fills holes left by earlier trims)
            faults_of_filling_a_fresh_block()
        assert max(faults_of_filling_a_fresh_block() for _ in range(3)) < pages // 20  # then blocks are reused
    assert faults_of_filling_a_fresh_block() > pages // 2  # defaults back on leaving


def test_disabled_or_elsewhere_does_nothing():
    with keep_freed_memory(enabled=False) as active:
        assert active is False
