"""The base model of a new pack, chosen in the Train tab of the app in headless Chromium: the picker,
what the model needs (shown before creating), and the pack created on it in the packs table."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoModelForCausalLM

from test_browser import browser, choose, running_app, text_of  # noqa: F401 - browser is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_a_model_picked_in_the_train_tab_shows_its_needs_and_the_pack_created_on_it_lists_it(
        tiny_model_dir, browser, tmp_path):  # noqa: F811 - the fixture imported above
    picked = shutil.copytree(tiny_model_dir, tmp_path / "picked-model")  # another model folder, typed in
    parameters = f"{AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters():,} parameters"
    with running_app(tmp_path / "home", tmp_path / "app.log", model=str(tiny_model_dir)) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#status :text('loaded in')", timeout=60_000)
        page.get_by_role("tab", name="Memory & training").click()
        page.locator("#pack-create-box").get_by_text("Create a pack").click()
        # The app's own model first, with what it needs.
        page.wait_for_function(f"() => {text_of('#pack-size-needs')}.includes('Model tiny-llama (a local folder): "
                               f"{parameters}')", timeout=30_000)
        assert "medium: 17 M parameters in memory." in page.locator("#pack-size-needs").inner_text()
        # The bundled model, picked from the list: measured from its GGUF file, not loaded.
        choose(page, "#pack-model", "SmolLM2-135M-Instruct (bundled)")
        page.wait_for_function(f"() => {text_of('#pack-size-needs')}.includes('134,515,008 parameters')",
                               timeout=30_000)
        # A Hugging Face id typed in: said to be downloaded on first use.
        page.fill("#pack-model input", "someone/not-in-the-cache")
        page.press("#pack-model input", "Enter")
        page.wait_for_function(f"() => {text_of('#pack-size-needs')}.includes('will be downloaded from Hugging Face "
                               "on first use (needs internet)')", timeout=30_000)
        # A model folder typed in: the pack is created on it.
        page.fill("#pack-model input", str(picked))
        page.press("#pack-model input", "Enter")
        page.wait_for_function(f"() => {text_of('#pack-size-needs')}.includes('Model picked-model (a local folder): "
                               f"{parameters}')", timeout=30_000)
        page.fill("#pack-name textarea, #pack-name input", "picked")
        page.click("#pack-create")
        page.wait_for_function(f"() => {text_of('#packs-table')}.includes('picked-model')", timeout=30_000)
        table = page.locator("#packs-table").inner_text()  # its only pack, with the folder as its base model
        assert "picked" in table and str(picked) in table and str(tiny_model_dir) not in table
