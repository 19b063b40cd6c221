"""The training-memory counter of bench/train_memory.py: a fake-tensor trace counts what a real step saves."""
from __future__ import annotations

import importlib
from functools import cache

import pytest
import torch
from conftest import TINY_SD_UNET_CONFIG

train_memory = importlib.import_module("train_memory")

CPU_FP32 = train_memory.Setting("tiny", image_size=64, batch=2, device="cpu", fp16=False)


@cache
def count(method: str, real: bool = False, setting: train_memory.Setting = CPU_FP32) -> train_memory.MemoryCount:
    return train_memory.count_step(method, setting, real=real, config=dict(TINY_SD_UNET_CONFIG))


@pytest.mark.parametrize("method", ["full", "scedit_ckpt"])
def test_fake_trace_counts_the_same_bytes_as_a_real_cpu_step(method: str) -> None:
    fake, real = count(method), count(method, real=True)
    assert real.saved_activations > 0
    assert fake == real


def test_decoder_checkpointing_reduces_the_counted_bytes() -> None:
    plain, checkpointed = count("scedit"), count("scedit_ckpt")
    assert checkpointed.saved_activations < 0.5 * plain.saved_activations
    assert checkpointed.total() < plain.total()
    assert (checkpointed.weights, checkpointed.gradients) == (plain.weights, plain.gradients)


def test_scedit_saves_less_than_full_fine_tuning_and_trains_fewer_parameters() -> None:
    scedit, full = count("scedit"), count("full")
    assert scedit.saved_activations < full.saved_activations
    assert scedit.trainable_parameters < full.trainable_parameters / 5


def test_cuda_fp16_regime_is_counted_without_a_gpu() -> None:
    setting = train_memory.Setting("tiny", image_size=64, batch=2, device="cuda", fp16=True)
    fp16, fp32 = count("scedit", setting=setting), count("scedit")
    # Frozen weights in fp16, the tuner in fp32; activations mostly fp16 under autocast.
    assert fp16.weights < 0.6 * fp32.weights
    assert 0 < fp16.saved_activations < 0.8 * fp32.saved_activations
    assert fp16.gradients == fp32.gradients


def test_eight_bit_adamw_keeps_two_bytes_per_value_of_large_tensors_only() -> None:
    large, small = torch.nn.Parameter(torch.zeros(1024, 1024)), torch.nn.Parameter(torch.zeros(100))
    assert train_memory.optimizer_state_bytes([large], "adamw") == 8 * 2**20
    eight_bit = train_memory.optimizer_state_bytes([large], "adamw-8bit")
    assert 2 * 2**20 < eight_bit < 2.1 * 2**20  # + one fp32 scale per 256 values per moment
    assert train_memory.optimizer_state_bytes([small], "adamw-8bit") == 8 * 100


# --- the trainer's memory options ---------------------------------------------------------------------------------


def test_fused_adamw_trains_to_the_same_weights_as_plain_adamw(tmp_path, random_sd_folder) -> None:
    from safetensors.torch import load_file

    from scedit_ui.training import TrainingConfig, train_tuner

    def train(optimizer: str) -> dict[str, torch.Tensor]:
        config = TrainingConfig(
            kind="sc", data="shapes:stripes", out=tmp_path / optimizer / "tuner.safetensors", steps=2, batch_size=1,
            base_model=str(random_sd_folder), work_dir=tmp_path / optimizer / "work", optimizer=optimizer,
        )
        return load_file(train_tuner(config).output)

    plain, fused = train("adamw"), train("adamw-fused")
    assert plain.keys() == fused.keys()
    assert all(torch.allclose(plain[k], fused[k], atol=1e-6) for k in plain)
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in fused.items() if k.endswith("ln2.weight"))


def test_eight_bit_adamw_off_a_gpu_and_unknown_optimizers_are_refused_clearly(tmp_path) -> None:
    from scedit_ui.training import TrainingConfig
    from scedit_ui.training.trainer import make_optimizer
    from tuners.validation import UserInputError

    config = TrainingConfig(kind="sc", data="shapes", out=tmp_path / "t.safetensors", optimizer="adamw-8bit").validated()
    with pytest.raises(UserInputError, match="CUDA GPU"):
        make_optimizer(config, [torch.nn.Parameter(torch.zeros(4))], torch.device("cpu"))
    with pytest.raises(UserInputError, match="adamw, adamw-fused, adamw-8bit"):
        TrainingConfig(kind="sc", data="shapes", out=tmp_path / "t.safetensors", optimizer="sgd").validated()
