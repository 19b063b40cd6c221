"""The shipped tiny SD model (assets/tiny-sd) and the functions that build and train it."""

import gzip
import json
import logging
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import ImageFilter
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from scedit_ui.cli import main
from scedit_ui.model_manager import ModelManager
from scedit_ui.request import ConditionUse, GenerationRequest
from scedit_ui.shapes import tiny_model, world
from scedit_ui.shapes.checker import parse_prompt
from tuners.io import new_file_mode
from tuners.validation import UserInputError

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)


def _skip_counts(unet: UNet2DConditionModel) -> list[int]:
    """Number of skip tensors each up block receives in one forward pass."""
    counts: list[int] = []
    hooks = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs: counts.append(len(kwargs["res_hidden_states_tuple"])), with_kwargs=True
        )
        for block in unet.up_blocks
    ]
    cross_dim = unet.config.cross_attention_dim
    with torch.no_grad():
        size = unet.config.sample_size
        unet(torch.randn(1, unet.config.in_channels, size, size), 500, torch.randn(1, 77, cross_dim))
    for hook in hooks:
        hook.remove()
    return counts


# ---------------------------------------------------------------------------- shipped folder


def test_shipped_folder_loads_as_a_standard_sd_pipeline(pipe):
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False


def test_unet_has_sd15_block_types_without_attention_at_its_32x32_top_level_and_twelve_skips(pipe):
    config = pipe.unet.config
    assert tuple(config.down_block_types) == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",)
    assert tuple(config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",)
    assert config.layers_per_block == 2
    assert _skip_counts(pipe.unet) == [3, 3, 3, 3]


def test_vae_maps_128px_images_to_32x32_latents_of_four_channels_the_unet_takes(pipe):
    assert pipe.vae_scale_factor == 4
    channels = pipe.vae.config.latent_channels
    assert channels == 4  # x4 with 4 channels met both round-trip targets; x8 with 4 / 8 / 16 did not (docs/tiny-model.md)
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert latents.shape == (1, channels, 32, 32)
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == channels
    assert pipe.unet.config.sample_size == 32
    assert pipe.vae.config.scaling_factor != 1.0  # measured on the training latents


def test_scheduler_uses_sd_noise_schedule_with_ddim(pipe):
    config = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000


def test_tokenizer_gives_clip_ids_for_english_prompts(pipe):
    ids = pipe.tokenizer("a red circle at the top left").input_ids
    assert ids == [49406, 320, 736, 7117, 536, 518, 1253, 1823, 49407]


def test_tokenizer_handles_arbitrary_text_and_truncates_to_77(pipe):
    text = "Ünïcödé, emoji 🎉 and a sentence about a LARGE purple Giraffe! " * 20
    ids = tiny_model.tokenize(pipe.tokenizer, [text, ""])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert (ids[0] != pipe.tokenizer.unk_token_id).sum() > 70  # real tokens, not unknowns
    assert pipe.tokenizer.model_max_length == 77


def test_two_step_generation_returns_a_128px_image(pipe):
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle at the top left on a blue background",
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (128, 128)


def test_the_background_follows_the_prompt(pipe):
    """Before the offset-noise stage the model took the background from the first step's noise, not the prompt."""
    from scedit_ui.shapes.checker import score_adherence
    from scedit_ui.shapes.world import Scene, ShapeSpec, caption

    pipe.set_progress_bar_config(disable=True)
    right = 0
    for seed, background in enumerate(("green", "blue", "yellow", "black")):
        scene = Scene((ShapeSpec("circle", "red", "center"),), background)
        image = pipe(caption(scene), num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed)).images[0]
        right += score_adherence(image, scene).background_correct
    assert right >= 3


def test_weights_are_fp16_safetensors_within_60_mb():
    weight_files = sorted(MODEL_DIR.rglob("*.safetensors"))
    assert {p.parent.name for p in weight_files} == {"vae", "text_encoder", "unet"}
    from safetensors import safe_open

    for path in weight_files:
        with safe_open(path, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    assert sum(p.stat().st_size for p in weight_files) <= 60_000_000


# ---------------------------------------------------------------------------- builders


def test_fresh_pipeline_round_trips_through_fp16_folder(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    fresh = tiny_model.assemble_pipeline(
        tiny_model.build_vae(), tiny_model.build_text_encoder(), tokenizer, tiny_model.build_unet()
    )
    tiny_model.save_pipeline_fp16(fresh, tmp_path / "model")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "model", dtype=torch.float32)
    original = fresh.unet.state_dict()
    for name, value in loaded.unet.state_dict().items():
        torch.testing.assert_close(value, original[name].half().float())
    assert fresh.unet.dtype == torch.float32  # saving in fp16 leaves the live model alone
    weights = sorted((tmp_path / "model").rglob("*.safetensors"))
    assert len(weights) == 3 and {oct(p.stat().st_mode & 0o777) for p in weights} == {oct(new_file_mode())}


def test_tokenizer_builder_rejects_a_file_that_is_not_clip_vocab(tmp_path):
    bogus = tmp_path / "bpe.txt.gz"
    bogus.write_bytes(gzip.compress("#version: 0.2\na b\nab c\n".encode()))
    with pytest.raises(UserInputError, match="not CLIP's BPE vocabulary"):
        tiny_model.build_clip_tokenizer(bogus, tmp_path / "tokenizer")


class _Killed(Exception):
    pass


def test_vae_stage_resumes_to_identical_weights(tmp_path, monkeypatch):
    cfg = tiny_model.TinyModelConfig(
        vae_crop_steps=2, vae_full_steps=2, vae_crop_batch=2, vae_full_batch=1, checkpoint_every=2, round_trip_scenes=2
    )
    cpu = torch.device("cpu")
    straight = tiny_model.train_vae(tmp_path / "straight", cfg, cpu)

    real_loss, calls = tiny_model._vae_loss, []

    def counted_loss(*args):
        calls.append(1)
        if len(calls) == 3:
            raise _Killed
        return real_loss(*args)

    monkeypatch.setattr(tiny_model, "_vae_loss", counted_loss)
    with pytest.raises(_Killed):  # killed during step 3, after the step-2 checkpoint
        tiny_model.train_vae(tmp_path / "interrupted", cfg, cpu)
    resumed = tiny_model.train_vae(tmp_path / "interrupted", cfg, cpu)

    assert len(calls) == 3 + 2  # the rerun computed steps 3 and 4 only
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert straight.config.latent_channels == cfg.latent_channels
    round_trip = json.loads((tmp_path / "straight" / "vae_round_trip.json").read_text())
    assert round_trip["scenes"] == 2 and 0.0 <= round_trip["shape_correct"] <= 1.0
    assert {f"style {s}" for s in world.STYLES} <= set(round_trip)


def test_score_vae_keeps_a_perfect_autoencoder_at_one(capsys, tmp_path):
    """An autoencoder that returns its input scores 1 on every measure: the round trip, not the checker, is scored."""

    class Identity:
        def to(self, device):
            return self

        def eval(self):
            return self

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            return SimpleNamespace(sample=z)

    scores = tiny_model.vae_round_trip(Identity(), 8, torch.device("cpu"))
    assert all(value == pytest.approx(1.0) for value in scores.values()), scores
    with pytest.raises(SystemExit):
        tiny_model.main(["score-vae"])  # the folder is required
    assert tiny_model.main(["score-vae", str(tmp_path)]) == 2
    assert "no VAE there" in capsys.readouterr().err


def test_vae_stage_sees_every_style_and_the_cache_only_the_base_styles(tmp_path, monkeypatch):
    seen: list = []
    real_scenes = tiny_model._scenes

    def recording(seeds, styles):
        seen.append(list(styles))
        return real_scenes(seeds, styles)

    monkeypatch.setattr(tiny_model, "_scenes", recording)
    cfg = tiny_model.TinyModelConfig(
        vae_crop_steps=6, vae_full_steps=0, vae_crop_batch=8, vae_styled_fraction=0.9, checkpoint_every=100,
        round_trip_scenes=1, cache_scenes=40, cache_chunk=40, base_styled_fraction=0.9,
    )
    cpu = torch.device("cpu")
    vae = tiny_model.train_vae(tmp_path, cfg, cpu)
    assert set(world.STYLES) <= {s for batch in seen for s in batch}
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "vae").glob("*.safetensors")} == {new_file_mode()}
    seen.clear()
    cache = tiny_model.cache_latents(tmp_path, vae, cfg, cpu)
    styles = {s.style for s in cache.scenes}
    assert set(world.BASE_STYLES) <= styles and not styles & set(world.TUNER_STYLES)
    grid = 128 // cfg.latent_downsample
    assert cache.latents.shape == (40, cfg.latent_channels, grid, grid)
    assert abs(cache.latents.std().item() - 1.0) < 1e-3  # a fresh VAE gets 1 / std as its scaling factor
    again = tiny_model.cache_latents(tmp_path, vae, cfg, cpu)  # read back from the chunks
    assert again.scenes == cache.scenes and torch.equal(again.latents, cache.latents)


def test_training_captions_are_free_form_and_fixed_by_step():
    scenes = [world.sample_scene(i) for i in range(64)]
    first = tiny_model.training_captions(scenes, 0, 5)
    assert first == tiny_model.training_captions(scenes, 0, 5)
    assert first != tiny_model.training_captions(scenes, 0, 6)
    assert first != [world.caption(s) for s in scenes]
    assert {parse_prompt(c).background for c in first} == {s.background for s in scenes}


# The layout aids that the defaults turn on, off: each test turns on the ones it is about.
_LAYOUT_AIDS_OFF = dict(
    layout_noise=0.0, zero_terminal_snr=False, position_fraction=0.0, position_shapes=1, position_timesteps=1,
    position_rollout=False, plain_rollout_fraction=0.0, layout_loss_weight=0.0, shape_map_loss_weight=0.0,
    shape_word_loss_weight=0.0, layout_shares_from=0.0,
)


def _tiny_run(init: str | None = None, **kw) -> tiny_model.TinyModelConfig:
    return tiny_model.TinyModelConfig(
        init=init, latent_channels=4, cache_scenes=8, cache_chunk=8, unet_steps=4, unet_batch=2, unet_warmup=1,
        checkpoint_every=2, eval_prompts=0, **(_LAYOUT_AIDS_OFF | kw),
    )


def test_the_defaults_train_with_the_plain_share_and_export_v_prediction(tmp_path):
    """The one-command recipe: every layout aid on, the plain share non-empty, the positioned share off."""
    cfg = tiny_model.TinyModelConfig(
        init=str(MODEL_DIR), cache_scenes=8, cache_chunk=8, unet_steps=2, unet_batch=4, unet_warmup=1,
        checkpoint_every=2, eval_prompts=0,
    )
    assert cfg.zero_terminal_snr and cfg.layout_noise and cfg.layout_loss_weight
    assert cfg.shape_map_loss_weight and cfg.shape_word_loss_weight and cfg.layout_shares_from
    assert round(cfg.plain_rollout_fraction * cfg.unet_batch) == 1
    assert round(cfg.layout_shares_from * cfg.unet_steps) < cfg.unet_steps  # the share is on in this run's last step
    assert not cfg.position_fraction and not cfg.position_rollout
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    trained = StableDiffusionPipeline.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert trained.scheduler.config.prediction_type == "v_prediction"


def test_unet_stage_from_init_resumes_to_identical_weights_and_keeps_the_vae(tmp_path, monkeypatch):
    cfg = _tiny_run(init=str(MODEL_DIR))
    tiny_model.train(tmp_path / "straight", tmp_path / "out-straight", cfg, threads=1)
    straight = StableDiffusionPipeline.from_pretrained(tmp_path / "out-straight", dtype=torch.float32)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "out-straight" / "tokenizer").iterdir()}
    shipped = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)
    for name, value in shipped.vae.state_dict().items():
        assert torch.equal(straight.vae.state_dict()[name], value), name
    assert straight.vae.config.scaling_factor == shipped.vae.config.scaling_factor
    unet_before = shipped.unet.state_dict()
    assert any(not torch.equal(v, unet_before[k]) for k, v in straight.unet.state_dict().items())

    real_unet_forward, calls = UNet2DConditionModel.forward, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise _Killed
        return real_unet_forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    with pytest.raises(_Killed):  # killed during step 3, after the step-2 checkpoint
        tiny_model.train(tmp_path / "interrupted", tmp_path / "out-interrupted", cfg, threads=1)
    tiny_model.train(tmp_path / "interrupted", tmp_path / "out-interrupted", cfg, threads=1)
    assert len(calls) == 3 + 2  # the rerun computed steps 3 and 4 only
    resumed = StableDiffusionPipeline.from_pretrained(tmp_path / "out-interrupted", dtype=torch.float32)
    for name, value in straight.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[name], value, msg=name)


def test_the_shape_weight_covers_the_shapes_and_ignores_the_style():
    big = world.Scene((world.ShapeSpec("square", "red", "top left", "large"),), "blue")
    weight = tiny_model._latent_shape_weight([big, replace(big, style="stripes")], (16, 16), 4.0)
    assert torch.equal(weight[0], weight[1])  # the striped background does not count as shape
    assert weight[0, 0, :3, :3].min() > 4.0  # inside the square: 1 + 4 × full cover
    assert weight[0, 0, 10:, 10:].max() == 1.0  # the far corner is background
    assert torch.equal(tiny_model._latent_shape_weight([big], (16, 16), 0.0), torch.ones(1, 1, 16, 16))


def test_the_unet_stage_uses_the_shape_weight(tmp_path):
    outputs = {}
    for extra in (0.0, 4.0):
        config = _tiny_run(init=str(MODEL_DIR), unet_shape_weight=extra)
        tiny_model.train(tmp_path / f"w{extra}", tmp_path / f"out{extra}", config, threads=1)
        outputs[extra] = UNet2DConditionModel.from_pretrained(tmp_path / f"out{extra}" / "unet").state_dict()
    assert any(not torch.equal(v, outputs[4.0][k]) for k, v in outputs[0.0].items())


def test_layout_noise_hides_the_layout_at_coarse_scales_and_is_drawn_only_when_on():
    shape = torch.Size([64, 4, 32, 32])
    plain = tiny_model.training_noise(shape, tiny_model.TinyModelConfig(layout_noise=0.0), torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    before = torch.randn(shape, generator=generator) + 0.3 * torch.randn((64, 4, 1, 1), generator=generator)
    assert torch.equal(plain, before)  # runs without it repeat exactly
    layout = tiny_model.training_noise(
        shape, tiny_model.TinyModelConfig(layout_noise=1.0), torch.Generator().manual_seed(0)
    )

    def coarse(noise: torch.Tensor) -> float:  # std of 8 x 8 latent-pixel blocks, the per-channel constant removed
        return float(torch.nn.functional.avg_pool2d(noise - noise.mean((2, 3), keepdim=True), 8).std())

    assert coarse(layout) > 4 * coarse(plain)


def test_high_noise_fraction_draws_more_of_the_top_quarter_and_is_drawn_only_when_on():
    uniform = tiny_model.training_timesteps(4096, 1000, tiny_model.TinyModelConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0)))
    high = tiny_model.training_timesteps(
        4096, 1000, tiny_model.TinyModelConfig(high_noise_fraction=0.5), torch.Generator().manual_seed(0)
    )
    assert high.min() >= 0 and high.max() <= 999
    # 0.5 of the batch from [750, 1000) plus a quarter of the uniform rest: 0.625
    assert float((high >= 750).float().mean()) == pytest.approx(0.625, abs=0.03)


def test_zero_terminal_snr_trains_v_prediction_and_exports_a_schedule_whose_first_step_is_pure_noise(tmp_path):
    tiny_model.train(tmp_path / "work", tmp_path / "out", _tiny_run(init=str(MODEL_DIR), zero_terminal_snr=True), threads=1)
    trained = StableDiffusionPipeline.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert isinstance(trained.scheduler, DDIMScheduler)
    assert trained.scheduler.config.prediction_type == "v_prediction"
    assert float(trained.scheduler.alphas_cumprod[-1]) < 1e-6  # nothing of the picture is left at t = 999
    trained.scheduler.set_timesteps(20)
    assert int(trained.scheduler.timesteps[0]) == 999
    image = trained("a red circle on a white background", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize(("position_shapes", "position_timesteps"), [(1, 1), (3, 50)])
def test_position_fraction_gives_part_of_each_batch_to_named_shapes_at_the_last_timesteps(
    tmp_path, monkeypatch, position_shapes, position_timesteps
):
    with pytest.raises(UserInputError, match="position_fraction needs zero_terminal_snr"):
        tiny_model.train(tmp_path / "eps", tmp_path / "eps-out", _tiny_run(init=str(MODEL_DIR), position_fraction=0.5), threads=1)
    seen: list[tuple[list[int], list[str]]] = []
    real_forward, real_tokenize = UNet2DConditionModel.forward, tiny_model.tokenize
    prompts: list[list[str]] = []

    def spy_tokenize(tokenizer, texts):
        prompts.append(list(texts))
        return real_tokenize(tokenizer, texts)

    def spy_forward(self, sample, timestep, *args, **kwargs):
        if self.training:
            seen.append((torch.as_tensor(timestep).reshape(-1).tolist(), prompts[-1]))
        return real_forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(tiny_model, "tokenize", spy_tokenize)
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy_forward)
    cfg = _tiny_run(
        init=str(MODEL_DIR), zero_terminal_snr=True, position_fraction=0.5, position_shapes=position_shapes,
        position_timesteps=position_timesteps,
    )
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    assert len(seen) == cfg.unet_steps
    counts = []
    for timesteps, captions in seen:  # batch 2: the second sample is the positioned one
        assert 1000 - position_timesteps <= timesteps[1] <= 999
        if captions[1]:  # caption dropout may empty it
            shapes = parse_prompt(captions[1]).shapes
            assert all(shape.position is not None for shape in shapes)
            counts.append(len(shapes))
    assert counts and max(counts) <= position_shapes
    if position_shapes > 1:  # the cache's scenes hold 1-3 shapes: several named shapes show up
        assert max(counts) > 1
    if position_timesteps > 1:
        assert min(t[1] for t, _ in seen) < 999


def test_the_first_step_clean_latent_is_the_guided_prediction_at_zero_snr():
    scheduler = tiny_model.build_scheduler(zero_terminal_snr=True)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0  # so the clean latent is minus the guided v

    class FixedV(torch.nn.Module):  # v = -1 with the prompt, -3 without it
        def forward(self, sample, timestep, text):
            assert (timestep == 999).all()
            return SimpleNamespace(sample=torch.full_like(sample, -1.0 if text.sum() > 0 else -3.0))

    noise = torch.randn(2, 4, 8, 8)
    clean = tiny_model.first_step_clean_latent(FixedV(), noise, torch.ones(2, 77, 8), torch.zeros(1, 77, 8), scheduler)
    assert torch.allclose(clean, torch.full_like(noise, 3.0 + 5.0 * (1.0 - 3.0)))


def _record_training_unet_calls(monkeypatch) -> list[tuple[bool, list[int]]]:
    """(gradients on, timesteps) of every UNet call made while the UNet is in training mode, in order."""
    calls: list[tuple[bool, list[int]]] = []
    real_forward = UNet2DConditionModel.forward

    def spy_forward(self, sample, timestep, *args, **kwargs):
        if self.training:
            calls.append((torch.is_grad_enabled(), torch.as_tensor(timestep).reshape(-1).tolist()))
        return real_forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy_forward)
    return calls


def test_position_rollout_starts_the_positioned_share_from_the_models_first_step(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="position_rollout needs position_fraction"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(position_rollout=True), threads=1)
    calls = _record_training_unet_calls(monkeypatch)
    cfg = _tiny_run(
        init=str(MODEL_DIR), zero_terminal_snr=True, position_fraction=0.5, position_timesteps=50, position_rollout=True,
    )
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    assert len(calls) == 3 * cfg.unet_steps  # per step: guided first step (prompt, empty prompt), then the training pass
    for step in range(cfg.unet_steps):
        with_prompt, without_prompt, training = calls[3 * step : 3 * step + 3]
        assert not with_prompt[0] and not without_prompt[0] and training[0]
        assert with_prompt[1] == without_prompt[1] == [999]  # the positioned sample only


def test_the_layout_shares_start_after_their_fraction_of_the_steps_and_every_row_is_free_before_it(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="layout_shares_from is a fraction of unet_steps"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(layout_shares_from=1.0), threads=1)
    calls = _record_training_unet_calls(monkeypatch)
    cfg = replace(_tiny_run(
        init=str(MODEL_DIR), zero_terminal_snr=True, position_fraction=0.5, position_timesteps=50, position_rollout=True,
        layout_shares_from=0.25,
    ), unet_steps=8, unet_batch=4)
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    before, after = calls[:2], calls[2:]
    assert [with_grad for with_grad, _ in before] == [True, True]  # the training pass only: no first step to start from
    assert len(after) == 3 * (cfg.unet_steps - 2)
    for step in range(cfg.unet_steps - 2):
        with_prompt, without_prompt, training = after[3 * step : 3 * step + 3]
        assert with_prompt[1] == without_prompt[1] == [999, 999]  # the positioned half of the batch
        assert all(950 <= t <= 999 for t in training[1][2:])
    # Uniform timesteps for every row before the shares start: across 8 rows, not all in the last 50.
    assert min(t for _, timesteps in before for t in timesteps) < 950


def test_a_plain_scene_moves_its_shape_to_the_cell_where_the_first_step_drew_most_but_never_to_a_held_out_one():
    scene = world.Scene((world.ShapeSpec("circle", "red", "top left"),), "white")
    first_step = torch.zeros(1, 4, 12, 12)
    first_step[:, :, 8:, 8:] = 2.0  # the bottom right cell stands out
    first_step[:, :, :4, 4:8] = 1.0  # the top one a little
    (moved,) = tiny_model.shapes_moved_to_the_first_step(first_step, [scene])
    assert moved == world.Scene((world.ShapeSpec("circle", "red", "bottom right"),), "white")
    held = next(
        (kind, color, background) for kind in world.SHAPES for color in world.COLORS for background in world.COLORS
        if color != background and world.is_held_out(color, kind, background, "bottom right")
        and not world.is_held_out(color, kind, background, "top")
    )
    kind, color, background = held
    scene = world.Scene((world.ShapeSpec(kind, color, "left"),), background)
    (moved,) = tiny_model.shapes_moved_to_the_first_step(first_step, [scene])
    assert moved.shapes[0].position == "top"


def test_plain_rollout_trains_plain_prompts_from_the_first_step_towards_the_copy_it_began(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="plain_rollout_fraction needs zero_terminal_snr"):
        tiny_model.train(tmp_path / "eps", tmp_path / "eps-out", _tiny_run(plain_rollout_fraction=0.5), threads=1)
    with pytest.raises(UserInputError, match="together at most 1"):
        tiny_model.train(
            tmp_path / "many", tmp_path / "many-out",
            _tiny_run(zero_terminal_snr=True, position_fraction=0.5, plain_rollout_fraction=0.75), threads=1,
        )
    calls = _record_training_unet_calls(monkeypatch)
    prompts: list[list[str]] = []
    moves: list[list[world.Scene]] = []
    real_tokenize, real_move = tiny_model.tokenize, tiny_model.shapes_moved_to_the_first_step

    def spy_tokenize(tokenizer, texts):
        prompts.append(list(texts))
        return real_tokenize(tokenizer, texts)

    def spy_move(first_step, scenes):
        moves.append(real_move(first_step, scenes))
        return moves[-1]

    monkeypatch.setattr(tiny_model, "tokenize", spy_tokenize)
    monkeypatch.setattr(tiny_model, "shapes_moved_to_the_first_step", spy_move)
    cfg = _tiny_run(init=str(MODEL_DIR), zero_terminal_snr=True, plain_rollout_fraction=0.5, position_timesteps=50)
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    assert len(calls) == 3 * cfg.unet_steps and len(moves) == cfg.unet_steps
    step_prompts = [texts for texts in prompts if len(texts) == cfg.unet_batch]
    for step in range(cfg.unet_steps):
        with_prompt, without_prompt, training = calls[3 * step : 3 * step + 3]
        assert not with_prompt[0] and not without_prompt[0] and training[0]
        assert with_prompt[1] == without_prompt[1] == [999]
        assert 950 <= training[1][1] <= 999  # the plain sample is the second of the batch
        (moved,) = moves[step]
        assert len(moved.shapes) == 1 and not world.is_held_out(
            moved.shapes[0].color, moved.shapes[0].kind, moved.background, moved.shapes[0].position
        )
        if step_prompts[step][1]:  # caption dropout may empty it
            assert step_prompts[step][1] == world.plain_prompt(moved)


def test_a_plain_scene_moves_its_shape_to_the_cell_where_its_noise_is_highest():
    scene = world.Scene((world.ShapeSpec("circle", "red", None),), "white")
    noise = torch.zeros(2, 4, 12, 12)
    noise[0, :, :4, 8:] = 0.5  # the top right cell
    noise[1, 0, 4:8, :4] = 1.0  # the left cell, one channel only
    moved = tiny_model.shapes_moved_to_the_noise(noise, [scene, scene])
    assert [m.shapes[0].position for m in moved] == ["top right", "left"]


def test_plain_cell_from_noise_moves_each_plain_shape_to_its_own_noise(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="plain_cell_from_noise needs plain_rollout_fraction"):
        tiny_model.train(tmp_path / "bare", tmp_path / "bare-out", _tiny_run(zero_terminal_snr=True, plain_cell_from_noise=True), threads=1)
    noises: list[torch.Tensor] = []
    real_move = tiny_model.shapes_moved_to_the_noise

    def spy_move(noise, scenes):
        noises.append(noise.clone())
        return real_move(noise, scenes)

    monkeypatch.setattr(tiny_model, "shapes_moved_to_the_noise", spy_move)
    monkeypatch.setattr(tiny_model, "shapes_moved_to_the_first_step", lambda *_: pytest.fail("the first step chose the cell"))
    cfg = _tiny_run(init=str(MODEL_DIR), zero_terminal_snr=True, plain_rollout_fraction=0.5, plain_cell_from_noise=True,
                    layout_noise=1.0)
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    assert len(noises) == cfg.unet_steps
    # White noise as sampling starts from: no coarse layout noise (std 1 + offset, where layout noise 1 doubles it).
    assert all(float(noise.std()) < 1.3 for noise in noises)


def test_position_timesteps_outside_the_schedule_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="position_timesteps must be between 1 and 1000"):
        tiny_model.train(tmp_path / "work", tmp_path / "out", _tiny_run(position_timesteps=0), threads=1)


def test_the_text_encoder_learns_at_its_own_rate(tmp_path):
    config = _tiny_run(init=str(MODEL_DIR), text_lr_scale=10.0)
    tiny_model.train(tmp_path / "work", tmp_path / "out", config, threads=1)
    unet_group, text_group = torch.load(tmp_path / "work" / "unet.pt", weights_only=True)["optimizer"]["param_groups"]
    assert text_group["initial_lr"] == pytest.approx(10 * unet_group["initial_lr"])


def test_shape_word_similarity_is_one_when_the_encoder_cannot_tell_shapes_apart():
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    encoder = tiny_model.build_text_encoder()
    assert tiny_model.shape_word_similarity(encoder, tokenizer) < 0.99
    rows = tokenizer.convert_tokens_to_ids([f"{shape}</w>" for shape in world.SHAPES])
    with torch.no_grad():
        encoder.get_input_embeddings().weight[rows] = encoder.get_input_embeddings().weight[rows[0]].clone()
    assert tiny_model.shape_word_similarity(encoder, tokenizer) == pytest.approx(1.0)


def test_the_shape_word_loss_pulls_a_fresh_encoders_shape_words_apart_to_the_margin():
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    torch.manual_seed(0)
    encoder = tiny_model.build_text_encoder()
    generator = torch.Generator().manual_seed(0)
    phrases = tiny_model.shape_word_phrases(generator)
    assert [word for _, word, _ in phrases] == list(world.SHAPES)
    assert all(before.endswith(" ") and after.endswith(" background") for before, _, after in phrases)
    before = tiny_model.shape_word_similarity(encoder, tokenizer)
    assert before > tiny_model.SHAPE_WORD_MARGIN + 0.2  # a fresh encoder: the five words nearly one vector
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
    for _ in range(30):
        loss = tiny_model.shape_word_loss(encoder, tokenizer, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # measured on the fixed phrase the loss never saw ("a blue <shape> on a white background")
    assert tiny_model.shape_word_similarity(encoder, tokenizer) < before - 0.2
    with torch.no_grad():
        assert float(tiny_model.shape_word_loss(encoder, tokenizer, generator)) < 0.05  # at the margin: little left to push


def test_the_shape_word_loss_trains_the_text_encoder_and_a_negative_weight_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="shape_word_loss_weight"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(shape_word_loss_weight=-1.0), threads=1)
    cfg = _tiny_run(init=str(MODEL_DIR))
    tiny_model.train(tmp_path / "without", tmp_path / "out-without", cfg, threads=1)
    tiny_model.train(tmp_path / "with", tmp_path / "out-with", replace(cfg, shape_word_loss_weight=100.0), threads=1)
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    without, pulled = (CLIPTextModel.from_pretrained(tmp_path / out / "text_encoder") for out in ("out-without", "out-with"))
    # the built-in model's words are at 0.47, under the margin: only pairs above it are pushed, so the mean moves
    # little, but it moves only down
    assert tiny_model.shape_word_similarity(pulled, tokenizer) < tiny_model.shape_word_similarity(without, tokenizer)


def test_position_word_similarity_rises_when_the_encoder_cannot_tell_positions_apart():
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    torch.manual_seed(0)
    encoder = tiny_model.build_text_encoder()
    apart = tiny_model.position_word_similarity(encoder, tokenizer)
    words = ["top", "left", "right", "bottom", "center", "in", "at"]
    rows = tokenizer.convert_tokens_to_ids([f"{word}</w>" for word in words])
    with torch.no_grad():
        encoder.get_input_embeddings().weight[rows] = encoder.get_input_embeddings().weight[rows[0]].clone()
    # Only the phrases' lengths still tell them apart (through the position embeddings).
    assert tiny_model.position_word_similarity(encoder, tokenizer) > apart + 0.05


class _StubUNet(torch.nn.Module):
    """Predicts the noise (or velocity) that turns each call's noisy latent into ``clean[call]``: a model that draws
    that picture."""

    def __init__(self, unet: UNet2DConditionModel, alpha_bar: torch.Tensor, clean: list[torch.Tensor], velocity: bool):
        super().__init__()
        self.real, self.alpha_bar, self.clean, self.velocity, self.calls = unet, alpha_bar, clean, velocity, 0

    @property
    def device(self) -> torch.device:
        return self.real.device

    def forward(self, noisy, timestep, text):
        target = self.clean[min(self.calls, len(self.clean) - 1)]
        self.calls += 1
        if self.velocity:
            return SimpleNamespace(sample=(self.alpha_bar.sqrt() * noisy - target) / (1 - self.alpha_bar).sqrt())
        return SimpleNamespace(sample=(noisy - self.alpha_bar.sqrt() * target) / (1 - self.alpha_bar).sqrt())


@pytest.mark.parametrize("zero_terminal_snr", [False, True], ids=["epsilon", "v-prediction"])
def test_layout_from_text_is_one_for_a_model_that_places_shapes_by_the_prompt_and_zero_for_one_that_follows_the_latent(
    pipe, zero_terminal_snr
):
    scheduler = tiny_model.build_scheduler(zero_terminal_snr)
    alpha_bar = scheduler.alphas_cumprod[tiny_model.LAYOUT_PROBE_TIMESTEP]

    def latent(position: str) -> torch.Tensor:
        scene = world.Scene((world.ShapeSpec("circle", "red", position, "medium"),), "white")
        with torch.no_grad():
            return pipe.vae.encode(tiny_model._render([scene])).latent_dist.mean * pipe.vae.config.scaling_factor

    real_unet, real_scheduler = pipe.unet, pipe.scheduler
    pipe.scheduler = scheduler
    try:
        by_prompt = [latent(p) for p in world.POSITIONS if p != "center"]
        for decoy in (True, False):
            pipe.unet = _StubUNet(real_unet, alpha_bar, by_prompt, velocity=zero_terminal_snr)
            assert tiny_model.layout_from_text(pipe, decoy=decoy) > 0.8
        pipe.unet = _StubUNet(real_unet, alpha_bar, [latent("center")], velocity=zero_terminal_snr)
        assert tiny_model.layout_from_text(pipe) < 0.05
    finally:
        pipe.unet, pipe.scheduler = real_unet, real_scheduler


def test_a_work_folder_refuses_another_configuration(tmp_path):
    tiny_model._claim_work_folder(tmp_path, _tiny_run())
    with pytest.raises(UserInputError, match="different configuration"):
        tiny_model._claim_work_folder(tmp_path, _tiny_run(unet_lr=1e-3))


def test_a_work_folder_stamped_before_a_field_existed_takes_that_fields_default(tmp_path):
    stamped = asdict(_tiny_run())
    del stamped["text_lr_scale"]
    (tmp_path / "config.json").write_text(json.dumps(stamped))
    tiny_model._claim_work_folder(tmp_path, _tiny_run())  # resumes
    with pytest.raises(UserInputError, match="different configuration"):
        tiny_model._claim_work_folder(tmp_path, _tiny_run(text_lr_scale=10.0))


@pytest.mark.parametrize(("field", "value_then"), [
    ("shape_map_loss_weight", 0.0), ("shape_word_loss_weight", 0.0), ("layout_shares_from", 0.0),
])
def test_a_work_folder_stamped_before_a_setting_existed_ran_with_its_value_then(tmp_path, field, value_then):
    stamped = asdict(_tiny_run())
    del stamped[field]
    (tmp_path / "config.json").write_text(json.dumps(stamped))
    with pytest.raises(UserInputError, match="different configuration"):  # the default is another value now
        tiny_model._claim_work_folder(tmp_path, _tiny_run(**{field: getattr(tiny_model.TinyModelConfig(), field)}))
    tiny_model._claim_work_folder(tmp_path, _tiny_run(**{field: value_then}))  # resumes


def test_set_overrides_convert_to_the_field_types():
    overrides = tiny_model._parse_overrides(["unet_steps=600", "unet_lr=2e-4", "init=assets/tiny-sd", "zero_terminal_snr=true"])
    assert overrides == {"unet_steps": 600, "unet_lr": 2e-4, "init": "assets/tiny-sd", "zero_terminal_snr": True}
    assert tiny_model._parse_overrides(["zero_terminal_snr=0"]) == {"zero_terminal_snr": False}
    with pytest.raises(UserInputError, match="'maybe' is not a value of type bool"):
        tiny_model._parse_overrides(["zero_terminal_snr=maybe"])
    with pytest.raises(UserInputError, match="TinyModelConfig field"):
        tiny_model._parse_overrides(["unet_stepz=600"])
    with pytest.raises(UserInputError, match="unet_steps"):
        tiny_model._parse_overrides(["unet_steps=many"])


def test_init_must_be_a_model_folder(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(UserInputError, match="model_index.json"):
        tiny_model.train(tmp_path / "work", tmp_path / "out", tiny_model.TinyModelConfig(init=str(tmp_path)), threads=1)


def test_until_vae_trains_and_scores_only_the_autoencoder(tmp_path):
    out = tmp_path / "out"  # a new folder: it gets the built-in model's tokenizer
    code = tiny_model.main([
        "train", "--work", str(tmp_path / "work"), "--out", str(out), "--until", "vae", "--threads", "1",
        "--set", "vae_crop_steps=1", "--set", "vae_full_steps=1", "--set", "vae_crop_batch=2", "--set", "vae_full_batch=1",
        "--set", "round_trip_scenes=2", "--set", "latent_channels=16",
    ])
    assert code == 0
    work = tmp_path / "work"
    assert AutoencoderKL.from_pretrained(work / "vae").config.latent_channels == 16
    assert json.loads((work / "vae_round_trip.json").read_text())["scenes"] == 2
    assert not (work / "cache").exists() and not (work / "unet.pt").exists()
    assert not (out / "model_index.json").exists()  # nothing exported: no UNet was trained
    assert (out / "tokenizer" / "vocab.json").read_bytes() == (MODEL_DIR / "tokenizer" / "vocab.json").read_bytes()


def test_a_x4_latent_gives_32x32_latents_the_unet_and_pipeline_size_take():
    vae, unet = tiny_model.build_vae(4, latent_downsample=4), tiny_model.build_unet(4, latent_downsample=4)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert latents.shape == (1, 4, 32, 32) and unet.config.sample_size == 32
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    pipe = tiny_model.assemble_pipeline(vae, tiny_model.build_text_encoder(), tokenizer, unet)
    assert pipe.vae_scale_factor * unet.config.sample_size == 128  # the pipeline's default size stays 128 px


def test_attention_stops_above_16x16_so_the_x4_unet_has_sdxls_top_level():
    x4, x8 = tiny_model.unet_config(4, 4), tiny_model.unet_config(8, 8)
    assert x4["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert x4["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert x8["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert _skip_counts(tiny_model.build_unet(4, 4)) == [3, 3, 3, 3]


def test_init_from_another_layout_keeps_every_weight_the_two_share(caplog):
    source = UNet2DConditionModel(**{**tiny_model.unet_config(4, 4), "down_block_types": ("CrossAttnDownBlock2D",) * 3
                                     + ("DownBlock2D",), "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3})
    target = tiny_model.build_unet(4, 4)
    with caplog.at_level(logging.INFO):
        tiny_model._load_matching_weights(target, source)
    source_weights = source.state_dict()
    for name, value in target.state_dict().items():
        assert torch.equal(value, source_weights[name]), name
    assert "have no place in this layout" in caplog.text and "down_blocks.0.attentions" in caplog.text


def test_a_latent_downsample_other_than_4_or_8_is_refused(tmp_path, capsys):
    code = tiny_model.main(["train", "--work", str(tmp_path / "work"), "--out", str(tmp_path), "--set", "latent_downsample=2"])
    assert code == 2 and "latent_downsample must be 4 or 8, got 2" in capsys.readouterr().err


def test_a_canny_condition_at_the_pictures_size_steers_the_x4_model():
    manager = ModelManager("cpu")
    manager.load(str(MODEL_DIR))
    plain = GenerationRequest("a red circle on a white background", seed=0, steps=2, guidance=5.0)
    edges = world.render_scene(world.sample_scene(3)).filter(ImageFilter.FIND_EDGES)  # 128 px: the picture's size
    controlled = replace(plain, conditions=(ConditionUse(str(MODEL_DIR.parent / "tuners" / "canny.safetensors"), edges, 1.0),))
    before, after = (np.asarray(manager.generate(r).images[0], dtype=float) for r in (plain, controlled))
    assert after.shape == before.shape == (128, 128, 3) and np.abs(after - before).mean() > 1.0



def test_sampled_latent_continues_the_models_own_guided_ddim_sampling():
    scheduler = tiny_model.build_scheduler(zero_terminal_snr=True)
    assert tiny_model.sampler_timesteps(scheduler)[:3] == [999, 949, 899]
    seen: list[int] = []

    class FixedV(torch.nn.Module):  # v = -1 with the prompt, -3 without it
        def forward(self, sample, timestep, text):
            seen.extend(set(timestep.tolist()))
            return SimpleNamespace(sample=torch.full_like(sample, -1.0 if text.sum() > 0 else -3.0))

    noise, text, empty = torch.randn(2, 4, 8, 8), torch.ones(2, 77, 8), torch.zeros(1, 77, 8)
    first = tiny_model.first_step_clean_latent(FixedV(), noise, text, empty, scheduler)
    timesteps = torch.tensor([940, 900])
    visited = tiny_model.sampler_timesteps(scheduler)
    one_step = tiny_model.sampled_latent(FixedV(), first, noise, text, empty, scheduler, visited[:1], timesteps)
    assert torch.allclose(one_step, scheduler.add_noise(first, noise, timesteps))
    seen.clear()
    two_steps = tiny_model.sampled_latent(FixedV(), first, noise, text, empty, scheduler, visited[:2], timesteps)
    assert seen == [949, 949]  # the second sampling step, with and without the prompt
    latent = scheduler.add_noise(first, noise, torch.tensor(949))
    clean, predicted_noise = tiny_model.guided_prediction(FixedV(), latent, 949, text, empty, scheduler)
    assert torch.allclose(two_steps, scheduler.add_noise(clean, predicted_noise, timesteps))
    assert not torch.allclose(two_steps, one_step)


def test_position_rollout_steps_start_the_positioned_share_further_down_the_models_own_sampling(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="position_rollout_steps needs position_rollout"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(position_rollout_steps=2), threads=1)
    with pytest.raises(UserInputError, match="between 1 and 20"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(position_rollout_steps=21), threads=1)
    recorded = _record_training_unet_calls(monkeypatch)
    cfg = replace(_tiny_run(
        init=str(MODEL_DIR), zero_terminal_snr=True, position_fraction=0.5, position_timesteps=50, position_rollout=True,
        position_rollout_steps=3,
    ), unet_steps=8, checkpoint_every=8)
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    calls = [timesteps for _, timesteps in recorded]
    steps_taken = []
    while calls:  # per step: the guided first step, each further sampling step (both guided), the training pass
        assert calls[0] == calls[1] == [999]
        sampled = 0
        while sampled < 2 and calls[2 + 2 * sampled] == calls[3 + 2 * sampled] == [[949, 899][sampled]]:
            sampled += 1
        training = calls[2 + 2 * sampled]
        assert 949 - 50 * sampled < training[1] <= 999 - 50 * sampled  # the positioned sample, as many steps lower
        steps_taken.append(1 + sampled)
        del calls[: 3 + 2 * sampled]
    assert len(steps_taken) == cfg.unet_steps and set(steps_taken) > {1}


def test_one_cell_last_names_only_the_last_clauses_cell():
    scene = world.Scene((world.ShapeSpec("circle", "red", "top left"), world.ShapeSpec("star", "blue", "right", "small"),
                         world.ShapeSpec("ring", "green", "bottom")), "white")
    moved = tiny_model.scene_with_one_cell_last(scene, 0)
    assert world.caption(moved) == "a small blue star, a green ring and a red circle at the top left on a white background"
    assert parse_prompt(world.caption(moved)).shapes[-1].position == "top left"
    single = world.Scene(scene.shapes[:1], "white")
    assert tiny_model.scene_with_one_cell_last(single, 0) == single


def test_position_cell_last_fraction_captions_part_of_the_positioned_share_so(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="position_cell_last_fraction needs position_fraction"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(position_cell_last_fraction=1.0), threads=1)
    seen: list[str] = []

    def spy_tokenize(tokenizer, captions):
        if len(captions) == 2:  # a training batch (not the empty prompt): the second sample is the positioned one
            seen.append(captions[1])
        return real_tokenize(tokenizer, captions)

    real_tokenize = tiny_model.tokenize
    monkeypatch.setattr(tiny_model, "tokenize", spy_tokenize)
    cfg = replace(_tiny_run(init=str(MODEL_DIR), zero_terminal_snr=True, position_fraction=0.5, position_shapes=3,
                            position_cell_last_fraction=1.0), unet_steps=12, checkpoint_every=12)
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    several = [parse_prompt(c).shapes for c in seen if c and len(parse_prompt(c).shapes) > 1]
    assert several  # the cache's scenes hold 1-3 shapes
    for shapes in several:
        assert shapes[-1].position is not None and all(shape.position is None for shape in shapes[:-1])


def test_eval_adherence_prints_the_position_of_each_clause(capsys):
    """Prompt 0 of the held-out set names two shapes, prompt 1 one: two clauses are scored, each a fraction."""
    assert main(["eval", "adherence", "--n", "2", "--steps", "4"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert re.fullmatch(r"clause_position_accuracy\s+[01]\.\d{3} / [01]\.\d{3}", lines["clause_position_accuracy"])
    assert re.fullmatch(r"extra_blobs\s+-?\d+\.\d{3}", lines["extra_blobs"])
    for kind in ("fragments", "copies", "strays"):
        assert re.fullmatch(rf"{kind}\s+\d+\.\d{{3}}", lines[kind])


def test_layout_targets_name_each_clauses_cell_and_nothing_elsewhere_only_when_every_cell_is_named():
    colours, kinds = tiny_model.layout_targets([
        "a red circle at the top left and a blue star on a white background",  # the star's cell is not named
        "one small gray ring in the centre, in the middle of nothing",  # not a scene
        "a small green ring at the bottom right and one yellow square in the middle on pink background",
    ])
    unknown, top_left, center, bottom_right = tiny_model.UNKNOWN_CELL, 0, 4, 8
    colour_names = list(world.COLORS)
    assert colours[0, top_left] == colour_names.index("red") and kinds[0, top_left] == world.SHAPES.index("circle")
    assert (colours[0, 1:] == unknown).all() and (kinds[0, 1:] == unknown).all()
    assert (colours[1] == unknown).all()
    assert colours[2, center] == colour_names.index("yellow") and kinds[2, center] == world.SHAPES.index("square")
    assert colours[2, bottom_right] == colour_names.index("green") and kinds[2, bottom_right] == world.SHAPES.index("ring")
    nothing = [i for i in range(9) if i not in (center, bottom_right)]
    assert (colours[2, nothing] == len(world.COLORS)).all() and (kinds[2, nothing] == len(world.SHAPES)).all()


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def _killed_in_step_3_then_resumed(tmp_path: Path, monkeypatch, cfg: tiny_model.TinyModelConfig) -> None:
    """Trains ``cfg`` into tmp_path/interrupted (out: tmp_path/out-interrupted), killed during step 3 (after the step-2
    checkpoint), then rerun to the end."""
    real_unet_forward, calls = UNet2DConditionModel.forward, []

    def killed_in_step_3(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        if sum(1 for batch in calls if batch == cfg.unet_batch) == 3:  # the training forwards, not the first steps'
            raise _Killed
        return real_unet_forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", killed_in_step_3)
    with pytest.raises(_Killed):
        tiny_model.train(tmp_path / "interrupted", tmp_path / "out-interrupted", cfg, threads=1)
    monkeypatch.setattr(UNet2DConditionModel, "forward", real_unet_forward)
    tiny_model.train(tmp_path / "interrupted", tmp_path / "out-interrupted", cfg, threads=1)


def test_the_layout_reader_trains_the_text_encoder_resumes_and_is_not_exported(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="layout_loss_weight"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(layout_loss_weight=-1.0), threads=1)
    cfg = replace(_tiny_run(init=str(MODEL_DIR), zero_terminal_snr=True, position_fraction=0.5, position_shapes=3,
                            caption_dropout=0.0), unet_steps=4)
    tiny_model.train(tmp_path / "without", tmp_path / "out-without", cfg, threads=1)
    with_reader = replace(cfg, layout_loss_weight=1.0)
    tiny_model.train(tmp_path / "straight", tmp_path / "out-straight", with_reader, threads=1)

    state = torch.load(tmp_path / "straight" / "unet.pt", weights_only=True)
    unet_group, _text_group, reader_group = state["optimizer"]["param_groups"]
    assert reader_group["initial_lr"] == pytest.approx(tiny_model.LAYOUT_READER_LR_SCALE * unet_group["initial_lr"])
    assert _files(tmp_path / "out-straight") == _files(tmp_path / "out-without")  # the reader stays out of the model
    without = CLIPTextModel.from_pretrained(tmp_path / "out-without" / "text_encoder")
    straight = CLIPTextModel.from_pretrained(tmp_path / "out-straight" / "text_encoder")
    assert any(not torch.equal(v, without.state_dict()[k]) for k, v in straight.state_dict().items())

    _killed_in_step_3_then_resumed(tmp_path, monkeypatch, with_reader)
    resumed = CLIPTextModel.from_pretrained(tmp_path / "out-interrupted" / "text_encoder")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_shape_maps_name_the_kind_and_colour_at_each_place_whatever_the_style():
    square = world.Scene((world.ShapeSpec("square", "red", "top left", "large"),), "blue")
    kinds, colours = tiny_model.shape_maps([square, replace(square, style="stripes")], 16)
    assert kinds.shape == (2, len(world.SHAPES) + 1, 16, 16) and colours.shape == (2, len(world.COLORS), 16, 16)
    assert torch.equal(kinds[0], kinds[1]) and torch.equal(colours[0], colours[1])
    torch.testing.assert_close(kinds.sum(dim=1), torch.ones(2, 16, 16))
    torch.testing.assert_close(colours.sum(dim=1), torch.ones(2, 16, 16))
    inside, far = (slice(None), slice(2, 4), slice(2, 4)), (slice(None), slice(12, None), slice(12, None))
    assert kinds[0][inside].argmax(dim=0).eq(world.SHAPES.index("square")).all()
    assert colours[0][inside].argmax(dim=0).eq(list(world.COLORS).index("red")).all()
    assert kinds[0][far].argmax(dim=0).eq(len(world.SHAPES)).all()  # background
    assert colours[0][far].argmax(dim=0).eq(list(world.COLORS).index("blue")).all()


def test_the_shape_map_reader_trains_the_unet_resumes_and_is_not_exported(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="shape_map_loss_weight"):
        tiny_model.train(tmp_path / "no", tmp_path / "no-out", _tiny_run(shape_map_loss_weight=-1.0), threads=1)
    # With the plain share on, its rows' maps come from the scenes moved to the first step's cell.
    cfg = replace(_tiny_run(init=str(MODEL_DIR), zero_terminal_snr=True, position_fraction=0.25,
                            plain_rollout_fraction=0.25, caption_dropout=0.0), unet_batch=4)
    tiny_model.train(tmp_path / "without", tmp_path / "out-without", cfg, threads=1)
    with_reader = replace(cfg, shape_map_loss_weight=1.0)
    tiny_model.train(tmp_path / "straight", tmp_path / "out-straight", with_reader, threads=1)

    assert _files(tmp_path / "out-straight") == _files(tmp_path / "out-without")  # the reader stays out of the model
    without = UNet2DConditionModel.from_pretrained(tmp_path / "out-without" / "unet")
    straight = UNet2DConditionModel.from_pretrained(tmp_path / "out-straight" / "unet")
    changed = {k for k, v in straight.state_dict().items() if not torch.equal(v, without.state_dict()[k])}
    assert any(k.startswith("up_blocks.1.") for k in changed)
    assert "shape_map_reader" in torch.load(tmp_path / "straight" / "unet.pt", weights_only=True)

    _killed_in_step_3_then_resumed(tmp_path, monkeypatch, with_reader)
    resumed = UNet2DConditionModel.from_pretrained(tmp_path / "out-interrupted" / "unet")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_the_shape_map_reader_reads_the_x8_latents_features_too(tmp_path):
    """Its maps are half the latent's grid: 8 x 8 on the x8 latent (16 x 16 latents), where up_blocks[1] ends."""
    cfg = replace(
        _tiny_run(latent_downsample=8, shape_map_loss_weight=1.0), unet_steps=2,
        vae_crop_steps=1, vae_full_steps=1, vae_crop_batch=2, vae_full_batch=1, round_trip_scenes=2,
    )
    tiny_model.train(tmp_path / "work", tmp_path / "out", cfg, threads=1)
    state = torch.load(tmp_path / "work" / "unet.pt", weights_only=True)
    assert state["step"] == 2 and "shape_map_reader" in state
