"""keep_freed_memory: glibc's thresholds raised for the CLI's process (a no-op where there is no glibc)."""

import ctypes
import ctypes.util

from nl_rewrite.memory import keep_freed_memory


def test_it_takes_effect_on_glibc_and_is_harmless_to_repeat():
    on_glibc = "libc.so" in (ctypes.util.find_library("c") or "")
    assert keep_freed_memory() is on_glibc
    assert keep_freed_memory() is on_glibc
    if on_glibc:  # the heap still serves and frees a large block
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype = ctypes.c_void_p
        block = libc.malloc(64 << 20)
        assert block
        libc.free(ctypes.c_void_p(block))
