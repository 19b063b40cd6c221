"""The tuners/ library on small random-weight UNets with SD block structure."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler
from safetensors.torch import save_file

from tuners import (
    ControlCondition,
    CSCTuner,
    LayoutMismatchError,
    SCTuner,
    SkipEditor,
    SkipLayout,
    SkipScaling,
    SkipShape,
    TunerFileError,
    TunerMetadata,
    composed_alphas,
    composed_step_ranges,
    interpolate_features,
    load_tuner,
    read_metadata,
    rho_schedule,
    save_tuner,
    tuner_from_config,
)
from tuners.__main__ import parameter_report
from tuners.editor import TEXTURE_BLUR_SIGMA, high_pass
from tuners.reference_configs import REFERENCE_UNET_CONFIGS
from tuners.sc_tuner import POSITION_CHANNELS, SkipAdapter, mid_width, position_features


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give a zero-initialised tuner non-zero weights, so that it visibly edits the skips."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return module


def run(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def condition_image(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# -- layout and parameter counts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "kind", "option", "expected"),
    [
        ("sd15", "sc", {"down_ratio": 1.0}, 19_680_000),
        ("sd15", "sc", {"down_ratio": 0.1}, 1_976_640),
        ("sd21", "csc", {"kernel_size": 1}, 28_824_400),
        ("sd21", "csc", {"kernel_size": 3}, 99_111_760),
    ],
)
def test_parameter_counts_match_the_paper(architecture, kind, option, expected):
    assert parameter_report(architecture, kind, **option)["total"] == expected


def test_info_cli_prints_json_with_integer_total():
    result = subprocess.run(
        [sys.executable, "-m", "tuners", "info", "--arch", "sd15", "--tuner", "sc", "--down-ratio", "0.1", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["total"] == 1_976_640 and isinstance(report["total"], int)


def test_csc_parts_match_the_design_counts():
    parts = parameter_report("sd21", "csc", kernel_size=1)["parts"]
    assert parts == {"hint encoder": 348_880, "dense convs": 8_795_520, "per-skip tuner ops": 19_680_000}


@pytest.mark.parametrize(
    ("architecture", "channels", "downsamples"),
    [
        ("sd15", (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280), {3, 6, 9}),
        ("sdxl", (320, 320, 320, 320, 640, 640, 640, 1280, 1280), {3, 6}),
    ],
)
def test_layout_is_derived_from_the_config(architecture, channels, downsamples):
    layout = SkipLayout.from_config(REFERENCE_UNET_CONFIGS[architecture])
    assert layout.channels == channels
    assert {g for g, down in enumerate(layout.is_downsample) if down} == downsamples
    # The decoder pops from the end: the first up block takes the innermost skips.
    assert layout.up_block_skips[0][-1] == len(channels) - 1
    assert sorted(g for skips in layout.up_block_skips for g in skips) == list(range(len(channels)))


# -- identity and exactness ----------------------------------------------------------------------


def test_zero_initialised_tuners_leave_the_output_unchanged(tiny_unet, unet_inputs):
    baseline = run(tiny_unet, unet_inputs)
    layout = SkipLayout.from_unet(tiny_unet)
    with SkipEditor(tiny_unet) as editor:
        editor.add_sc_tuner("style", SCTuner(layout))
        editor.set_conditions([ControlCondition(CSCTuner(layout), condition_image(0))])
        assert torch.equal(run(tiny_unet, unet_inputs), baseline)
        editor.add_sc_tuner("style", randomise(SCTuner(layout)))
        assert not torch.allclose(run(tiny_unet, unet_inputs), baseline)


def test_a_conditional_only_tuner_edits_the_second_half_of_a_guided_batch(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    tuner = randomise(SCTuner(layout))
    half = {k: v[1:] for k, v in unet_inputs.items() if k != "timestep"} | {"timestep": unet_inputs["timestep"]}
    plain = run(tiny_unet, unet_inputs)
    with SkipEditor(tiny_unet) as editor:
        editor.add_sc_tuner("style", tuner)
        tuned = run(tiny_unet, unet_inputs)
        editor.add_sc_tuner("style", tuner, conditional_only=True)
        assert torch.equal(run(tiny_unet, unet_inputs), tuned)  # no guidance: the whole batch is conditional
        editor.guidance_halves = True
        guided = run(tiny_unet, unet_inputs)
        assert torch.allclose(run(tiny_unet, half), tuned[1:], atol=1e-5)  # the same tuner on the half alone
    assert torch.allclose(guided[0], plain[0], atol=1e-5)  # unconditional half: as if no tuner
    assert torch.allclose(guided[1], tuned[1], atol=1e-5)  # conditional half: the tuner
    assert not torch.allclose(tuned[0], plain[0], atol=1e-3)


def test_texture_guidance_adds_the_high_passed_change_of_the_prompts_half_divided_by_the_guidance(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    tuner = randomise(SCTuner(layout, kernel_size=3))
    half = {k: v[1:] for k, v in unet_inputs.items() if k != "timestep"} | {"timestep": unet_inputs["timestep"]}
    plain = run(tiny_unet, unet_inputs)
    with SkipEditor(tiny_unet) as editor:
        editor.add_sc_tuner("style", tuner)
        tuned_prompt = run(tiny_unet, half)  # the tuner on the prompt's half alone
        editor.add_sc_tuner("style", tuner, scale=2.0, texture=True)
        editor.guidance_halves, editor.guidance_scale = True, 4.0
        guided = run(tiny_unet, unet_inputs)
        editor.guidance_halves = False  # no guidance: every row is the prompt's, and nothing is divided
        unguided = run(tiny_unet, unet_inputs)
        assert run(tiny_unet, half).shape == half["sample"].shape  # the extra rows never leave the UNet
    change = high_pass(tuned_prompt - plain[1:], TEXTURE_BLUR_SIGMA)
    assert change.abs().max() > 1e-3
    assert torch.allclose(guided[0], plain[0], atol=1e-5)  # the unconditional half: the base's
    assert torch.allclose(guided[1:], plain[1:] + 2.0 / 4.0 * change, atol=1e-5)
    both = {k: v for k, v in unet_inputs.items()}
    with SkipEditor(tiny_unet) as editor:
        editor.add_sc_tuner("style", tuner)
        tuned_both = run(tiny_unet, both)
    assert torch.allclose(unguided, plain + 2.0 * high_pass(tuned_both - plain, TEXTURE_BLUR_SIGMA), atol=1e-5)


def test_the_high_pass_keeps_fine_detail_and_removes_flat_colour():
    flat = torch.full((1, 4, 16, 16), 3.0)
    assert high_pass(flat, 1.5).abs().max() < 1e-5  # a colour: nothing passes
    stripes = torch.tensor([1.0, -1.0]).repeat(8).view(1, 1, 1, 16).expand(1, 4, 16, 16)
    assert torch.allclose(high_pass(stripes, 1.5)[..., 4:-4], stripes[..., 4:-4], atol=0.05)  # period 2: all of it
    assert high_pass(torch.randn(1, 4, 5, 3), 1.5).shape == (1, 4, 5, 3)  # any latent size


def test_a_tuner_cannot_be_both_style_and_texture_guidance(tiny_unet):
    with SkipEditor(tiny_unet) as editor, pytest.raises(ValueError, match="not both"):
        editor.add_sc_tuner("style", SCTuner(SkipLayout.from_unet(tiny_unet)), conditional_only=True, texture=True)


def test_a_3x3_sc_tuner_sees_neighbours_and_round_trips_its_kernel(tiny_unet, unet_inputs, tmp_path):
    layout = SkipLayout.from_unet(tiny_unet)
    tuner = randomise(SCTuner(layout, 0.5, kernel_size=3))
    x = torch.zeros(1, layout.channels[0], 6, 6)
    x[..., 3, 3] = 1.0
    delta = tuner.delta(0, x) - tuner.delta(0, torch.zeros_like(x))
    assert delta[..., 2, 2].abs().max() > 0 and delta[..., 0, 0].abs().max() == 0  # one pixel reaches its neighbours only
    save_tuner(tuner, tmp_path / "k3.safetensors", TunerMetadata.describe(tuner, "tiny"))
    loaded, metadata = load_tuner(tmp_path / "k3.safetensors")
    assert (metadata.kernel_size, loaded.config.kernel_size) == (3, 3)
    assert torch.equal(loaded.delta(0, x), tuner.delta(0, x))
    with pytest.raises(ValueError, match="kernel_size must be 1 or 3"):
        SCTuner(layout, kernel_size=5)


def test_position_features_let_an_sc_adapter_tell_places_apart_and_round_trip(tiny_unet, tmp_path):
    layout = SkipLayout.from_unet(tiny_unet)
    plain = SCTuner(layout, 0.5, kernel_size=3)
    tuner = SCTuner(layout, 0.5, kernel_size=3, position_features=True)
    added = sum(p.numel() for p in tuner.parameters()) - sum(p.numel() for p in plain.parameters())
    assert added == sum(POSITION_CHANNELS * mid_width(c, 0.5) * 9 for c in layout.channels)  # ln1 reads 64 more inputs
    x = torch.ones(1, layout.channels[-1], 5, 7)  # the same skip value everywhere, at the deepest skip
    assert tuner.delta(len(layout.channels) - 1, x).abs().max() == 0  # zero-initialised: adds nothing untrained
    randomise(tuner)
    delta = tuner.delta(len(layout.channels) - 1, x)
    assert (delta[..., 2, 3] - delta[..., 2, 4]).abs().max() > 1e-4  # one value, two places, two outputs
    assert delta.shape == x.shape
    save_tuner(tuner, tmp_path / "where.safetensors", TunerMetadata.describe(tuner, "tiny"))
    loaded, metadata = load_tuner(tmp_path / "where.safetensors")
    assert metadata.position_features is True and loaded.config.position_features
    assert torch.equal(loaded.delta(0, torch.ones(1, layout.channels[0], 4, 4)), tuner.delta(0, torch.ones(1, layout.channels[0], 4, 4)))


def test_a_gated_sc_adapter_multiplies_two_maps_of_the_skip_starts_at_zero_and_round_trips(tiny_unet, tmp_path):
    layout = SkipLayout.from_unet(tiny_unet)
    plain = SCTuner(layout, 0.5, kernel_size=3, position_features=True)
    tuner = SCTuner(layout, 0.5, kernel_size=3, position_features=True, gated=True)
    added = sum(p.numel() for p in tuner.parameters()) - sum(p.numel() for p in plain.parameters())
    assert added == sum(p.numel() for a in plain.adapters for p in a.ln1.parameters())  # W_gate: the shape of W_down
    x = torch.randn(2, layout.channels[0], 6, 6)
    assert tuner.delta(0, x).abs().max() == 0  # W_up starts at zero: adds nothing untrained
    randomise(tuner)
    adapter = tuner.adapters[0]
    with torch.no_grad():  # the product is one term: the gate's sign flips the output, a zero gate removes it
        adapter.ln2.bias.zero_()
        gated = tuner.delta(0, x)
        adapter.gate.weight.neg_(), adapter.gate.bias.neg_()
        assert gated.abs().max() > 0 and torch.allclose(tuner.delta(0, x), -gated, atol=1e-6)
        adapter.gate.weight.zero_(), adapter.gate.bias.zero_()
        assert tuner.delta(0, x).abs().max() == 0
    randomise(tuner)
    save_tuner(tuner, tmp_path / "gated.safetensors", TunerMetadata.describe(tuner, "tiny"))
    loaded, metadata = load_tuner(tmp_path / "gated.safetensors")
    assert metadata.gated is True and loaded.config == tuner.config
    assert torch.equal(loaded.delta(0, x), tuner.delta(0, x))


def test_position_features_are_sinusoids_at_each_skip_pixels_place_in_the_latent():
    fine = position_features(8, 8, 1, torch.device("cpu"), torch.float32)
    coarse = position_features(4, 4, 2, torch.device("cpu"), torch.float32)
    assert fine.shape == (1, POSITION_CHANNELS, 8, 8)
    assert torch.allclose(fine[0, 0, 0, 0], torch.sin(torch.tensor(2 * torch.pi * 0.5 / 2.0)), atol=1e-6)
    # first channels: sine and cosine along x, period 2 latent pixels; a pixel of a skip at half size is centred at 1.0
    assert torch.allclose(coarse[0, 1, 0, 0], torch.cos(torch.tensor(2 * torch.pi * 1.0 / 2.0)), atol=1e-6)


def test_position_features_are_made_once_and_a_map_from_inference_mode_serves_training():
    first = position_features(6, 6, 1, torch.device("cpu"), torch.float32)
    assert position_features(6, 6, 1, torch.device("cpu"), torch.float32) is first
    adapter = SkipAdapter(4, 4, kernel_size=3, position_stride=1)
    nn.init.normal_(adapter.ln2.weight)
    with torch.inference_mode():
        adapter(torch.randn(1, 4, 5, 5))  # the 5x5 map is made here first
    adapter(torch.randn(2, 4, 5, 5)).pow(2).sum().backward()
    assert adapter.ln1.weight.grad is not None and adapter.ln1.weight.grad.abs().sum() > 0


def test_a_fresh_csc_tuner_passes_a_sparse_condition_to_every_skip_at_a_trainable_scale(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    torch.manual_seed(0)
    edges = (torch.rand(4, 3, 64, 64) < 0.02).float()  # as sparse as a canny map
    tuner = CSCTuner(layout)
    tuner.calibrate_hint_encoder(edges)
    hint = tuner.pre_hint_blocks(edges)
    assert 0.5 < hint.std().item() < 2.0
    assert (hint - tuner.pre_hint_blocks(edges.roll(1, 0))).abs().mean() > 0.1  # it depends on the image
    baseline = run(tiny_unet, unet_inputs)
    with SkipEditor(tiny_unet) as editor:  # still the identity: c_0 starts at zero, and with it every c_g
        editor.set_conditions([ControlCondition(tuner, edges[:1])])
        assert torch.equal(run(tiny_unet, unet_inputs), baseline)
    with torch.no_grad():  # once c_0 moves, the deepest skip sees the image too (an all-zero cascade gives 0)
        nn.init.normal_(tuner.dense_hint_blocks[0][1].weight, std=0.1)
        deepest = tuner.condition_features(edges)[-1]
    assert (deepest - deepest.roll(1, 0)).abs().mean() > 1e-6


def test_rho_of_one_leaves_the_output_unchanged(tiny_unet, unet_inputs):
    baseline = run(tiny_unet, unet_inputs)
    with SkipEditor(tiny_unet) as editor:
        editor.set_skip_scaling(SkipScaling.linear(12, 1.0, 1.0))
        assert torch.equal(run(tiny_unet, unet_inputs), baseline)


def test_rho_on_one_skip_matches_a_hand_built_reference(tiny_unet, unet_inputs):
    # Skip g = 4 (second resnet of down block 1) is popped by up block 2 as the middle of its 3 skips.
    def scale_skip_4(block, args, kwargs):
        skips = list(kwargs["res_hidden_states_tuple"])
        skips[1] = skips[1] * 0.5
        return args, {**kwargs, "res_hidden_states_tuple": tuple(skips)}

    handle = tiny_unet.up_blocks[2].register_forward_pre_hook(scale_skip_4, with_kwargs=True)
    reference = run(tiny_unet, unet_inputs)
    handle.remove()

    with SkipEditor(tiny_unet) as editor:
        editor.set_skip_scaling(SkipScaling.linear(12, overrides={4: 0.5}))
        edited = run(tiny_unet, unet_inputs)
    assert torch.equal(edited, reference)
    assert not torch.allclose(edited, run(tiny_unet, unet_inputs))


def test_rho_schedule_is_linear_from_outer_to_inner():
    assert rho_schedule(12, 1.0, 0.78) == pytest.approx([1.0 - 0.02 * g for g in range(12)])


def test_detach_restores_exact_outputs(tiny_unet, unet_inputs):
    baseline = run(tiny_unet, unet_inputs)
    layout = SkipLayout.from_unet(tiny_unet)
    editor = SkipEditor(tiny_unet).attach()
    editor.add_sc_tuner("style", randomise(SCTuner(layout)))
    editor.set_conditions([ControlCondition(randomise(CSCTuner(layout), 1), condition_image(0))])
    editor.set_skip_scaling(SkipScaling.linear(12, 1.0, 0.7))
    assert not torch.allclose(run(tiny_unet, unet_inputs), baseline)
    editor.detach()
    assert torch.equal(run(tiny_unet, unet_inputs), baseline)
    assert not tiny_unet._forward_pre_hooks and not any(b._forward_pre_hooks for b in tiny_unet.up_blocks)


def test_tuple_passed_positionally_is_edited(tiny_unet):
    block = tiny_unet.up_blocks[0]  # UpBlock2D(hidden_states, res_hidden_states_tuple, temb)
    hidden = torch.randn(1, 32, 1, 1)
    skips = tuple(torch.randn(1, 32, 1, 1) for _ in range(3))
    temb = torch.randn(1, 8 * 4)  # time embedding width: 4 × block_out_channels[0]
    with torch.no_grad():
        reference = block(hidden, tuple(s * 0.5 for s in skips), temb)
        with SkipEditor(tiny_unet) as editor:
            editor.set_skip_scaling(SkipScaling((0.5,) * 12))
            assert torch.equal(block(hidden, skips, temb), reference)


# -- training mode -------------------------------------------------------------------------------


def _training_step(unet, editor, inputs):
    parameters = editor.train_mode(True)
    loss = unet(**inputs).sample.square().mean()
    loss.backward()
    return parameters


def test_gradients_reach_only_tuner_parameters(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    with SkipEditor(tiny_unet) as editor:
        editor.add_sc_tuner("style", randomise(SCTuner(layout, 0.5)))
        editor.set_conditions([ControlCondition(randomise(CSCTuner(layout), 1), condition_image(0))])
        parameters = _training_step(tiny_unet, editor, unet_inputs)
    assert len(parameters) == sum(1 for m in editor.tuner_modules() for _ in m.parameters())
    assert all(p.grad is not None for p in parameters)
    assert any(p.grad.abs().sum() > 0 for p in parameters)
    assert all(p.grad is None and not p.requires_grad for p in tiny_unet.parameters())
    assert torch.is_grad_enabled()


def _count_saved_tensors(unet, step):
    """Tensors saved for backward while inside the encoder (down blocks, mid block) vs anywhere."""
    inside = {"encoder": False}
    counts = {"encoder": 0, "total": 0}
    handles = []
    for block in [*unet.down_blocks, unet.mid_block]:
        handles.append(block.register_forward_pre_hook(lambda *_: inside.update(encoder=True)))
        handles.append(block.register_forward_hook(lambda *_: inside.update(encoder=False)))

    def pack(tensor):
        counts["total"] += 1
        counts["encoder"] += inside["encoder"]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for handle in handles:
        handle.remove()
    return counts


def test_no_tensor_is_saved_for_backward_inside_the_encoder_in_training_mode(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    editor = SkipEditor(tiny_unet).attach()
    editor.add_sc_tuner("style", randomise(SCTuner(layout)))
    counts = _count_saved_tensors(tiny_unet, lambda: _training_step(tiny_unet, editor, unet_inputs))
    assert counts["encoder"] == 0 and counts["total"] > 0

    # Full fine-tuning (the control): the encoder does save tensors, so the count above can fail.
    editor.detach()
    tiny_unet.requires_grad_(True)
    counts = _count_saved_tensors(tiny_unet, lambda: tiny_unet(**unet_inputs).sample.mean().backward())
    assert counts["encoder"] > 0


# -- conditions ----------------------------------------------------------------------------------


def _cfg_generation(unet, steps: int = 20, guidance: float = 5.0) -> torch.Tensor:
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 16, generator=generator)  # [unconditional; conditional]
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, cond = unet(torch.cat([latents, latents]), t, encoder_hidden_states=text).sample.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents


def test_hint_encoder_runs_once_for_a_20_step_cfg_generation(tiny_unet):
    tuner = randomise(CSCTuner(SkipLayout.from_unet(tiny_unet)))
    calls = []
    tuner.pre_hint_blocks.register_forward_hook(lambda *_: calls.append(1))
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(tuner, condition_image(0))])
        _cfg_generation(tiny_unet)
        assert len(calls) == 1
        editor.cache.clear()
        _cfg_generation(tiny_unet)
    assert len(calls) == 2


def test_two_conditions_with_alpha_one_and_zero_equal_the_single_condition(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    canny, colour = randomise(CSCTuner(layout, 1, "canny"), 1), randomise(CSCTuner(layout, 3, "colour"), 2)
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(canny, condition_image(0))])
        single = run(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(canny, condition_image(0), 1.0), ControlCondition(colour, condition_image(1), 0.0)])
        assert torch.equal(run(tiny_unet, unet_inputs), single)
        editor.set_conditions([ControlCondition(canny, condition_image(0), 1.0), ControlCondition(colour, condition_image(1), 1.0)])
        assert not torch.allclose(run(tiny_unet, unet_inputs), single)


def test_normalised_alpha_divides_by_the_sum(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    tuner, image = randomise(CSCTuner(layout), 1), condition_image(0)
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(tuner, image, 1.0)])
        single = run(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(tuner, image, 2.0), ControlCondition(tuner, image, 2.0)], alpha_mode="normalise")
        torch.testing.assert_close(run(tiny_unet, unet_inputs), single)
        with pytest.raises(ValueError, match="sum to 0"):
            editor.set_conditions([ControlCondition(tuner, image, 0.0)], alpha_mode="normalise")


def test_composed_conditions_are_capped_on_request_and_as_set_by_default(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    first, second = randomise(CSCTuner(layout), 1), randomise(CSCTuner(layout), 2)
    a, b = condition_image(0), condition_image(1)
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(first, a, 0.6), ControlCondition(second, b, 0.6)], alpha_mode="raw")
        at_0_6 = run(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(first, a, 1.0), ControlCondition(second, b, 1.0)], alpha_mode="raw")
        at_1 = run(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(first, a, 1.0), ControlCondition(second, b, 1.0)], alpha_mode="cap")
        torch.testing.assert_close(run(tiny_unet, unet_inputs), at_0_6)
        assert not torch.allclose(at_0_6, at_1)
        editor.set_conditions([ControlCondition(first, a, 1.0), ControlCondition(second, b, 1.0)])  # staged: two edge maps
        torch.testing.assert_close(run(tiny_unet, unet_inputs), at_1)
        with pytest.raises(ValueError, match="α mode must be one of staged, cap, normalise, raw"):
            editor.set_conditions([ControlCondition(first, a)], alpha_mode="sum")


def test_staged_composition_ends_an_edge_condition_beside_colour_at_0_85_of_the_steps(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    canny, colour = randomise(CSCTuner(layout, condition_type="canny"), 1), randomise(CSCTuner(layout, condition_type="color"), 2)
    both = [ControlCondition(canny, condition_image(0)), ControlCondition(colour, condition_image(1))]
    with SkipEditor(tiny_unet) as editor:
        outputs = {}
        for mode in ("staged", "raw"):
            editor.set_conditions(both, alpha_mode=mode)
            for step in (16, 17):  # of 20: 0.80-0.85 and 0.85-0.90
                editor.set_step(step, 20)
                outputs[mode, step] = run(tiny_unet, unet_inputs)
        assert editor.applied_step_ranges == [(0.0, 1.0), (0.0, 1.0)]  # raw
        editor.set_conditions(both)
        assert editor.applied_step_ranges == [(0.0, 0.85), (0.0, 1.0)]
        editor.set_conditions(both[1:])
        editor.set_step(17, 20)
        colour_alone = run(tiny_unet, unet_inputs)
    torch.testing.assert_close(outputs["staged", 16], outputs["raw", 16])  # both still on
    torch.testing.assert_close(outputs["staged", 17], colour_alone)  # the edge condition has let go
    assert not torch.allclose(outputs["raw", 17], colour_alone)


@pytest.mark.parametrize(
    ("alphas", "mode", "applied"),
    [
        ((1.0, 1.0), "cap", (0.6, 0.6)),
        ((2.0, 1.0), "cap", (0.8, 0.4)),  # ratios kept
        ((0.5, 0.5), "cap", (0.5, 0.5)),  # under the cap: as set
        ((1.5,), "cap", (1.5,)),  # one condition keeps its α
        ((1.5, 0.0), "cap", (1.5, 0.0)),  # a switched-off condition does not count
        ((1.0, 1.0, 1.0), "cap", (0.4, 0.4, 0.4)),
        ((2.0, 2.0), "normalise", (0.5, 0.5)),
        ((0.5,), "normalise", (1.0,)),
        ((1.0, 1.0), "raw", (1.0, 1.0)),
    ],
)
def test_composed_alphas(alphas, mode, applied):
    assert composed_alphas(alphas, mode) == pytest.approx(applied)


@pytest.mark.parametrize(
    ("kinds", "alphas", "ranges", "mode", "applied"),
    [
        (("canny", "color"), (1.0, 1.0), ((0.0, 1.0), (0.0, 1.0)), "staged", ((0.0, 0.85), (0.0, 1.0))),
        (("color", "sketch", "inpaint"), (1.0, 0.5, 1.0), ((0.0, 1.0),) * 3, "staged", ((0.0, 1.0), (0.0, 0.85), (0.0, 1.0))),
        (("canny", "color"), (1.0, 1.0), ((0.0, 0.6), (0.2, 1.0)), "staged", ((0.0, 0.6), (0.2, 1.0))),  # already ends before
        (("canny", "color"), (1.0, 1.0), ((0.9, 1.0), (0.0, 1.0)), "staged", ((0.9, 1.0), (0.0, 1.0))),  # starts after: as set
        (("canny", "color"), (1.0, 0.0), ((0.0, 1.0), (0.0, 1.0)), "staged", ((0.0, 1.0), (0.0, 1.0))),  # colour switched off
        (("canny", "hed"), (1.0, 1.0), ((0.0, 1.0), (0.0, 1.0)), "staged", ((0.0, 1.0), (0.0, 1.0))),  # nothing sets colours
        (("canny", "depth"), (1.0, 1.0), ((0.0, 1.0), (0.0, 1.0)), "staged", ((0.0, 1.0), (0.0, 1.0))),
        (("canny", "color"), (1.0, 1.0), ((0.0, 1.0), (0.0, 1.0)), "raw", ((0.0, 1.0), (0.0, 1.0))),
        (("canny", "color"), (1.0, 1.0), ((0.0, 1.0), (0.0, 1.0)), "cap", ((0.0, 1.0), (0.0, 1.0))),
    ],
)
def test_composed_step_ranges(kinds, alphas, ranges, mode, applied):
    assert composed_step_ranges(kinds, alphas, ranges, mode) == list(applied)


def test_step_range_switches_a_condition_on_and_off(tiny_unet, unet_inputs):
    plain = run(tiny_unet, unet_inputs)
    with SkipEditor(tiny_unet) as editor:
        tuner = randomise(CSCTuner(SkipLayout.from_unet(tiny_unet)))
        editor.set_conditions([ControlCondition(tuner, condition_image(0), step_range=(0.6, 1.0))])
        editor.set_step(2, 10)  # steps 0.2-0.3 of sampling: not yet active
        assert torch.equal(run(tiny_unet, unet_inputs), plain)
        editor.set_step(9, 10)  # 0.9-1.0: active
        assert not torch.allclose(run(tiny_unet, unet_inputs), plain)


def test_condition_features_broadcast_over_the_batch(tiny_unet, unet_inputs):
    layout = SkipLayout.from_unet(tiny_unet)
    single_inputs = {k: v[:1] if v.ndim else v for k, v in unet_inputs.items()}
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(randomise(CSCTuner(layout)), condition_image(0))])
        batched = run(tiny_unet, unet_inputs)
        torch.testing.assert_close(batched[:1], run(tiny_unet, single_inputs))


def test_interpolation_blends_between_the_two_condition_images(tiny_unet):
    tuner = randomise(CSCTuner(SkipLayout.from_unet(tiny_unet)))
    a, b = condition_image(0), condition_image(1)
    with torch.no_grad():
        fa, fb = tuner.condition_features(a), tuner.condition_features(b)
        for got, want in zip(interpolate_features(fa, fb, 1.0), fb):
            torch.testing.assert_close(got, want)
        halfway = interpolate_features(fa, fb, 0.5)
        torch.testing.assert_close(halfway[5], (fa[5] + fb[5]) / 2)


def test_interpolated_condition_at_blend_one_equals_the_second_image(tiny_unet, unet_inputs):
    tuner = randomise(CSCTuner(SkipLayout.from_unet(tiny_unet)))
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(tuner, condition_image(1))])
        second = run(tiny_unet, unet_inputs)
        editor.set_conditions([ControlCondition(tuner, condition_image(0), blend_image=condition_image(1), blend=1.0)])
        torch.testing.assert_close(run(tiny_unet, unet_inputs), second)


def test_wrong_condition_size_is_reported(tiny_unet, unet_inputs):
    tuner = randomise(CSCTuner(SkipLayout.from_unet(tiny_unet)))
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(tuner, torch.rand(1, 3, 32, 32))])
        with pytest.raises(ValueError, match="condition image is 32×32 px but the picture is"):
            run(tiny_unet, unet_inputs)


def test_a_x4_vae_takes_conditions_at_the_pictures_size_scaled_to_the_hint_encoders_x8(tiny_unet, unet_inputs):
    tuner = randomise(CSCTuner(SkipLayout.from_unet(tiny_unet)))
    picture = torch.rand(1, 3, 32, 32)  # latents are 8×8: the picture of a x4 VAE
    with SkipEditor(tiny_unet, pixels_per_latent=4) as editor:
        editor.set_conditions([ControlCondition(tuner, picture)])
        x4 = run(tiny_unet, unet_inputs)
    upscaled = torch.nn.functional.interpolate(picture, size=(64, 64), mode="bilinear", antialias=True)
    with SkipEditor(tiny_unet) as editor:
        editor.set_conditions([ControlCondition(tuner, upscaled)])
        torch.testing.assert_close(x4, run(tiny_unet, unet_inputs))
    assert not torch.allclose(x4, run(tiny_unet, unet_inputs))  # detached: the condition did change the output


# -- files ---------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tiny_unet, unet_inputs, tmp_path):
    layout = SkipLayout.from_unet(tiny_unet)
    for tuner in (randomise(SCTuner(layout, 0.5)), randomise(CSCTuner(layout, 3, "depth"))):
        metadata = TunerMetadata.describe(tuner, "tiny", trigger_word="<sce>", training={"steps": 10})
        path = tmp_path / f"{type(tuner).__name__}.safetensors"
        save_tuner(tuner, path, metadata)
        loaded, loaded_metadata = load_tuner(path, layout)
        assert loaded_metadata == metadata
        assert type(loaded) is type(tuner)
        for (name, a), (_, b) in zip(tuner.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    assert loaded_metadata.kind == "csc" and loaded_metadata.kernel_size == 3 and loaded_metadata.condition_type == "depth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CSCTuner.safetensors", "SCTuner.safetensors"]


def test_a_saved_tuner_has_the_mode_of_any_new_file_not_a_private_one(tiny_unet, tmp_path):
    old_umask = os.umask(0o022)
    try:
        tuner = SCTuner(SkipLayout.from_unet(tiny_unet))
        save_tuner(tuner, tmp_path / "style.safetensors", TunerMetadata.describe(tuner, "tiny"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "style.safetensors").stat().st_mode) == 0o644


def test_layout_mismatch_names_both_layouts(tiny_unet, tmp_path):
    sdxl_layout = SkipLayout.from_config(REFERENCE_UNET_CONFIGS["sdxl"])
    tuner = SCTuner(sdxl_layout, 0.01)
    save_tuner(tuner, tmp_path / "xl.safetensors", TunerMetadata.describe(tuner, "sdxl"))
    unet_layout = SkipLayout.from_unet(tiny_unet)
    with pytest.raises(LayoutMismatchError) as error:
        load_tuner(tmp_path / "xl.safetensors", unet_layout)
    assert "9 skips [320,320,320,320↓" in str(error.value) and "12 skips [8,8,8,8↓" in str(error.value)
    with pytest.raises(LayoutMismatchError):
        SkipEditor(tiny_unet).add_sc_tuner("xl", tuner)


def test_files_that_are_not_tuners_are_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TunerFileError, match="not a readable safetensors"):
        load_tuner(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(TunerFileError, match="no SCEdit metadata"):
        load_tuner(tmp_path / "plain.safetensors")


def test_a_tuner_is_built_from_its_config_alone_and_keeps_no_routing(tiny_unet):
    layout = SkipLayout.from_unet(tiny_unet)
    for tuner in (SCTuner(layout, 0.5), CSCTuner(layout, 3, "depth", hint_channels=24, hint_dim_ratio=0.5, scale=0.7)):
        assert type(tuner.shape) is SkipShape and tuner.shape == layout.shape
        assert TunerMetadata.describe(tuner, "tiny").tuner_config() == tuner.config
        rebuilt = tuner_from_config(tuner.config)
        assert type(rebuilt) is type(tuner) and rebuilt.config == tuner.config
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in tuner.state_dict().items()}


def test_a_version_1_csc_file_loads_with_the_reference_hint_defaults(tiny_unet, tmp_path):
    tuner = randomise(CSCTuner(SkipLayout.from_unet(tiny_unet), 3, "canny"))
    path = tmp_path / "old.safetensors"
    save_tuner(tuner, path, TunerMetadata.describe(tuner, "tiny"))
    header = json.loads(read_metadata_json(path))
    old = {k: v for k, v in header.items() if k not in ("hint_in_channels", "hint_channels", "hint_dim_ratio", "scale")}
    save_file(tuner.state_dict(), path, metadata={"scedit": json.dumps({**old, "version": 1})})
    loaded, metadata = load_tuner(path)
    assert loaded.config == tuner.config and (loaded.config.hint_channels, loaded.config.scale) == (256, 1.0)


def test_metadata_out_of_range_is_refused_by_the_tuner_config(tiny_unet, tmp_path):
    tuner = CSCTuner(SkipLayout.from_unet(tiny_unet))
    header = {**json.loads(json.dumps(TunerMetadata.describe(tuner, "tiny").__dict__)), "hint_dim_ratio": -1}
    save_file(tuner.state_dict(), tmp_path / "bad.safetensors", metadata={"scedit": json.dumps(header)})
    with pytest.raises(TunerFileError, match="hint_dim_ratio must be a number"):
        load_tuner(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "field, value, message",
    [("default_scale", "strong", "default_scale must be a number"), ("default_scale", True, "default_scale must be a number"),
     ("default_conditional_only", "yes", "default_conditional_only must be true or false"),
     ("default_texture", 1, "default_texture must be true or false")],
)
def test_bad_default_use_in_metadata_is_refused(field, value, message, tiny_unet, tmp_path):
    tuner = SCTuner(SkipLayout.from_unet(tiny_unet))
    header = {**json.loads(json.dumps(TunerMetadata.describe(tuner, "tiny").__dict__)), field: value}
    save_file(tuner.state_dict(), tmp_path / "bad.safetensors", metadata={"scedit": json.dumps(header)})
    with pytest.raises(TunerFileError, match=message):
        load_tuner(tmp_path / "bad.safetensors")


def test_a_file_cannot_ask_for_style_and_texture_guidance_at_once(tiny_unet, tmp_path):
    tuner = SCTuner(SkipLayout.from_unet(tiny_unet))
    metadata = TunerMetadata.describe(tuner, "tiny", default_conditional_only=True, default_texture=True)
    save_file(tuner.state_dict(), tmp_path / "both.safetensors", metadata={"scedit": json.dumps(metadata.__dict__)})
    with pytest.raises(TunerFileError, match="cannot both be true"):
        load_tuner(tmp_path / "both.safetensors")


def test_a_files_default_use_survives_the_round_trip_and_older_files_get_the_papers(tiny_unet, tmp_path):
    tuner = SCTuner(SkipLayout.from_unet(tiny_unet))
    save_tuner(tuner, tmp_path / "new.safetensors", TunerMetadata.describe(tuner, "tiny", default_scale=0.5, default_conditional_only=True))
    new = read_metadata(tmp_path / "new.safetensors")
    assert (new.default_scale, new.default_conditional_only) == (0.5, True)
    header = json.loads(read_metadata_json(tmp_path / "new.safetensors"))
    old = {k: v for k, v in header.items() if not k.startswith("default_") and k not in ("kernel_size", "position_features", "gated")}
    save_file(tuner.state_dict(), tmp_path / "old.safetensors", metadata={"scedit": json.dumps({**old, "version": 2})})
    metadata = read_metadata(tmp_path / "old.safetensors")
    assert (metadata.default_scale, metadata.default_conditional_only, metadata.default_texture, metadata.kernel_size) == (1.0, False, False, None)
    assert load_tuner(tmp_path / "old.safetensors")[0].config.kernel_size == 1  # a file before kernels: per pixel
    assert not load_tuner(tmp_path / "old.safetensors")[0].config.position_features
    assert not load_tuner(tmp_path / "old.safetensors")[0].config.gated


def read_metadata_json(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["scedit"]
