"""Settings shared by the CLI and the app: data root, base model, device, host and port.

Each has a command-line option (``--home``, ``--model``, ``--device``, ``--host``, ``--port``);
the data root can also be set with ``ENGRAM_HOME``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engram_app.errors import EngramError

# The repository's storage/ folder: the default data root.
DEFAULT_HOME = Path(__file__).resolve().parent.parent / "storage"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def default_home() -> Path:
    """The data root: ``ENGRAM_HOME`` if set, else the repository's ``storage/``."""
    env = os.environ.get("ENGRAM_HOME")
    return Path(env).expanduser() if env else DEFAULT_HOME


@dataclass
class Settings:
    home: Path = field(default_factory=default_home)
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    device: str = "auto"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_upload_bytes: int = 50 * 2**20  # the largest file the library imports
    password: str | None = field(default=None, repr=False)  # the app asks for it when set (opt-in)

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()
        if self.device not in DEVICE_CHOICES:
            raise EngramError(f"Unknown device {self.device!r}: use one of {', '.join(DEVICE_CHOICES)}.")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def ensure_home(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class DevicePlan:
    """Where the model runs and in which precision."""

    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), {str(self.dtype).removeprefix('torch.')}"
        return f"CPU ({torch.get_num_threads()} threads), {str(self.dtype).removeprefix('torch.')}"


def resolve_device(choice: str) -> DevicePlan:
    """``auto``: CUDA with bf16 when a GPU is present, else CPU with fp32.

    bf16 is only used on the GPU: on CPUs without AVX-512 bf16 matmuls are several times slower
    than fp32 (measured 6x on the development machine).
    """
    if choice not in DEVICE_CHOICES:
        raise EngramError(f"Unknown device {choice!r}: use one of {', '.join(DEVICE_CHOICES)}.")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EngramError(
                "--device cuda was asked for, but PyTorch sees no CUDA GPU here. "
                "Use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU."
            )
        return DevicePlan(torch.device("cuda"), torch.bfloat16)
    return DevicePlan(torch.device("cpu"), torch.float32)
