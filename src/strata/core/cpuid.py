"""The x86 ISA flags this process's CPUID reports, the view onnxruntime's and OpenVINO's kernels dispatch on.

/proc/cpuinfo is the kernel's view of the physical CPU; a process can see less through CPUID (a hypervisor or
`qemu-x86_64 -cpu Haswell` masks it), and the runtimes pick their kernels from CPUID. A profile detected from
/proc/cpuinfo alone could then promise a variant (bf16, VNNI) that the runtimes cannot run here.
`visible_features` is the pure decision; `read_cpuid_features` the only I/O (it runs the `cpuid` instruction).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable

# Linux's flag name -> (leaf, subleaf, register index in eax/ebx/ecx/edx, bit), as the kernel's cpufeatures.h.
CPUID_FLAGS: dict[str, tuple[int, int, int, int]] = {
    "sse4_1": (1, 0, 2, 19),
    "sse4_2": (1, 0, 2, 20),
    "fma": (1, 0, 2, 12),
    "avx": (1, 0, 2, 28),
    "f16c": (1, 0, 2, 29),
    "bmi1": (7, 0, 1, 3),
    "avx2": (7, 0, 1, 5),
    "bmi2": (7, 0, 1, 8),
    "avx512f": (7, 0, 1, 16),
    "avx512dq": (7, 0, 1, 17),
    "avx512cd": (7, 0, 1, 28),
    "avx512bw": (7, 0, 1, 30),
    "avx512vl": (7, 0, 1, 31),
    "avx512_vnni": (7, 0, 2, 11),
    "amx_bf16": (7, 0, 3, 22),
    "avx512_fp16": (7, 0, 3, 23),
    "amx_tile": (7, 0, 3, 24),
    "amx_int8": (7, 0, 3, 25),
    "avx_vnni": (7, 1, 0, 4),
    "avx512_bf16": (7, 1, 0, 5),
}

Cpuid = Callable[[int, int], tuple[int, int, int, int]]


def cpuid_features(cpuid: Cpuid) -> frozenset[str]:
    """The flags of `CPUID_FLAGS` that `cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx)` reports; a leaf above
    the highest one the CPU lists (leaf 0's eax, leaf 7's eax for its subleaves) reports none."""
    max_leaf = cpuid(0, 0)[0]
    max_subleaf_7 = cpuid(7, 0)[0] if max_leaf >= 7 else -1
    found: set[str] = set()
    for name, (leaf, subleaf, register, bit) in CPUID_FLAGS.items():
        if leaf > max_leaf or (leaf == 7 and subleaf > max_subleaf_7):
            continue
        if cpuid(leaf, subleaf)[register] >> bit & 1:
            found.add(name)
    return frozenset(found)


def visible_features(cpuinfo_flags: frozenset[str], cpuid_flags: frozenset[str] | None) -> frozenset[str]:
    """The kernel's flags less those CPUID knows of and does not report to this process (None: CPUID not read).

    A flag counts only where both agree: the kernel leaves out what the OS does not enable (AVX-512 state,
    AMX tiles), CPUID leaves out what a hypervisor or emulator masks.
    """
    if cpuid_flags is None:
        return cpuinfo_flags
    return frozenset(cpuinfo_flags - (CPUID_FLAGS.keys() - cpuid_flags))


# x86-64 System V: void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4]).
_CPUID_CODE = bytes.fromhex(
    "53"  # push rbx (callee-saved; cpuid writes it)
    "89f8"  # mov eax, edi
    "89f1"  # mov ecx, esi
    "4989d0"  # mov r8, rdx
    "0fa2"  # cpuid
    "418900"  # mov [r8], eax
    "41895804"  # mov [r8+4], ebx
    "41894808"  # mov [r8+8], ecx
    "4189500c"  # mov [r8+12], edx
    "5b"  # pop rbx
    "c3"  # ret
)


def read_cpuid_features() -> frozenset[str] | None:
    """The flags of `CPUID_FLAGS` that CPUID reports to this process on x86-64; None where it cannot be run
    (a kernel that refuses executable anonymous memory)."""
    # the code is x86-64 System V: a 64-bit process on Linux (platform.machine() names the kernel's architecture,
    # and a 32-bit Python on an x86-64 kernel would run these bytes as other instructions)
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # SELinux execmem, PaX MPROTECT: no code of our own here
        return None
    try:
        page.write(_CPUID_CODE)
        view = ctypes.c_char.from_buffer(page)
        address = ctypes.addressof(view)
        del view  # the page can be closed once no ctypes object exports it
        prototype = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
        function = prototype(address)
        registers = (ctypes.c_uint32 * 4)()

        def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
            function(leaf, subleaf, registers)
            return registers[0], registers[1], registers[2], registers[3]

        return cpuid_features(cpuid)
    finally:
        page.close()
