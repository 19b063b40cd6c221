"""Model-based conditions through the real extract path, with randomly initialised networks (no download)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from scedit_ui import conditions
from scedit_ui.conditions import ConditionRequest, annotators, extract, extract_condition
from tuners.validation import UserInputError

annotators._import_controlnet_aux()  # once, with its import-time warnings silenced

from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector  # noqa: E402
from controlnet_aux.midas import MidasDetector  # noqa: E402
from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel  # noqa: E402
from controlnet_aux.open_pose.body import Body  # noqa: E402
from controlnet_aux.open_pose.model import bodypose_model  # noqa: E402

SEGFORMER = annotators.SEGMENTATION_MODELS[0]
FAST = {"detect_resolution": 64}


def picture(width: int = 96, height: int = 72) -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, width // 2, height - 10), fill=(230, 200, 40))
    draw.rectangle((width // 2, height // 3, width - 8, height - 4), fill=(20, 20, 20))
    return image


def random_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fan-in-scaled random weights, without the slow default initialisers of a 120 M-parameter model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 1 / math.sqrt(parameter[0].numel()), generator=generator)
            elif name.endswith("weight"):
                parameter.fill_(1)
            else:
                parameter.normal_(0, 0.1, generator=generator)
        for name, buffer in module.named_buffers():
            buffer.fill_(1) if "running_var" in name else buffer.zero_()
    return module.eval()


def tiny_segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(
        num_labels=150, hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=32, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1]
    )
    return SegformerForSemanticSegmentation(config).eval()


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch, tmp_path):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(annotators.ANNOTATORS_ENV, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    annotators.clear_annotator_models()
    conditions.CONDITION_CACHE.clear()
    yield
    annotators.set_annotators_dir(None)
    annotators.clear_annotator_models()
    conditions.CONDITION_CACHE.clear()


@pytest.fixture(scope="module")
def hed_detector():
    torch.manual_seed(0)
    return HEDdetector(ControlNetHED_Apache2().eval())


@pytest.fixture(scope="module")
def midas_detector():
    with torch.device("meta"):
        network = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    return MidasDetector(random_init(network.to_empty(device="cpu")))


@pytest.fixture(scope="module")
def openpose_body():
    torch.manual_seed(0)
    body = Body.__new__(Body)  # Body() insists on a weight file
    body.model = bodypose_model().eval()
    return body


@pytest.mark.parametrize("fit", conditions.FIT_MODES)
def test_hed_with_random_weights_returns_the_generation_size(hed_detector, fit):
    annotators.register_annotator_model("hed", hed_detector)
    condition = extract_condition(picture(), "hed", (80, 56), fit=fit, **FAST)
    assert condition.mode == "RGB" and condition.size == (80, 56)
    assert np.asarray(condition).std() > 0


def test_hed_scribble_is_binary(hed_detector):
    annotators.register_annotator_model("hed", hed_detector)
    scribble = np.asarray(extract_condition(picture(), "hed", (64, 64), scribble=True, **FAST))
    assert set(np.unique(scribble)) <= {0, 255}


def test_model_based_extraction_is_deterministic_and_cached(hed_detector):
    annotators.register_annotator_model("hed", hed_detector)
    request = ConditionRequest("hed", (64, 48), params=FAST)
    uncached = extract(picture(), request, cache=None).image
    first = extract(picture(), request).image
    assert first.tobytes() == uncached.tobytes()
    assert extract(picture(), request).image is first


@pytest.mark.filterwarnings("ignore:Mapping deprecated model name")
def test_midas_depth_with_random_weights_returns_the_generation_size(midas_detector):
    annotators.register_annotator_model("midas", midas_detector)
    depth = extract_condition(picture(), "depth", (72, 64), fit="pad", **FAST)
    assert depth.mode == "RGB" and depth.size == (72, 64)
    array = np.asarray(depth)
    assert np.all(array[:, :, 0] == array[:, :, 1])  # a grey depth map
    assert array[:4].max() == 0  # the pad bars are black


def test_openpose_with_random_weights_returns_the_generation_size(openpose_body):
    annotators.register_annotator_model("openpose_body", openpose_body)
    pose = extract_condition(picture(), "pose", (64, 80), **FAST)
    assert pose.mode == "RGB" and pose.size == (64, 80)


def test_openpose_hands_need_their_own_weights(openpose_body, tmp_path):
    annotators.set_annotators_dir(tmp_path)  # (setting the folder forgets registered models: register after)
    annotators.register_annotator_model("openpose_body", openpose_body)
    with pytest.raises(UserInputError, match="hand_pose_model.pth"):
        extract_condition(picture(), "pose", (64, 64), include_hand=True, **FAST)


def test_segmentation_with_a_random_transformers_model_draws_ade_colours():
    annotators.register_annotator_model(SEGFORMER, annotators.SemanticSegmenter(tiny_segformer()))
    seg = extract_condition(picture(), "seg", (80, 64), **FAST)
    assert seg.mode == "RGB" and seg.size == (80, 64)
    palette = {tuple(colour) for colour in annotators.ade_palette()}
    assert {tuple(colour) for colour in np.asarray(seg).reshape(-1, 3)} <= palette


def test_weights_load_from_the_annotators_folder(tmp_path):
    torch.manual_seed(1)
    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
    tiny_segformer().save_pretrained(tmp_path / SEGFORMER)
    annotators.set_annotators_dir(tmp_path)
    assert extract_condition(picture(), "hed", (64, 64), **FAST).size == (64, 64)
    assert extract_condition(picture(), "seg", (64, 64), **FAST).size == (64, 64)
    assert isinstance(annotators.annotator_model("hed"), HEDdetector)


def test_weights_load_from_the_environment_folder(tmp_path, monkeypatch):
    tiny_segformer().save_pretrained(tmp_path / SEGFORMER)
    monkeypatch.setenv(annotators.ANNOTATORS_ENV, str(tmp_path))
    assert extract_condition(picture(), "seg", (48, 48), **FAST).size == (48, 48)


def test_the_segmenter_uses_the_image_processor_saved_with_its_weights(tmp_path):
    from transformers import SegformerImageProcessor

    tiny_segformer().save_pretrained(tmp_path / SEGFORMER)
    SegformerImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(tmp_path / SEGFORMER)
    annotators.set_annotators_dir(tmp_path)
    assert extract_condition(picture(), "seg", (64, 64), **FAST).size == (64, 64)
    assert list(annotators.annotator_model(SEGFORMER).processor.image_mean) == [0.5, 0.5, 0.5]


def test_a_corrupt_weight_file_is_reported_not_raised_as_a_traceback(tmp_path):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    annotators.set_annotators_dir(tmp_path)
    with pytest.raises(UserInputError, match=r"could not load annotator 'hed'.*ControlNetHED\.pth") as caught:
        extract_condition(picture(), "hed", (64, 64), **FAST)
    assert "\n" not in str(caught.value)
