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
SOURCES = (SOURCE, Path(__file__).with_name("memory_step.c"))  # one library: the matmuls and the memory's step
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

    def memory_step_plan(self, block) -> tuple | None:
        """The fixed arguments ``memory_step.c`` takes for ``block`` (an
        :class:`~engram_app.engram.layer.EngramBlock`) with its weights as they are now, or None where
        they are not the layout it reads (fp32, contiguous, on the CPU). Valid until a weight moves
        (the block keeps it with its weights' addresses)."""
        hidden, width = block.key.weight.shape
        norms = [block.norm_h, block.norm_k] + ([block.norm_u] if block.use_conv else [])
        weights = [block.key.weight, block.value.weight, *(norm.weight for norm in norms)]
        if block.use_conv:
            weights.append(block.conv.weight)
        if any(w is None or w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() for w in weights):
            return None
        conv = block.conv if block.use_conv else None
        if conv is not None and (conv.weight.shape != (hidden, 1, conv.kernel_size[0]) or conv.bias is not None
                                 or conv.stride[0] != 1 or conv.padding[0] != 0):
            return None
        if block.value.weight.shape != (hidden, width) or any(norm.weight.shape != (hidden,) for norm in norms):
            return None
        return (hidden, width, block.key.weight.data_ptr(), block.value.weight.data_ptr(),
                block.norm_h.weight.data_ptr(), _eps(block.norm_h), block.norm_k.weight.data_ptr(), _eps(block.norm_k),
                block.norm_u.weight.data_ptr() if conv else None, _eps(block.norm_u) if conv else 0.0,
                conv.weight.data_ptr() if conv else None, conv.kernel_size[0] if conv else 0,
                conv.dilation[0] if conv else 0)

    def memory_step(self, plan: tuple, h: torch.Tensor, e: torch.Tensor, state: torch.Tensor | None):
        """One token's Engram block step (``memory_step.c``) with a :meth:`memory_step_plan`, or None
        where ``h``, ``e`` or ``state`` are not what it reads (the caller then runs PyTorch's code).

        ``h`` [hidden] and ``e`` [width] fp32 contiguous; ``state`` [n, hidden] the earlier
        convolution inputs (oldest first) or None. Returns ``(y, normed, gate_score_ratio)``: y and
        normed [hidden] (normed None without a convolution), and gate, score and |y|/|h| as a tensor [3].
        """
        hidden, width = plan[0], plan[1]
        if not (h.shape == (hidden,) and e.shape == (width,) and h.dtype == e.dtype == torch.float32
                and h.device.type == e.device.type == "cpu" and h.is_contiguous() and e.is_contiguous()
                and (state is None or (state.dim() == 2 and state.shape[1] == hidden and state.dtype == torch.float32
                                       and state.device.type == "cpu" and state.stride(1) == 1))):
            return None
        kv, y, out = torch.empty(2 * hidden), torch.empty(hidden), torch.empty(3)
        normed = torch.empty(hidden) if plan[8] is not None else None
        status = self.library.engram_memory_step(
            h.data_ptr(), e.data_ptr(), *plan, None if state is None else state.data_ptr(),
            0 if state is None else state.shape[0], 0 if state is None else state.stride(0), kv.data_ptr(),
            y.data_ptr(), None if normed is None else normed.data_ptr(), out.data_ptr(), torch.get_num_threads())
        if status:
            raise NativeKernelError(f"memory_step.c refused hidden {hidden}, width {width} (status {status})")
        return y, normed, out

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


def _eps(norm: torch.nn.RMSNorm) -> float:
    """The epsilon ``F.rms_norm`` uses for ``norm`` (None: the dtype's machine epsilon)."""
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


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
    parts = (*(source.read_bytes() for source in SOURCES), version.encode(), _cpu_flags().encode(),
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
            done = subprocess.run([compiler, *flags, *COMMON_FLAGS, *map(str, SOURCES), "-o", str(tmp), "-lm"],
                                  capture_output=True,
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
    library.engram_memory_step.restype = ctypes.c_int
    library.engram_memory_step.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_float,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    kernels = Kernels(library, target, int(library.engram_vectorised()), int(library.engram_max_rows()),
                      bool(library.engram_openmp()))
    log.info("4-bit matmul kernel %s: %s, %s.", target.name, ("portable loops", "AVX2", "AVX-512")[kernels.vectorised],
             "OpenMP threads" if kernels.threaded else "one thread")
    return kernels
