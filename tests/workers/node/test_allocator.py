"""The node worker's malloc arenas: threads that allocate at once share two, not one each."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workers.node.allocator import cap_malloc_arenas, glibc

ROOT = Path(__file__).resolve().parents[3]

# Eight threads alive at once, each allocating buffers of a DWCP frame's size, then glibc's own count
# of its arenas (the <heap> elements of malloc_info) printed by the process.
THREADS = 8
PROGRAM = textwrap.dedent(
    f"""
    import ctypes, sys, tempfile, threading
    from workers.node.allocator import cap_malloc_arenas

    if sys.argv[1] == "capped":
        assert cap_malloc_arenas()
    barrier = threading.Barrier({THREADS} + 1)
    held = []

    def work():
        held.append([bytearray(64 * 1024) for _ in range(4)])
        barrier.wait()  # every thread holds its arena while the others take theirs
        barrier.wait()

    threads = [threading.Thread(target=work) for _ in range({THREADS})]
    for thread in threads:
        thread.start()
    barrier.wait()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r") as report:
        stream = libc.fopen(report.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        print(report.read().count("<heap nr="))
    barrier.wait()
    for thread in threads:
        thread.join()
    """
)


def arenas_used(mode: str) -> int:
    environ = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout.strip())


@pytest.mark.skipif(not glibc(), reason="arenas are glibc's")
def test_threads_of_a_capped_worker_share_two_arenas_where_uncapped_ones_take_one_each():
    assert arenas_used("uncapped") > THREADS // 2  # glibc's default: a new arena per busy thread
    assert arenas_used("capped") <= 2


def test_an_operators_malloc_arena_max_is_left_alone():
    assert cap_malloc_arenas(environ={"MALLOC_ARENA_MAX": "4"}) is False


def test_zero_arenas_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        cap_malloc_arenas(0)
