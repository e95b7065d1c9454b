"""The exact 4- and 8-bit matmuls (``gguf_matmul.c``), compiled on this machine the first time they are needed.

Why a C file: PyTorch's CPU int4 kernel is vectorised only for bf16, which rounds every linear
layer's input, output and scales (docs/BENCHMARKS.md: 15 of 20 greedy replies the fp32 model's,
where this kernel gives 20 of 20). ``gguf_matmul.c`` widens the GGUF file's own 4-bit codes to
fp32 in registers and accumulates in fp32, at the 4-bit kernel's speed.

It is built with the system's C compiler (``cc``, ``gcc`` or ``clang``; ``-O3 -march=native
-fopenmp``, else without OpenMP, else plain ``-O3``: :data:`FLAG_SETS`) into
``<directory>/gguf_matmul-<key>.so`` and loaded with ctypes. The key hashes the
source, the compiler's version and this CPU's flags, so an edit, a new compiler or a data root
moved to another machine builds again (~1 s). Without a compiler, or with ``ENGRAM_NATIVE=0``,
:func:`load_kernels` returns None and the 4-bit runtime uses PyTorch's bf16 kernel, as before.

OpenMP: the library links ``libgomp.so.1``, which the PyTorch wheel has already loaded, so its
loops run on PyTorch's own thread pool (one runtime, no second set of spinning threads).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gguf_matmul.c")
COMPILERS = ("cc", "gcc", "clang")
FLAG_SETS = (  # tried in order: the first that builds is kept
    ("-O3", "-march=native", "-fopenmp"),  # vectorised for this CPU, on PyTorch's OpenMP threads
    ("-O3", "-march=native"),  # a compiler without OpenMP (Apple's clang): one thread
    ("-O3",),  # a compiler without -march=native: the portable loops
)
COMMON_FLAGS = ("-shared", "-fPIC", "-std=c11")


class NativeKernelError(RuntimeError):
    """The C kernel refused its arguments (a bug in the caller, never a user's input)."""


@dataclass(frozen=True)
class Kernels:
    """The compiled library and the Python side of its two functions."""

    library: ctypes.CDLL
    path: Path
    vectorised: int  # 2: AVX-512 code, 1: AVX2 + FMA, 0: the portable loops (correct, several times slower)
    max_rows: int
    threaded: bool = True  # built with OpenMP (else one thread)

    def __deepcopy__(self, memo: dict) -> Kernels:
        return self  # a loaded library: copies of a model share it

    def q4_1_matmul(self, x: torch.Tensor, codes: torch.Tensor, dm: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x @ W.T`` for fp32 ``x`` ``[rows, k]`` (rows <= :attr:`max_rows`) and a Q4_1 weight ``[out, k]``.

        ``codes``: uint8 ``[out, k // 2]`` in GGUF's nibble order; ``dm``: fp32 ``[out, 2, k // 32]`` (scales, then minimums).
        """
        return self._call(self.library.engram_q4_1_matmul, x, codes, torch.uint8, 2, dm, 2, out_features)

    def q8_0_matmul(self, x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x @ W.T`` for a Q8_0 weight: ``codes`` int8 ``[out, k]``, ``d`` fp32 ``[out, 1, k // 32]``."""
        return self._call(self.library.engram_q8_0_matmul, x, codes, torch.int8, 1, d, 1, out_features)

    def _call(self, function, x: torch.Tensor, codes: torch.Tensor, codes_dtype: torch.dtype, per_code: int,
              scales: torch.Tensor, scales_per_group: int, out_features: int) -> torch.Tensor:
        """Check everything the C code will read or write through raw pointers, then call it."""
        if x.dtype != torch.float32:
            x = x.float()
        if not x.is_contiguous():
            x = x.contiguous()
        rows, k = x.shape
        y = torch.empty(rows, out_features, dtype=torch.float32)
        if rows == 0:
            return y
        if not (x.device.type == codes.device.type == scales.device.type == "cpu"
                and codes.dtype == codes_dtype and scales.dtype == torch.float32
                and codes.is_contiguous() and scales.is_contiguous() and k % 32 == 0
                and codes.numel() * per_code == out_features * k
                and scales.numel() == out_features * scales_per_group * (k // 32)):
            raise NativeKernelError(f"gguf_matmul.c called with {tuple(x.shape)} {x.dtype} x, {tuple(codes.shape)} "
                                    f"{codes.dtype} codes, {tuple(scales.shape)} {scales.dtype} scales for "
                                    f"{out_features} outputs: not its layout")
        status = function(x.data_ptr(), rows, k, codes.data_ptr(), scales.data_ptr(), out_features, y.data_ptr(),
                          torch.get_num_threads())
        if status:
            raise NativeKernelError(f"gguf_matmul.c refused {rows}x{k} -> {out_features} (status {status})")
        return y


def _compiler() -> str | None:
    return next((path for path in map(shutil.which, COMPILERS) if path), None)


def _cpu_flags() -> str:
    """This CPU's feature flags (``-march=native`` builds for them), or the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    parts = (SOURCE.read_bytes(), version.encode(), _cpu_flags().encode(),
             torch.backends.cpu.get_cpu_capability().encode(), repr((FLAG_SETS, COMMON_FLAGS)).encode())
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    """Compile with the first of :data:`FLAG_SETS` that works, under a temporary name renamed into
    place (two processes may build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    errors = []
    try:
        for flags in FLAG_SETS:
            done = subprocess.run([compiler, *flags, *COMMON_FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                tmp.replace(target)
                return
            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-300:]}")
        raise OSError(f"{Path(compiler).name} failed ({'; '.join(errors)})")
    finally:
        tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=None)
def load_kernels(directory: Path) -> Kernels | None:
    """The compiled kernels (building them into ``directory`` if needed), or None where they cannot be had."""
    if os.environ.get("ENGRAM_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("No C compiler (%s): 4-bit chat uses PyTorch's bf16 kernel.", ", ".join(COMPILERS))
        return None
    try:
        target = Path(directory) / f"gguf_matmul-{_build_key(compiler)}.so"
        if not target.is_file():
            log.info("Building the 4-bit matmul kernel with %s into %s.", compiler, target)
            _build(compiler, target)
        try:
            library = ctypes.CDLL(str(target))
        except OSError:  # a file left broken (e.g. a disk filled up): build it again, once
            target.unlink(missing_ok=True)
            _build(compiler, target)
            library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError, UnicodeError) as exc:
        log.warning("Could not build the 4-bit matmul kernel (%s).", exc)
        return None
    for function in (library.engram_q4_1_matmul, library.engram_q8_0_matmul):
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    kernels = Kernels(library, target, int(library.engram_vectorised()), int(library.engram_max_rows()),
                      bool(library.engram_openmp()))
    log.info("4-bit matmul kernel %s: %s, %s.", target.name, ("portable loops", "AVX2", "AVX-512")[kernels.vectorised],
             "OpenMP threads" if kernels.threaded else "one thread")
    return kernels
