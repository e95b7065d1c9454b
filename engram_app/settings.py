"""Settings shared by the CLI and the app: data root, base model, device, host and port.

Each has a command-line option (``--home``, ``--model``, ``--device``, ``--host``, ``--port``,
``--allowed-host``); the data root can also be set with ``ENGRAM_HOME``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engram_app.errors import EngramError

# The repository's storage/ folder: the default data root.
DEFAULT_HOME = Path(__file__).resolve().parent.parent / "storage"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# What the app writes is its user's alone: new folders 0700, new files 0600.
PRIVATE_UMASK = 0o077
# A host name (letters, digits, dots, hyphens), an IPv4 address, or an IPv6 address (in brackets or not).
_LABEL = r"[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")

log = logging.getLogger(__name__)


def int4_chat_mode() -> str:
    """How chat runs a GGUF base model (the bundled one) on the CPU: ``auto``, ``on`` or ``off``.

    ``ENGRAM_INT4`` unset (``auto``): from its 4-bit blocks where the exact C kernel builds and
    is vectorised and threaded here (x86 with AVX2 or AVX-512, a C compiler with OpenMP): ~1.5x the
    fp32 decode speed with the same replies (2635 of 2635 tokens, 20 of 20 greedy replies as the
    fp32 model's) and prompts through the fp32 weights, as fast as before; elsewhere the fp32
    weights, as measured nowhere else. ``1``/``on``/``true``/``yes``: 4-bit always, on PyTorch's bf16
    kernel where the C one is not had (about as fast here, 15 of 20 greedy replies the same).
    ``0``/``off``/``false``/``no``: the fp32 weights. See docs/CHAT.md.
    """
    value = os.environ.get("ENGRAM_INT4", "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    return "auto"


def default_home() -> Path:
    """The data root: ``ENGRAM_HOME`` if set, else the repository's ``storage/``."""
    env = os.environ.get("ENGRAM_HOME")
    return Path(env).expanduser() if env else DEFAULT_HOME


def allowed_host_names(values: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Host names from ``--allowed-host`` options or ``ENGRAM_ALLOWED_HOSTS`` (comma or space separated).

    Lower case, without a port or brackets; anything that is not a host name or an IP address is
    refused (``*`` too: answering to any name is what lets a DNS-rebinding page in).
    """
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values:
        for item in re.split(r"[\s,]+", value.strip()):
            if not item:
                continue
            name, port = item.lower(), ""
            if name.startswith("[") and "]" in name:  # [v6] or [v6]:port
                name, _, port = name[1:].partition("]")
                port = port.removeprefix(":") if port else port
            elif name.count(":") == 1:  # name:port
                name, port = name.split(":")
            name = name.rstrip(".")
            if (port and not port.isdigit()) or not (_HOST_NAME.match(name) or is_ip_address(name)):
                raise EngramError(f"--allowed-host {item!r} is not a host name or an IP address: give the name you "
                                  "type in the browser's address bar, e.g. --allowed-host studio.lan.")
            if name not in names:
                names.append(name)
    return tuple(names)


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def make_private(path: Path, mode: int) -> None:
    """Take away group and other permissions from ``path`` (log, not fail, when we may not)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current & 0o077:
            path.chmod(mode)
            log.info("Made %s private to its user (mode %o, was %o).", path, mode, current)
    except OSError as exc:
        log.warning("Could not make %s private to its user: %s", path, exc)


@dataclass
class Settings:
    home: Path = field(default_factory=default_home)
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    device: str = "auto"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_upload_bytes: int = 50 * 2**20  # the largest file the library imports
    password: str | None = field(default=None, repr=False)  # the app asks for it when set (opt-in)
    # Host names the web app answers to besides its bound address and the loopback names.
    allowed_hosts: tuple[str, ...] = ()
    # Bytes of pack adapters kept loaded on the shared base model (least recently used unloaded past it).
    # None: a quarter of the RAM available (CPU) or of the free GPU memory when the model is loaded.
    adapter_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()
        self.allowed_hosts = allowed_host_names(self.allowed_hosts)
        if self.device not in DEVICE_CHOICES:
            raise EngramError(f"Unknown device {self.device!r}: use one of {', '.join(DEVICE_CHOICES)}.")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def ensure_home(self) -> None:
        """Create the data root private to its user, and tighten one created before.

        Sets the process's umask so that every file written from now on (the database and its WAL,
        uploads, packs, models, Gradio's cache; the worker inherits it) is 0600 and every folder
        0700. A root made open by an earlier version is set to 0700 (which closes everything
        below it) and the app's own files in it (the database, the worker's files) to 0600; other
        files a user keeps there are left as they are.
        """
        os.umask(PRIVATE_UMASK)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        make_private(self.home, 0o700)
        for path in self.home.iterdir():
            if path.name.startswith(("engram.db", "worker.")) and path.is_file() and not path.is_symlink():
                make_private(path, 0o600)
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


def device_type(choice: str) -> str:
    """``choice`` as :func:`resolve_device` places it ("cpu" or "cuda"), without its error: "cuda"
    asked for on a machine without a GPU stays "cuda" (the job fails there, with the reason)."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(choice: str) -> DevicePlan:
    """``auto``: CUDA with bf16 when a GPU is present, else CPU with fp32.

    bf16 is only used on the GPU: on CPUs without AVX-512 bf16 matmuls are several times slower
    than fp32 (measured 6x on the development machine).
    """
    if choice not in DEVICE_CHOICES:
        raise EngramError(f"Unknown device {choice!r}: use one of {', '.join(DEVICE_CHOICES)}.")
    if device_type(choice) == "cuda":
        if not torch.cuda.is_available():
            raise EngramError(
                "--device cuda was asked for, but PyTorch sees no CUDA GPU here. "
                "Use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU."
            )
        return DevicePlan(torch.device("cuda"), torch.bfloat16)
    return DevicePlan(torch.device("cpu"), torch.float32)
