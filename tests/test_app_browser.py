"""A real headless Chromium (Debian's, driven by Playwright) through every tab of the launched app.

It generates an image, extracts a condition, runs a 2-step training, checks that a bad upload shows an error
while the app keeps serving, and saves a screenshot of each tab (the path is printed; run pytest with -s).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from app_server import served_app
from diffusers import UNet2DConditionModel
from PIL import Image

from scedit_ui.shapes.world import render_scene, sample_scene
from tuners import CSCTuner, SCTuner, SkipLayout, TunerMetadata, save_tuner

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def app_url(random_sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-app")
    layout = SkipLayout.from_config(UNet2DConditionModel.load_config(random_sd_folder / "unet"))
    edges = CSCTuner(layout, 1, "canny")
    save_tuner(edges, root / "library" / "edges.safetensors", TunerMetadata.describe(edges, "test"))
    hatched = SCTuner(layout)  # as trained on pictures without captions
    save_tuner(hatched, root / "library" / "hatched.safetensors",
               TunerMetadata.describe(hatched, "test", default_scale=0.5, default_conditional_only=True))
    with served_app(random_sd_folder, root) as server:
        yield server.url


def find_chromium() -> str | None:
    found = (shutil.which(name) for name in CHROMIUM_NAMES)
    return next((path for path in found if path), None)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium; as root on Debian/Ubuntu it is installed on first use (apt-get), so the README's one
    test command passes on a fresh machine."""
    path = find_chromium()
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
            if done.returncode:
                pytest.fail(f"could not install chromium for the browser tests ({' '.join(command)}: {done.stderr.strip()[-300:]})")
        path = find_chromium()
    if path is None:
        pytest.fail("the browser tests need Chromium: install Debian's package (sudo apt-get install -y chromium) and run pytest again")
    return path


@pytest.fixture(scope="module")
def page(app_url, chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        page.wait_for_selector("#generate-button")
        try:
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots in {folder}")
    return folder


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def set_number(page, elem_id: str, value: float) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def wait_for_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([selector, text]) => document.querySelector(selector)?.innerText.includes(text)", arg=[selector, text])


def load_from_tuners_tab(page, name: str, status: str) -> None:
    open_tab(page, "Tuners")
    selector = page.locator("#tuner-selector input")
    selector.click()
    selector.fill(name)
    selector.press("Enter")
    page.click("#tuner-load")
    wait_for_text(page, "#tuner-status", status)


def test_generate_tab_makes_an_image(page, shots):
    open_tab(page, "Generate")
    set_number(page, "generate-steps", 2)
    page.click("#generate-button")
    page.locator("#generate-gallery img").first.wait_for()
    wait_for_text(page, "#generate-info", "2 steps")
    page.screenshot(path=shots / "1-generate.png", full_page=True)


def test_a_style_tuner_put_into_use_brings_the_scale_and_guidance_its_file_asks_for(page):
    scale_is = "value => document.querySelector('#generate-scale-1 input[type=number]').value === value"
    style_guidance = page.locator("#generate-style-guidance input")
    texture_guidance = page.locator("#generate-texture-guidance input")
    load_from_tuners_tab(page, "hatched", "loaded hatched into the Generate tab")
    open_tab(page, "Generate")
    page.wait_for_function(scale_is, arg="0.5")
    assert style_guidance.is_checked() and not texture_guidance.is_checked()

    open_tab(page, "Tuners")
    page.click("#tuner-unload")
    wait_for_text(page, "#tuner-status", "unloaded hatched")
    open_tab(page, "Generate")
    style_guidance.uncheck()
    texture_guidance.check()
    set_number(page, "generate-scale-1", 1)
    page.locator("#generate-tuner-1 input").click()  # by picking it in a slot
    page.get_by_role("option", name="hatched").click()
    page.wait_for_function(scale_is, arg="0.5")
    assert style_guidance.is_checked() and not texture_guidance.is_checked()


def test_send_to_control_carries_the_image_and_its_prompt(page):
    open_tab(page, "Generate")
    prompt = page.locator("#generate-prompt textarea").input_value()
    page.get_by_role("button", name="Send to Control").click()
    page.wait_for_function("(text) => document.querySelector('#control-prompt textarea')?.value === text", arg=prompt)
    page.locator("#control-picture img").first.wait_for()


def test_control_tab_refuses_a_bad_upload_then_extracts_a_condition(page, shots, tmp_path):
    open_tab(page, "Control")
    upload = page.locator("#control-picture input[type=file]")
    bad = tmp_path / "not-a-picture.png"
    bad.write_text("this is text, not a picture")
    upload.set_input_files(str(bad))
    page.get_by_text("the picture is not an image that can be read").first.wait_for()
    page.locator("[data-testid=toast-close]").first.click()
    page.locator("#control-picture button[aria-label='Remove Image']").click()
    picture = tmp_path / "scene.png"
    render_scene(sample_scene(3), 128).save(picture)
    upload.set_input_files(str(picture))
    page.click("#extract-button")
    page.locator("#preview-canny img").first.wait_for()
    page.screenshot(path=shots / "2-control.png", full_page=True)


def test_a_loaded_csc_tuner_lands_in_its_control_row_and_generates(page, shots):
    load_from_tuners_tab(page, "edges", "loaded edges into the canny row")
    open_tab(page, "Control")
    set_number(page, "control-steps", 2)
    page.click("#control-generate-button")
    page.locator("#control-gallery img").first.wait_for()
    page.screenshot(path=shots / "2-control.png", full_page=True)


def test_skip_tuning_tab_compares_plain_and_edited(page, shots):
    open_tab(page, "Skip-Tuning")
    page.fill("#skip-prompt textarea", "a red circle at the top left on a blue background")
    set_number(page, "skip-steps", 2)
    page.click("#compare-button")
    page.locator("#skip-edited img").first.wait_for()
    page.screenshot(path=shots / "3-skip-tuning.png", full_page=True)


def test_compare_tab_draws_a_grid(page, shots):
    open_tab(page, "Compare")
    page.fill("#compare-prompt textarea", "a red circle at the top left on a blue background")
    set_number(page, "compare-steps", 2)
    page.click("#compare-run")
    page.locator("#compare-grid img").first.wait_for()
    wait_for_text(page, "#compare-info", "3 images")
    page.screenshot(path=shots / "3-compare.png", full_page=True)


def test_train_tab_runs_a_short_training(page, shots):
    open_tab(page, "Train")
    page.fill("#train-name textarea, #train-name input", "browser-style")
    set_number(page, "train-steps", 2)
    set_number(page, "train-batch", 1)
    set_number(page, "train-preview-every", 1)
    page.click("#train-start")
    page.get_by_text(re.compile("Finished browser-style")).first.wait_for()
    page.locator("#train-previews img").first.wait_for()
    page.screenshot(path=shots / "4-train.png", full_page=True)
    open_tab(page, "Tuners")
    wait_for_text(page, "#tuner-table", "browser-style")


def test_tuners_tab_lists_the_installed_tuners(page, shots):
    open_tab(page, "Tuners")
    wait_for_text(page, "#tuner-table", "edges")
    page.screenshot(path=shots / "5-tuners.png", full_page=True)


def test_model_tab_loads_a_base_and_the_other_tabs_follow(page, shots, random_sd_folder):
    open_tab(page, "Skip-Tuning")
    assert page.locator("#rho-11 input[type=number]").input_value() == "0.8"
    open_tab(page, "Model")
    page.fill("#model-name textarea, #model-name input", str(random_sd_folder))
    page.click("#load-model-button")
    open_tab(page, "Skip-Tuning")
    page.wait_for_function("document.querySelector('#rho-11 input[type=number]')?.value === '1'")
    open_tab(page, "Model")
    page.get_by_text("12 (8, 8, 8, 8, 16").first.wait_for()
    page.screenshot(path=shots / "6-model.png", full_page=True)
    with Image.open(shots / "6-model.png") as image:
        assert image.width == 1280 and image.height >= 1000
