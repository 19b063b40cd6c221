"""Bad input, concurrency, out-of-memory and file access of the launched app, through gradio_client and raw HTTP.

Random-weight SD folder (64 px, CPU). Every refused input must give one clear message (no traceback, no bare
"error"), leave the server serving and write nothing outside the library and output folders.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from app_server import served_app
from bad_inputs import (
    BROKEN_IMAGES,
    HOSTILE_NAMES,
    code_running_pickle,
    damaged_tuner_files,
    save_picture,
    unusual_images,
)
from diffusers import UNet2DConditionModel
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import app
from scedit_ui.request import read_png_request
from tuners import SCTuner, SkipLayout, TunerMetadata, save_tuner

FAST = dict(prompt="a red circle at the top left on a blue background", negative_prompt="", steps=2, guidance=5.0, width=64,
            height=64, scheduler="DDIM", batch_size=1)
# Folders below the served root that the app (library, outputs) and the test client (downloads) may write to.
WRITABLE = ("library", "outputs", "downloads")


@pytest.fixture(scope="module")
def served(random_sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    library = root / "library"
    layout = SkipLayout.from_config(UNet2DConditionModel.load_config(random_sd_folder / "unet"))
    style = SCTuner(layout, 0.5)
    save_tuner(style, library / "style.safetensors", TunerMetadata.describe(style, "test"))
    marker = root / "code-ran"
    tuner_files = damaged_tuner_files(layout, root / "incoming", marker)
    damaged = tuner_files["metadata-a-list"][0]
    (library / "damaged.safetensors").write_bytes(damaged.read_bytes())

    with served_app(random_sd_folder, root) as server:
        client = Client(server.url, verbose=False, download_files=str(root / "downloads"))
        yield SimpleNamespace(client=client, url=server.url, state=server.state, demo=server.demo, launch=server.launch, root=root,
                              library=library, tuner_files=tuner_files, marker=marker)


def generate(client: Client, **overrides) -> tuple[list[str], str]:
    gallery, info = client.predict(**{**FAST, "seed": 5, **overrides}, api_name="/generate")
    return [item["image"] for item in gallery], info


def seed_of(path: str) -> int:
    request, index, _ = read_png_request(path)
    return request.seed + index


def extract(client: Client, picture: Path, kinds: list[str], **options) -> list:
    return client.predict(handle_file(str(picture)), kinds, "crop", 64, 64, **options, api_name="/extract_conditions")


def call_raw(served, api_name: str, **values) -> str:
    """Call an endpoint over plain HTTP with JSON that may hold NaN (which gradio_client refuses to send)."""
    info = httpx.get(f"{served.url}gradio_api/info").json()["named_endpoints"][f"/{api_name}"]["parameters"]
    data = [values.get(p["parameter_name"], p.get("parameter_default")) for p in info]
    posted = httpx.post(f"{served.url}gradio_api/call/{api_name}", content=json.dumps({"data": data}),
                        headers={"content-type": "application/json"})
    posted.raise_for_status()
    return httpx.get(f"{served.url}gradio_api/call/{api_name}/{posted.json()['event_id']}", timeout=60).text


def error_of(stream: str) -> str | None:
    """The message of an `event: error` in a /call stream (None for a bare error without one)."""
    lines = stream.splitlines()
    assert "event: error" in lines, stream
    return json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))["error"]


def outside_writable(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.relative_to(root).parts[0] not in WRITABLE}


# -- pictures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BROKEN_IMAGES))
def test_a_broken_upload_gets_one_clear_message(served, kind, tmp_path):
    data, message = BROKEN_IMAGES[kind]
    (tmp_path / "upload.png").write_bytes(data)
    with pytest.raises(AppError, match=message) as refused:
        extract(served.client, tmp_path / "upload.png", ["canny"])
    assert "Traceback" not in str(refused.value) and "/tmp/gradio" not in str(refused.value)


@pytest.mark.parametrize("kind", list(unusual_images()))
def test_unusual_uploads_are_converted_like_a_viewer_shows_them(served, kind, tmp_path):
    image, suffix, expected = unusual_images()[kind]
    colour_map = extract(served.client, save_picture(image, tmp_path / f"upload{suffix}"), ["color"], color_ratio=8)[1]
    assert np.abs(np.asarray(Image.open(colour_map).convert("RGB"))[32, 32].astype(int) - expected).max() <= 3


def test_the_server_keeps_serving_after_bad_uploads(served, tmp_path):
    for kind, (data, _) in BROKEN_IMAGES.items():
        (tmp_path / f"{len(kind)}.png").write_bytes(data)
        with pytest.raises(AppError):
            extract(served.client, tmp_path / f"{len(kind)}.png", ["canny"])
    (path,), _ = generate(served.client, seed=12)
    assert seed_of(path) == 12


@pytest.mark.parametrize("api_name", ["/control_generate", "/control_interpolate"])
def test_control_endpoints_refuse_a_bomb_as_either_picture(served, api_name, tmp_path):
    (tmp_path / "bomb.png").write_bytes(BROKEN_IMAGES["decompression bomb"][0])
    good = save_picture(Image.new("RGB", (32, 32), "red"), tmp_path / "good.png")
    arguments = dict(condition_types=["canny"], fit="crop", prompt="a", negative_prompt="", seed=1, steps=2, guidance=5.0,
                     width=64, height=64, scheduler="DDIM", alpha_mode="cap", canny_tuner="style")
    for first, second, what in ((tmp_path / "bomb.png", good, "the picture"), (good, tmp_path / "bomb.png", "the second picture")):
        with pytest.raises(AppError, match=f"^{what} is too large to open safely"):
            served.client.predict(handle_file(str(first)), second_picture=handle_file(str(second)), **arguments, api_name=api_name)


@pytest.mark.parametrize(
    "content, message",
    [
        (BROKEN_IMAGES["decompression bomb"][0], "too large to open safely"),
        (BROKEN_IMAGES["not an image"][0], "is not a PNG that can be read"),
        ("{not json", "metadata of this image is damaged"),
        (json.dumps({"request": {"prompt": "a", "steps": 10**6}, "index": 0, "model": "m"}), "damaged: steps must be"),
    ],
)
def test_png_settings_from_a_broken_png_are_one_clear_message(served, content, message, tmp_path):
    if isinstance(content, bytes):
        (tmp_path / "settings.png").write_bytes(content)
    else:
        info = PngInfo()
        info.add_text("scedit", content)
        Image.new("RGB", (8, 8)).save(tmp_path / "settings.png", pnginfo=info)
    with pytest.raises(AppError, match=message):
        served.client.predict(handle_file(str(tmp_path / "settings.png")), api_name="/read_png_settings")


# -- numbers, prompts and names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": -5}, "Value -5 is less than minimum value -1"),
        ({"seed": 1e30}, "greater than maximum value 4294967295"),
        ({"width": -64}, "less than minimum value 64"),
        ({"batch_size": 10**6}, "greater than maximum value 8"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"steps": None}, "Steps: None is not a valid value"),
        ({"guidance": "lots"}, "Guidance: 'lots' is not a valid value"),
        ({"scheduler": "../../PLMS"}, "is not in the list of choices"),
        ({"prompt": None}, "the prompt must be text"),
        ({"prompt": "a red circle " * 2000}, "characters long; the limit is 10,000"),
        ({"tuner_1": "../../etc/passwd"}, "no tuner named '../../etc/passwd'"),
        ({"tuner_1": "damaged"}, "metadata is a JSON list"),
    ],
)
def test_generate_refuses_bad_values_by_name(served, change, message):
    with pytest.raises(AppError, match=message):
        generate(served.client, **change)


@pytest.mark.parametrize(
    "api_name, values, message",
    [
        ("generate", {"seed": float("nan")}, "Seed (-1 = random): nan is not a valid value"),
        ("generate", {"guidance": float("nan")}, "guidance must be a number from 0 to 30, got nan"),
        ("generate", {"width": float("nan")}, "width must be a whole number, got nan"),
        ("generate", {"scale_1": float("nan"), "tuner_1": "style"}, "scale of style.safetensors must be a number from -4 to 4, got nan"),
        ("rho_schedule", {"rho_inner": float("nan")}, "ρ inner must be a number from 0 to 4, got nan"),
        ("skip_tuning_compare", {"rho_3": float("nan")}, "ρ of skip 3 must be a number from 0 to 4, got nan"),
        ("skip_tuning_compare", {"use_freeu": True, "s1": float("nan")}, "FreeU s1 must be a number from 0 to 4, got nan"),
        ("train_start", {"name": "nan-run", "learning_rate": float("nan")}, "learning rate must be a number"),
    ],
)
def test_nan_sent_over_plain_http_is_refused_by_name(served, api_name, values, message):
    assert message in error_of(call_raw(served, api_name, **{**FAST, "seed": 1, **values}))


def test_an_empty_prompt_generates_and_a_long_one_gets_a_notice(served):
    (path,), _ = generate(served.client, prompt="", seed=31)
    assert seed_of(path) == 31
    _, info = generate(served.client, prompt="a red circle " * 100)
    assert "only the first 77 are used" in info


@pytest.mark.parametrize(
    "kinds, fit, message",
    [(["../canny"], "crop", "is not in the list of choices"), (["canny"], "stretch", "is not in the list of choices"), ([], "crop", "choose at least one")],
)
def test_unknown_condition_names_are_refused(served, kinds, fit, message, tmp_path):
    picture = save_picture(Image.new("RGB", (32, 32), "red"), tmp_path / "p.png")
    with pytest.raises(AppError, match=message):
        served.client.predict(handle_file(str(picture)), kinds, fit, 64, 64, api_name="/extract_conditions")


@pytest.mark.parametrize("name, message", [("x" * 5000, "cannot be looked up as a local path"), ("../", "not a diffusers pipeline"),
                                           ("/etc/passwd", "only .safetensors"), ("", "enter a diffusers folder")])
def test_load_model_explains_odd_names_and_keeps_the_model(served, name, message):
    with pytest.raises(AppError, match=message):
        served.client.predict(name, "", api_name="/load_model")
    assert served.state.manager.info().num_skips == 12


# -- tuner files and names -------------------------------------------------------------------------------


def test_import_refuses_every_damaged_tuner_file_and_runs_no_pickle(served, tmp_path):
    before = sorted(p.name for p in served.library.iterdir())
    for name, (path, message) in served.tuner_files.items():
        if name == "other-layout":  # a sound tuner for another base is accepted (and listed as not fitting)
            continue
        with pytest.raises(AppError, match=message):
            served.client.predict([handle_file(str(path))], "", "", api_name="/import_tuner")
    (tmp_path / "pytorch_model.bin").write_bytes(code_running_pickle(served.marker))
    with pytest.raises(AppError, match="not a weights-only PyTorch checkpoint .*it was not unpickled"):
        served.client.predict([handle_file(str(tmp_path / "pytorch_model.bin"))], "", "", api_name="/import_tuner")
    assert sorted(p.name for p in served.library.iterdir()) == before and not served.marker.exists()


def test_a_damaged_file_in_the_library_does_not_break_the_listing(served):
    table, _ = served.client.predict(api_name="/list_tuners")
    rows = {row[0]: row for row in table["data"]}
    assert rows["damaged"][1] == "unreadable" and rows["style"][1] == "sc"
    assert "metadata is a JSON list" in served.client.predict("damaged", api_name="/tuner_details")["error"]


def test_hostile_names_write_nothing_outside_the_library(served, tmp_path):
    source = tmp_path / "style.safetensors"
    source.write_bytes((served.library / "style.safetensors").read_bytes())
    before = outside_writable(served.root)
    current = "style"
    for name in HOSTILE_NAMES:
        for api_name in ("/tuner_details", "/export_tuner", "/delete_tuner"):
            if name in ("", None):
                continue
            with pytest.raises(AppError, match="no tuner named"):
                served.client.predict(name, api_name=api_name)
        try:
            imported, _ = served.client.predict([handle_file(str(source))], name, "", api_name="/import_tuner")
            assert (served.library / f"{imported}.safetensors").is_file()
            served.client.predict(imported, api_name="/delete_tuner")
        except AppError as refused:
            assert "is not a usable tuner name" in str(refused)
        try:
            current, _ = served.client.predict(current, name, api_name="/rename_tuner")
        except AppError as refused:
            assert "is not a usable tuner name" in str(refused)
    served.client.predict(current, "style", api_name="/rename_tuner")
    assert outside_writable(served.root) == before
    assert not list(served.root.parent.glob("*escaped*")) and not list(served.root.parent.glob("*passwd*"))


# -- file access -----------------------------------------------------------------------------------------


def test_the_app_listens_on_localhost_without_a_share_link_and_serves_only_its_folders(served):
    assert served.launch["server_name"] == "127.0.0.1" and served.launch["share"] is False
    assert served.demo.share_url is None
    assert served.launch["allowed_paths"] == [str(served.library.resolve()), str((served.root / "outputs").resolve()),
                                              str(served.state.assets_dir.resolve())]
    assert app.build_parser().parse_args(["--share"]).share is True


def test_files_outside_the_library_outputs_and_assets_are_refused(served):
    (path,), _ = generate(served.client, seed=41)
    own_output = next((served.root / "outputs").glob("*seed41.png"))
    (served.root / "private.txt").write_text("secret")

    def status(path: Path | str) -> int:
        return httpx.get(f"{served.url}gradio_api/file={path}").status_code

    assert status(own_output) == 200 and status(served.library / "style.safetensors") == 200
    assert status(served.root / "private.txt") == 403
    assert status(served.library / ".." / "private.txt") == 403
    assert status("/etc/passwd") == 403
    assert status(Path(app.__file__).resolve()) == 403  # the working directory is not served either


def test_an_input_naming_a_server_file_is_refused_not_read(served):
    data = {"picture": {"path": str((served.root / "outputs").resolve() / "x.png"), "meta": {"_type": "gradio.FileData"}},
            "condition_types": ["canny"]}
    save_picture(Image.new("RGB", (8, 8), "red"), served.root / "outputs" / "x.png")
    stream = call_raw(served, "extract_conditions", **data)
    assert "event: error" in stream and "event: complete" not in stream


# -- memory ----------------------------------------------------------------------------------------------


def test_out_of_memory_is_one_message_and_the_app_keeps_serving(served, monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(served.state.manager.pipeline.unet, "forward", out_of_memory)
        with pytest.raises(AppError, match="out of GPU memory: lower the image size or the batch size"):
            generate(served.client, batch_size=8)
    assert emptied == [True]
    (path,), _ = generate(served.client, seed=51)
    assert seed_of(path) == 51


# -- concurrency -----------------------------------------------------------------------------------------


def wait_for(job, codes: set[Status], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while job.status().code not in codes:
        assert time.monotonic() < deadline, f"job stuck at {job.status().code}"
        time.sleep(0.05)


def test_eight_users_generating_during_a_training_each_get_their_own_image(served):
    train = dict(name="busy", kind="sc", condition="canny", data_source="Shapes world", shapes_style="stripes", files=None,
                 default_caption="", trigger="", remove_words="", steps=5000, learning_rate=1e-4, batch_size=1, resolution=64,
                 preview_every=0, seed=0)
    served.client.predict(**train, api_name="/train_start")
    try:
        deadline = time.monotonic() + 120
        while served.state.training.step == 0:  # generate while training steps run, not while it loads
            assert time.monotonic() < deadline and served.state.training.running, served.state.training.status()
            time.sleep(0.1)
        users = [Client(served.url, verbose=False, download_files=str(served.root / "downloads")) for _ in range(8)]
        jobs = [user.submit(**{**FAST, "seed": 1000 + i}, api_name="/generate") for i, user in enumerate(users)]
        results = [job.result(timeout=240) for job in jobs]
        status = served.client.predict(api_name="/training_status")[1]
        assert status.startswith("Training busy")  # it ran the whole time
    finally:
        served.client.predict(api_name="/train_cancel")
        served.state.training.wait(60)
    for i, (gallery, info) in enumerate(results):
        assert len(gallery) == 1 and seed_of(gallery[0]["image"]) == 1000 + i and f"seed {1000 + i}" in info
    assert not served.state.manager.lock.locked()


def test_a_cancelled_generation_releases_the_lock_for_the_next_request(served):
    first, second = (Client(served.url, verbose=False, download_files=str(served.root / "downloads")) for _ in range(2))
    running = first.submit(**{**FAST, "seed": 777_001, "steps": 150}, api_name="/generate")
    wait_for(running, {Status.PROCESSING, Status.PROGRESS})
    queued = second.submit(**{**FAST, "seed": 777_002}, api_name="/generate")
    wait_for(queued, {Status.IN_QUEUE})
    queued.cancel()
    running.cancel()
    (path,), _ = generate(served.client, seed=777_003)
    assert seed_of(path) == 777_003
    assert not served.state.manager.lock.locked()
    assert not list((served.root / "outputs").glob("*seed777002.png"))  # a cancelled request that waited never ran


def test_no_lock_is_left_held_by_any_thread(served):
    held = [t.name for t in threading.enumerate() if t.name.startswith("training") and t.is_alive()]
    assert held == [] and served.state.manager.lock.acquire(timeout=30)
    served.state.manager.lock.release()
