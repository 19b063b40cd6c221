"""Official SCEdit checkpoints, built here with SCEPTER's and ms-swift's own module structure.

The classes below mirror, line for line where it matters, scepter/modules/model/tuner/sce/scetuning.py
(CSCTuners, SCTuner), scetuning_component.py (SCEAdapter), the `_forward_control` loop of
scepter/modules/model/backbone/unet/unet_module.py, ldm_sce.py's `save_pretrained`, and
swift/tuners/scetuning/scetuning.py (SCETunerModule, decoder mode). Their `state_dict()` is what the
released checkpoints hold, so keys, shapes, order and prefixes are SCEPTER's, not a hand-written list.
"""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from tuners import (
    ControlCondition,
    CSCTuner,
    LayoutMismatchError,
    SCTuner,
    SkipEditor,
    SkipLayout,
    TunerFileError,
    TunerMetadata,
    export_official,
    import_official,
)
from tuners.official import official_state_dict
from tuners.reference_configs import REFERENCE_UNET_CONFIGS
from tuners.validation import UserInputError

# -- SCEPTER's modules ---------------------------------------------------------------------------


class SCEAdapter(nn.Module):
    """scetuning_component.SCEAdapter (adapter_weight=None)."""

    def __init__(self, dim, adapter_length, act_layer=nn.GELU, zero_init_last=True, use_bias=True):
        super().__init__()
        self.dim = dim
        self.ln1 = nn.Linear(dim, adapter_length, bias=use_bias)
        self.activate = act_layer()
        self.ln2 = nn.Linear(adapter_length, dim, bias=use_bias)
        nn.init.kaiming_uniform_(self.ln1.weight, a=math.sqrt(5))
        if zero_init_last:
            nn.init.zeros_(self.ln2.weight)
            nn.init.zeros_(self.ln2.bias)

    def forward(self, x, x_shortcut=None, use_shortcut=True, **kwargs):
        if x_shortcut is None:
            x_shortcut = x
        x_shape = x.shape
        if len(x_shape) == 4:
            b, d, h, w = x_shape
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, d)
        out = self.ln2(self.activate(self.ln1(x)))
        if len(x_shape) == 4:
            b, d, h, w = x_shape
            out = out.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        if use_shortcut:
            out = x_shortcut + out
        return out


class ScepterSCTuner(nn.Module):
    """scetuning.SCTuner: the op is held as `tuner_op`."""

    def __init__(self, dim, tuner_length):
        super().__init__()
        self.tuner_op = SCEAdapter(dim=dim, adapter_length=tuner_length)

    def forward(self, x, x_shortcut=None, use_shortcut=True, **kwargs):
        return self.tuner_op(x, x_shortcut, use_shortcut)


def zero_module(module):
    for p in module.parameters():
        p.detach().zero_()
    return module


class ScepterCSCTuners(nn.Module):
    """scetuning.CSCTuners built from a CONTROL_MODEL config plus INPUT_BLOCK_CHANS / INPUT_DOWN_FLAG."""

    def __init__(self, cfg):
        super().__init__()
        input_block_channels = cfg["INPUT_BLOCK_CHANS"]
        input_down_flag = cfg["INPUT_DOWN_FLAG"]
        pre_hint_in_channels = cfg.get("PRE_HINT_IN_CHANNELS", 3)
        pre_hint_out_channels = cfg.get("PRE_HINT_OUT_CHANNELS", 256)
        r = cfg.get("PRE_HINT_DIM_RATIO", 1.0)
        dense_hint_kernal = cfg.get("DENSE_HINT_KERNAL", 3)
        self.scale = cfg.get("SCALE", 1.0)
        ch = pre_hint_out_channels
        self.pre_hint_blocks = nn.Sequential(
            nn.Conv2d(pre_hint_in_channels, int(16 * r), 3, padding=1), nn.SiLU(),
            nn.Conv2d(int(16 * r), int(16 * r), 3, padding=1), nn.SiLU(),
            nn.Conv2d(int(16 * r), int(32 * r), 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(int(32 * r), int(32 * r), 3, padding=1), nn.SiLU(),
            nn.Conv2d(int(32 * r), int(96 * r), 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(int(96 * r), int(96 * r), 3, padding=1), nn.SiLU(),
            nn.Conv2d(int(96 * r), ch, 3, padding=1, stride=2),
        )
        self.dense_hint_blocks = nn.ModuleList([])
        stride_list = [2 if flag else 1 for flag in input_down_flag]
        for i, chan in enumerate(input_block_channels):
            padding = 1 if dense_hint_kernal == 3 else 0
            self.dense_hint_blocks.append(
                nn.Sequential(nn.SiLU(), zero_module(nn.Conv2d(ch, chan, dense_hint_kernal, padding=padding, stride=stride_list[i])))
            )
            ch = chan
        self.lsc_tuner_blocks = nn.ModuleList([])
        for chan in input_block_channels[::-1]:
            self.lsc_tuner_blocks.append(ScepterSCTuner(chan, int(chan * cfg.get("DOWN_RATIO", 1.0))))


def scepter_hints(csc_tuners, hints):
    """The first loop of `_forward_control`: dense hint features per controller, encoder order."""
    multi_hint_hs = []
    for csc, hint in zip(csc_tuners, hints):
        hint_h = csc.pre_hint_blocks(hint)
        hint_hs = []
        for dsh_blk in csc.dense_hint_blocks:
            hint_h = dsh_blk(hint_h)
            hint_hs.append(hint_h)
        multi_hint_hs.append(hint_hs)
    return multi_hint_hs


def scepter_skip(csc_tuners, multi_hint_hs, m_id, skip_h):
    """The body of `_forward_control`'s decoder loop for output block m_id (control_scale 1, no SC tuner)."""
    multi_control_h = 0
    for sc_id, csc in enumerate(csc_tuners):
        hint_h = multi_hint_hs[sc_id][::-1][m_id]
        control_h = csc.lsc_tuner_blocks[m_id](skip_h + hint_h, x_shortcut=hint_h)
        multi_control_h += csc.scale * control_h
    return skip_h + multi_control_h


def scepter_control(csc_tuners, hints, skips):
    """skip_h_new for every output block m (decoder order), the skips popped from the end as SCEPTER does."""
    multi_hint_hs = scepter_hints(csc_tuners, hints)
    hs = list(skips)
    return [scepter_skip(csc_tuners, multi_hint_hs, m_id, hs.pop()) for m_id in range(len(skips))]


class ScepterUNetStub(nn.Module):
    """The part of SCEPTER's DiffusionUNet a tuner touches: `lsc_identity` over the reversed skip channels."""

    def __init__(self, channels, down_ratio, swift_adapter=None):
        super().__init__()
        if swift_adapter is None:  # ldm_sce.LatentDiffusionSCETuning.construct_network
            self.lsc_identity = nn.ModuleList(ScepterSCTuner(c, int(c * down_ratio)) for c in channels[::-1])
        else:  # swift identity mode: each nn.Identity gets `scetuner_<adapter>` (SCETunerModule holds `tuner_op`)
            self.lsc_identity = nn.ModuleList(nn.Identity() for _ in channels)
            for module, c in zip(self.lsc_identity, channels[::-1]):
                setattr(module, f"scetuner_{swift_adapter}", ScepterSCTuner(c, int(c * down_ratio)))


class LatentDiffusionStub(nn.Module):
    """SCEPTER's LatentDiffusion holds the UNet as `model`: saved keys start with `model.`."""

    def __init__(self, unet):
        super().__init__()
        self.model = unet

    def save_pretrained(self, key_filter):
        return {k: v for k, v in self.state_dict().items() if key_filter in k}


def randomise(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def layout_of(architecture: str) -> SkipLayout:
    return SkipLayout.from_config(REFERENCE_UNET_CONFIGS[architecture])


def random_skips(layout: SkipLayout, latent: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, c, latent >> layout.downsamples_before(g), latent >> layout.downsamples_before(g), generator=generator)
        for g, c in enumerate(layout.channels)
    ]


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= tolerance, error


def controller_config(layout: SkipLayout, hint_channels: int, hint_ratio: float, kernel: int, scale: float = 1.0) -> dict:
    return {
        "NAME": "CSCTuners", "PRE_HINT_IN_CHANNELS": 3, "PRE_HINT_OUT_CHANNELS": hint_channels, "PRE_HINT_DIM_RATIO": hint_ratio,
        "DENSE_HINT_KERNAL": kernel, "SCALE": scale,
        "SC_TUNER_CFG": {"NAME": "SCTuner", "TUNER_NAME": "SCEAdapter", "DOWN_RATIO": 1.0},
        "INPUT_BLOCK_CHANS": list(layout.channels), "INPUT_DOWN_FLAG": list(layout.is_downsample),
    }


def write_controller(folder, csc: ScepterCSCTuners, config: dict, prefix: str = "0.", with_config: bool = True):
    """As the SCEPTER release lays a controller out: <folder>/0_SwiftSCETuning/{configuration.json, pytorch_model.bin}.

    `save_pretrained` of LatentDiffusionSCEControl is `control_blocks.state_dict()` (a ModuleList: `0.`)."""
    adapter = folder / "0_SwiftSCETuning"
    adapter.mkdir(parents=True)
    control_blocks = nn.ModuleList([csc])
    state = {prefix + k.removeprefix("0."): v for k, v in control_blocks.state_dict().items()}
    torch.save(state, adapter / "pytorch_model.bin")
    if with_config:
        public = {k: v for k, v in config.items() if k not in ("INPUT_BLOCK_CHANS", "INPUT_DOWN_FLAG")}
        (adapter / "configuration.json").write_text(json.dumps({"CONTROL_MODEL": public}))
    return folder


# -- CSC controllers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "hint_channels", "hint_ratio", "kernel", "scale", "prefix", "with_config"),
    [
        ("sd15", 256, 1.0, 1, 1.0, "0.", True),
        ("sd21", 256, 1.0, 1, 0.7, "model.", True),
        ("sdxl", 320, 2.0, 3, 1.0, "0.", False),  # no configuration.json: everything from the tensor shapes
        ("sdxl", 320, 2.0, 1, 1.0, "", True),
    ],
)
def test_official_controller_imports_and_matches_scepters_forward(tmp_path, architecture, hint_channels, hint_ratio, kernel, scale, prefix, with_config):
    layout = layout_of(architecture)
    config = controller_config(layout, hint_channels, hint_ratio, kernel, scale)
    torch.manual_seed(0)
    scepter = randomise(ScepterCSCTuners(config), seed=1)
    write_controller(tmp_path / "canny_control", scepter, config, prefix, with_config)

    tuner, metadata = import_official(tmp_path / "canny_control", layout, architecture)
    assert isinstance(tuner, CSCTuner) and metadata.kind == "csc" and metadata.condition_type == "canny"
    assert (metadata.hint_channels, metadata.hint_dim_ratio, metadata.kernel_size) == (hint_channels, hint_ratio, kernel)
    if with_config:
        assert metadata.scale == scale

    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    skips = random_skips(layout, 8, seed=3)
    with torch.no_grad():
        expected = scepter_control([scepter], [hint], skips)  # decoder order m
        features = tuner.condition_features(hint)
        for g, x in enumerate(skips):
            assert_relative_close(x + tuner(g, x, features[g]), expected[layout.num_skips - 1 - g])


def test_imported_controllers_in_the_editor_equal_scepters_multi_controller_sum(tiny_unet, tmp_path):
    """Two controllers through SkipEditor hooks on a real diffusers UNet give SCEPTER's skip_h_new."""
    layout = SkipLayout.from_unet(tiny_unet)
    configs = [controller_config(layout, 24, 0.5, 3), controller_config(layout, 16, 1.0, 1, scale=0.5)]
    torch.manual_seed(0)
    scepters = [randomise(ScepterCSCTuners(c), seed=s, std=0.2) for s, c in enumerate(configs)]
    tuners = [import_official(write_controller(tmp_path / f"c{i}", s, c), layout, "tiny")[0] for i, (s, c) in enumerate(zip(scepters, configs))]
    hints = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7 + i)) for i in range(2)]
    inputs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor(500), "encoder_hidden_states": torch.randn(1, 5, 16)}

    def scepter_hook(b):
        def hook(block, args, kwargs):
            multi_hint_hs = scepter_hints(scepters, hints)
            skips = kwargs["res_hidden_states_tuple"]
            new = [scepter_skip(scepters, multi_hint_hs, layout.num_skips - 1 - g, x) for g, x in zip(layout.up_block_skips[b], skips)]
            return args, {**kwargs, "res_hidden_states_tuple": tuple(new)}
        return hook

    with torch.no_grad():
        handles = [block.register_forward_pre_hook(scepter_hook(b), with_kwargs=True) for b, block in enumerate(tiny_unet.up_blocks)]
        expected = tiny_unet(**inputs).sample
        for handle in handles:
            handle.remove()
        plain = tiny_unet(**inputs).sample
        with SkipEditor(tiny_unet) as editor:
            editor.set_conditions([ControlCondition(t, h) for t, h in zip(tuners, hints)], alpha_mode="raw")  # SCEPTER sums them
            edited = tiny_unet(**inputs).sample
    assert_relative_close(edited, expected)
    assert (edited - plain).abs().max() > 1e-3  # the controllers do change the output


# -- SC tuners -----------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize(("writer", "down_ratio"), [("scepter", 1.0), ("swift", 0.1)])
def test_official_sc_tuner_imports_and_matches_scepters_forward(tmp_path, architecture, writer, down_ratio):
    layout = layout_of(architecture)
    adapter = "0_SwiftSCETuning" if writer == "swift" else None
    torch.manual_seed(0)
    model = randomise(LatentDiffusionStub(ScepterUNetStub(layout.channels, down_ratio, adapter)), seed=4)
    folder = tmp_path / "tuner" / "0_SwiftSCETuning"
    folder.mkdir(parents=True)
    if writer == "swift":  # SwiftModel.save_pretrained: only `scetuner_<adapter>` keys, adapter_model.safetensors
        save_file(model.save_pretrained(f"scetuner_{adapter}"), folder / "adapter_model.safetensors")
        dims = list(reversed(layout.channels))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"swift_type": "SCETuning", "dims": dims, "target_modules": r"model.lsc_identity\.\d+$", "tuner_mode": "identity", "down_ratio": down_ratio}
        ))
        assert f"model.lsc_identity.0.scetuner_{adapter}.tuner_op.ln1.weight" in model.save_pretrained("scetuner")
    else:  # LatentDiffusionSCETuning.save_pretrained: keys containing lsc_identity, pytorch_model.bin
        torch.save(model.save_pretrained("lsc_identity"), folder / "pytorch_model.bin")

    tuner, metadata = import_official(tmp_path / "tuner", layout, architecture)
    assert isinstance(tuner, SCTuner) and metadata.kind == "sc" and tuner.down_ratio == down_ratio
    skips = random_skips(layout, 8, seed=5)
    with torch.no_grad():
        for g, x in enumerate(skips):
            m = layout.num_skips - 1 - g
            block = model.model.lsc_identity[m]
            expected = getattr(block, f"scetuner_{adapter}")(block(x)) if adapter else block(x)
            assert_relative_close(tuner(g, x), expected)


def test_swift_diffusers_decoder_mode_tuner_equals_swifts_resnet_wrapping(tiny_unet, tmp_path):
    """swift's `_forward_decoder_mode`: the tuner edits the skip half of each up-block resnet's input."""
    layout = SkipLayout.from_unet(tiny_unet)
    dims, targets = [], []
    for b, block in enumerate(tiny_unet.up_blocks):
        for r in range(len(block.resnets)):
            dims.append(layout.channels[layout.up_block_skips[b][-1 - r]])
            targets.append((b, r))
    torch.manual_seed(0)
    ops = [randomise(ScepterSCTuner(d, int(d * 0.5)), seed=i, std=0.2) for i, d in enumerate(dims)]

    def wrapped(resnet, op, dim):
        original = resnet.forward

        def forward(hidden, *args, **kwargs):
            main, res = torch.split(hidden, hidden.shape[1] - dim, 1)
            return original(torch.cat([main, op(res)], dim=1), *args, **kwargs)

        return original, forward

    inputs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor(300), "encoder_hidden_states": torch.randn(1, 5, 16)}
    with torch.no_grad():
        originals = []
        for (b, r), op, dim in zip(targets, ops, dims):
            resnet = tiny_unet.up_blocks[b].resnets[r]
            original, resnet.forward = wrapped(resnet, op, dim)
            originals.append((resnet, original))
        expected = tiny_unet(**inputs).sample
        for resnet, original in originals:
            resnet.forward = original

        state = {f"unet.up_blocks.{b}.resnets.{r}.scetuner_default.tuner_op.{k}": v
                 for (b, r), op in zip(targets, ops) for k, v in op.tuner_op.state_dict().items()}
        save_file(state, tmp_path / "adapter_model.safetensors")
        tuner, _ = import_official(tmp_path / "adapter_model.safetensors", layout, "tiny")
        with SkipEditor(tiny_unet) as editor:
            editor.add_sc_tuner("swift", tuner)
            edited = tiny_unet(**inputs).sample
    assert_relative_close(edited, expected)


# -- export --------------------------------------------------------------------------------------


def test_export_writes_scepters_layout_and_imports_back_exactly(tmp_path):
    layout = layout_of("sdxl")
    csc = randomise(CSCTuner(layout, 3, "depth", hint_channels=320, hint_dim_ratio=2.0, scale=0.8), seed=6)
    sc = randomise(SCTuner(layout, 0.25), seed=7)
    for tuner in (csc, sc):
        metadata = TunerMetadata.describe(tuner, "sdxl", trigger_word="<x>", training={"steps": 3})
        folder = export_official(tuner, metadata, tmp_path / type(tuner).__name__)
        imported, imported_metadata = import_official(folder, layout, "sdxl")
        assert imported_metadata == metadata
        for (name, a), (_, b) in zip(tuner.state_dict().items(), imported.state_dict().items()):
            assert torch.equal(a, b), name

    # SCEPTER's own loader: CONTROL_MODEL + the base's channels build CSCTuners; the .bin loads strictly.
    adapter = tmp_path / "CSCTuner" / "0_SwiftSCETuning"
    config = json.loads((adapter / "configuration.json").read_text())["CONTROL_MODEL"]
    scepter = ScepterCSCTuners({**config, "INPUT_BLOCK_CHANS": list(layout.channels), "INPUT_DOWN_FLAG": list(layout.is_downsample)})
    state = torch.load(adapter / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["0." + k for k in scepter.state_dict()]  # SCEPTER's key order, `0.` prefix
    scepter.load_state_dict({k.removeprefix("0."): v for k, v in state.items()}, strict=True)
    hint, skips = torch.rand(1, 3, 64, 64), random_skips(layout, 8, seed=8)
    with torch.no_grad():
        expected, features = scepter_control([scepter], [hint], skips), csc.condition_features(hint)
        assert_relative_close(skips[0] + csc(0, skips[0], features[0]), expected[-1])
    swift_config = json.loads((tmp_path / "SCTuner" / "0_SwiftSCETuning" / "adapter_config.json").read_text())
    assert swift_config["dims"] == list(reversed(layout.channels)) and swift_config["tuner_mode"] == "identity"
    assert next(iter(official_state_dict(sc))) == "model.lsc_identity.0.scetuner_0_SwiftSCETuning.tuner_op.ln1.weight"


@pytest.mark.parametrize("options", [{"kernel_size": 3}, {"position_features": True}, {"gated": True}])
def test_an_sc_tuner_that_is_not_the_papers_is_refused_for_export_and_nothing_is_written(tmp_path, options):
    tuner = SCTuner(layout_of("sd15"), 0.1, **options)
    with pytest.raises(UserInputError, match="SCEPTER and swift cannot load them; only tuners trained with --kernel 1 --no-position-features --no-gated"):
        export_official(tuner, TunerMetadata.describe(tuner, "sd15"), tmp_path / "style")
    assert not any(tmp_path.iterdir())


def test_an_export_for_sd21_is_refused_for_sd15_although_the_skips_match(tmp_path):
    tuner = SCTuner(layout_of("sd21"), 0.1)
    export_official(tuner, TunerMetadata.describe(tuner, "sd21"), tmp_path / "sd21-style")
    with pytest.raises(LayoutMismatchError, match="adapter_model.safetensors was exported for sd21, but the base is sd15; load sd21 first"):
        import_official(tmp_path / "sd21-style", layout_of("sd15"), "sd15")


# -- bad input: one message naming the file and what was expected ---------------------------------


@pytest.fixture
def sd21_controller(tmp_path):
    layout = layout_of("sd21")
    config = controller_config(layout, 256, 1.0, 1)
    return write_controller(tmp_path / "sd21", ScepterCSCTuners(config), config), config


def test_a_controller_for_another_base_names_the_file_and_the_base_it_fits(sd21_controller):
    folder, _ = sd21_controller
    with pytest.raises(LayoutMismatchError, match=r"pytorch_model.bin was made for a UNet with 12 skips.*this UNet has 9 skips.*SD 1.5 or SD 2.1"):
        import_official(folder, layout_of("sdxl"), "sdxl")


def test_a_partial_controller_is_refused(sd21_controller):
    folder, _ = sd21_controller
    weights = folder / "0_SwiftSCETuning" / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.save({k: v for k, v in state.items() if "lsc_tuner_blocks.11." not in k}, weights)
    with pytest.raises(TunerFileError, match="pytorch_model.bin is incomplete: it has per-skip tuner ops for 11 of 12"):
        import_official(folder, layout_of("sd21"), "sd21")
    weights.write_bytes(weights.read_bytes()[:5000])  # a download cut short
    with pytest.raises(TunerFileError, match="pytorch_model.bin is not a weights-only PyTorch checkpoint or is incomplete"):
        import_official(folder, layout_of("sd21"), "sd21")


def test_unknown_keys_and_several_controllers_are_refused(sd21_controller):
    folder, _ = sd21_controller
    weights = folder / "0_SwiftSCETuning" / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "0.extra_head.weight": torch.zeros(1)}, weights)
    with pytest.raises(TunerFileError, match="1 keys that are not part of an SCEdit CSC tuner .first: 0.extra_head.weight"):
        import_official(folder, layout_of("sd21"), "sd21")
    torch.save({**state, **{"1." + k[2:]: v for k, v in state.items()}}, weights)
    with pytest.raises(TunerFileError, match="several controllers"):
        import_official(folder, layout_of("sd21"), "sd21")
    torch.save({**state, "epoch": 3}, weights)
    with pytest.raises(TunerFileError, match="pytorch_model.bin holds 1 entries that are not tensors .first: epoch.; expected tuner weights only"):
        import_official(folder, layout_of("sd21"), "sd21")


class _RunsCode:
    def __reduce__(self):
        return (print, ("ran",))


def test_a_pickle_that_is_not_weights_only_is_never_unpickled(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"0.pre_hint_blocks.0.weight": _RunsCode()}))
    with pytest.raises(TunerFileError, match="pytorch_model.bin is not a weights-only PyTorch checkpoint .*it was not unpickled"):
        import_official(tmp_path, layout_of("sd15"), "sd15")


def test_a_full_model_checkpoint_is_not_taken_for_a_tuner(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(TunerFileError, match="adapter_model.safetensors holds no SCEdit tuner keys"):
        import_official(tmp_path, layout_of("sd15"), "sd15")


# -- the hub: fetch into the library, offline message ---------------------------------------------


def fake_hub_snapshot(root, subfolder: str, layout: SkipLayout):
    """A local folder laid out like a snapshot of the release repository, holding one controller."""
    config = controller_config(layout, 256, 1.0, 1)
    write_controller(root / subfolder, randomise(ScepterCSCTuners(config), seed=9), config)
    return root


def test_fetch_downloads_the_release_folder_and_imports_it_with_its_base(tmp_path, monkeypatch):
    import huggingface_hub

    from scedit_ui.tuner_library import TunerLibrary

    subfolder = "controllable_model/SD2.1/canny_control"
    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(fake_hub_snapshot(tmp_path / "snapshot", subfolder, layout_of("sd21")))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    library = TunerLibrary(tmp_path / "library", shipped=tmp_path / "shipped")
    path = library.fetch(subfolder)  # no model loaded: the base comes from the folder name
    assert asked == {"repo_id": "scepter-studio/scepter_scedit", "allow_patterns": [f"{subfolder}/*"]}
    metadata = library.entry(path.stem).metadata
    assert path.name == "SD2.1-canny.safetensors"
    assert (metadata.kind, metadata.base_architecture, metadata.condition_type) == ("csc", "sd21", "canny")
    assert metadata.training["imported_from"] == f"hf://scepter-studio/scepter_scedit/{subfolder}"
    with pytest.raises(UserInputError, match="made for SD 2.1, but the base is SDXL; load SD 2.1 first"):
        library.fetch(subfolder, base_architecture="sdxl", name="other")
    assert library.names() == ["SD2.1-canny"]


def test_fetch_offline_says_what_to_download_and_where_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from scedit_ui import cli

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1 set
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = cli.main(["tuners", "fetch", "controllable_model/SD_XL1.0/depth_control", "--library", str(tmp_path / "library")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "the Hugging Face Hub is off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)" in lines[0]
    assert "hf download scepter-studio/scepter_scedit --include 'controllable_model/SD_XL1.0/depth_control/*'" in lines[0]
    assert "python -m scedit_ui tuners import scepter_scedit/controllable_model/SD_XL1.0/depth_control --base sdxl" in lines[0]
    assert not (tmp_path / "library").exists()


def test_cli_imports_and_exports_the_official_layout(tmp_path, capsys):
    from scedit_ui import cli

    layout = layout_of("sd15")
    config = controller_config(layout, 256, 1.0, 1)
    write_controller(tmp_path / "hed_control", randomise(ScepterCSCTuners(config), seed=10), config)
    library = str(tmp_path / "library")
    assert cli.main(["tuners", "import", str(tmp_path / "hed_control"), "--base", "sd15", "--library", library]) == 0
    assert cli.main(["tuners", "export", "hed_control", "--out", str(tmp_path / "out"), "--library", library]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "0_SwiftSCETuning").iterdir()) == ["configuration.json", "pytorch_model.bin"]
    exported = torch.load(tmp_path / "out" / "0_SwiftSCETuning" / "pytorch_model.bin", weights_only=True)
    original = torch.load(tmp_path / "hed_control" / "0_SwiftSCETuning" / "pytorch_model.bin", weights_only=True)
    assert list(exported) == list(original) and all(torch.equal(exported[k], original[k]) for k in original)
    assert cli.main(["tuners", "import", str(tmp_path / "hed_control"), "--base", "sdxl", "--name", "x", "--library", library]) == 2
    assert "cannot import hed_control: pytorch_model.bin was made for a UNet with 12 skips" in capsys.readouterr().err


def test_the_tuners_tab_fetches_for_the_loaded_base_and_exports_a_zip_in_scepters_layout(tiny_unet, tmp_path, monkeypatch):
    import zipfile
    from types import SimpleNamespace

    import huggingface_hub

    from scedit_ui.tuner_library import TunerLibrary
    from scedit_ui.ui.tuners_tab import export_official_zip, fetch_tuner

    layout = SkipLayout.from_unet(tiny_unet)
    subfolder = "my_release/depth_control"
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: str(fake_hub_snapshot(tmp_path / "snap", subfolder, layout)))
    manager = SimpleNamespace(editor=SimpleNamespace(layout=layout), family="tiny")
    state = SimpleNamespace(manager=manager, library=TunerLibrary(tmp_path / "library", shipped=tmp_path / "shipped"))
    path = fetch_tuner(state, "", subfolder, "", "")
    assert path.stem == "my_release-depth" and state.library.entry("my_release-depth").metadata.condition_type == "depth"
    with zipfile.ZipFile(export_official_zip(state, "my_release-depth")) as archive:
        assert sorted(archive.namelist()) == ["0_SwiftSCETuning/configuration.json", "0_SwiftSCETuning/pytorch_model.bin", "scedit_studio.json"]
