"""Memory of one training step in the paper's regime, counted without running the compute.

    python bench/train_memory.py [--architectures sd15,sdxl] [--batches 1,4,8] [--methods full,lora64,...]
                                 [--validate] [--plot PNG] [--json [PATH]]
    python bench/train_memory.py --cuda-confirm [--json [PATH]]     # on a machine with a CUDA GPU

One training step of the real SD 1.5 UNet (512 px) or SDXL UNet (1024 px) is traced with fake tensors
(`torch._subclasses.fake_tensor.FakeTensorMode`): every op computes shapes and dtypes only, so no memory is
used and nothing is computed. The tensors live on a fake CUDA device under fp16 autocast (CUDA's cast
policy; attention is the flash kernel a GPU runs, see `FlashAttention`), frozen weights in fp16 and
trainable ones in fp32, as diffusers' training scripts and this project's trainer hold them.

    memory = weights + saved activations + gradients + optimizer state

- saved activations: the distinct storages autograd saves for backward (`saved_tensors_hooks`), weights
  excluded, plus the inputs that gradient checkpointing keeps for its recomputation;
- gradients: one per trainable parameter, in its dtype (fp32);
- optimizer state: AdamW (torch, also fused) two fp32 moments per trainable parameter; 8-bit AdamW
  (bitsandbytes) one byte per moment plus one fp32 scale per 256 values, fp32 moments for tensors under
  4096 values (bitsandbytes' `min_8bit_size`).

It leaves out what lives only for a moment or hardly depends on the method: the allocator's rounding and
cache, the temporaries of one op, the activation gradients of backward (freed as it goes), the skip tensors
waiting for the decoder, the temporaries of torch's multi-tensor AdamW step (the fused kernel has none).
`--cuda-confirm` measures three of the counted figures with `torch.cuda.max_memory_allocated` on a GPU.

`--validate` runs one real step on CPU (fp32, 256 px, batch 1, random weights) for full fine-tuning, SCEdit
and SCEdit + checkpointing, and checks that the same step traced with fake CPU tensors counts the same
bytes. The table prints the total with AdamW for each batch size and with 8-bit AdamW for the largest.

Methods: full fine-tuning; LoRA r=64 / r=6 (peft on to_q, to_k, to_v, to_out.0, like diffusers' LoRA
training script); SCEdit SC-Tuner ratio 1 / 0.1 through `SkipEditor.train_mode` (the encoder and mid block
run without autograd); SCEdit + decoder gradient checkpointing; a CSC-Tuner (k = 1 and k = 3) trained on
a condition against diffusers' `ControlNetModel` (ControlNet trainable, UNet frozen, as diffusers'
ControlNet training script).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common  # noqa: E402

_common.set_threads()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from tuners import ControlCondition, CSCTuner, SCTuner, SkipEditor  # noqa: E402
from tuners.reference_configs import REFERENCE_UNET_CONFIGS, guess_architecture  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
METHODS = {
    "full": "full fine-tuning",
    "lora64": "LoRA r=64",
    "lora6": "LoRA r=6",
    "scedit": "SCEdit (ratio 1)",
    "scedit10": "SCEdit10 (ratio 0.1)",
    "scedit_ckpt": "SCEdit + decoder checkpointing",
    "scedit10_ckpt": "SCEdit10 + decoder checkpointing",
    "csc": "CSC-Tuner (k=1)",
    "csc3": "CSC-Tuner (k=3)",
    "controlnet": "ControlNet (diffusers)",
}
OPTIMIZERS = {  # the trainer's --optimizer choices; torch's AdamW, plain or fused, keeps the same state
    "adamw": "AdamW (torch, plain or fused)",
    "adamw-8bit": "8-bit AdamW (bitsandbytes)",
}
NATIVE_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
NAMES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL"}
TEXT_TOKENS = 77
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 moments for smaller tensors
BNB_BLOCK = 256  # values per fp32 absmax scale in bitsandbytes' blockwise 8-bit state
PAPER = {"full": 53.46, "lora64": 60.57, "scedit": 29.02}  # SCEdit paper, Table 1, GB (SD 1.5, batch not stated)
TARGETS = (  # (name, method, reference, at most), checked at 512 px batch 8 on SD 1.5
    ("SCEdit <= 0.55 x full", "scedit", "full", 0.55),
    ("SCEdit <= 0.5 x LoRA r=64", "scedit", "lora64", 0.5),
    ("SCEdit + checkpointing <= 0.2 x LoRA r=64", "scedit_ckpt", "lora64", 0.2),
    ("CSC <= 0.7 x ControlNet", "csc", "controlnet", 0.7),
)


@dataclass(frozen=True)
class Setting:
    """What one step is counted in: the paper's regime is CUDA, fp16 autocast, native size."""

    architecture: str = "sd15"
    image_size: int = 512
    batch: int = 8
    device: str = "cuda"
    fp16: bool = True  # autocast fp16, frozen weights fp16, trainable weights fp32

    @property
    def latent_size(self) -> int:
        return self.image_size // 8


@dataclass
class MemoryCount:
    """Bytes of one training step, with the optimizer state of each optimizer in `OPTIMIZERS`."""

    weights: int
    saved_activations: int
    gradients: int
    optimizer_state: dict[str, int]
    trainable_parameters: int

    def total(self, optimizer: str = "adamw") -> int:
        """weights + saved activations + gradients + optimizer state (gradients appear in backward while the
        activations are freed, so this errs high on that part and leaves out the temporaries)."""
        return self.weights + self.saved_activations + self.gradients + self.optimizer_state[optimizer]


# --- the counter -------------------------------------------------------------------------------------------------


def _storage_key(tensor: torch.Tensor) -> int:
    # The StorageImpl's address: one per storage, for fake tensors as for real ones (whose data_ptr is 0 on meta).
    return tensor.untyped_storage()._cdata


class SavedTensorCounter:
    """Distinct storages that autograd saves for backward, weights excluded, each counted once.

    Counts only inside `recording()`, one forward pass. The graph holds every saved tensor until
    backward, so no other storage can take a counted one's address meanwhile, and keys do not collide.
    Inside a gradient checkpoint, torch's own hooks take precedence and keep nothing; what the checkpoint
    keeps, its inputs, it saves through the hooks outside it (`_NoopSaveInputs`), so they are counted.
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.exclude = {_storage_key(t) for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.storages: dict[int, int] = {}
        self.active = False

    def add(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if self.active and key not in self.exclude and key not in self.storages:
            self.storages[key] = tensor.untyped_storage().nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Count what the forward pass inside saves, from zero."""
        self.storages, self.active = {}, True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                yield
        finally:
            self.active = False


class FlashAttention(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` on fake CUDA tensors to the flash-attention kernel.

    Without a GPU, PyTorch's kernel choice falls back to the math path, which saves the full attention
    matrix (4096² per head at 512 px); a GPU runs flash attention here (fp16, no mask), which saves
    q, k, v, the output and the log-sum-exp.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = args[:3]
            if query.is_cuda and kwargs.get("attn_mask") is None and query.dtype in (torch.float16, torch.bfloat16):
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), scale=kwargs.get("scale"),
                )[0]
        return func(*args, **kwargs)


@contextmanager
def cuda_autocast_fp16() -> Iterator[None]:
    """fp16 autocast for CUDA tensors. `torch.autocast("cuda")` switches itself off on a machine without a
    GPU; the dispatcher applies CUDA's cast policy to fake CUDA tensors all the same."""
    previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.float16)
    torch.autocast_increment_nesting()
    torch.set_autocast_cache_enabled(True)
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", previous[0])
        torch.set_autocast_dtype("cuda", previous[1])
        torch.set_autocast_cache_enabled(previous[2])


def optimizer_state_bytes(parameters: list[nn.Parameter], optimizer: str) -> int:
    if optimizer in ("adamw", "adamw-fused"):
        return sum(2 * p.numel() * p.element_size() for p in parameters)
    if optimizer == "adamw-8bit":
        total = 0
        for p in parameters:
            n = p.numel()
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 2 * 4 * n
        return total
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


# --- the methods -------------------------------------------------------------------------------------------------


@dataclass
class TrainingSetup:
    """One method ready for a step: the modules that hold weights, and the step's forward pass."""

    model: nn.Module  # every module with weights (UNet, adapters, tuner, ControlNet)
    forward: Callable[[dict[str, Any]], torch.Tensor]
    keep: tuple = ()  # editor, hooks: alive as long as the setup


def unet_config(architecture: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**REFERENCE_UNET_CONFIGS[architecture], **(overrides or {})}


def build_setup(method: str, config: dict[str, Any], condition: torch.Tensor) -> TrainingSetup:
    """`method` on a UNet of `config`, built on the meta device (shapes only; `materialize` gives it weights).
    `condition` is the batch's condition image for CSC and ControlNet, a real CPU tensor: the editor hashes it,
    and set here, before the tuner has fake weights, because moving fake parameters (`Module.to`) fails."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.train()
    unet.requires_grad_(False)

    def unet_forward(batch: dict[str, Any], **extra: Any) -> torch.Tensor:
        return unet(batch["latents"], batch["timestep"], batch["text"], added_cond_kwargs=batch.get("added"), **extra).sample

    if method == "full":
        unet.requires_grad_(True)
        return TrainingSetup(unet, unet_forward)
    if method.startswith("lora"):
        from peft import LoraConfig

        rank = int(method.removeprefix("lora"))
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        return TrainingSetup(unet, unet_forward)
    if method == "controlnet":
        with torch.device("meta"):
            controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        controlnet.train()
        model = nn.ModuleDict({"unet": unet, "controlnet": controlnet})

        def controlnet_forward(batch: dict[str, Any]) -> torch.Tensor:
            down, mid = controlnet(
                batch["latents"], batch["timestep"], batch["text"], controlnet_cond=condition.to(batch["latents"].device),
                added_cond_kwargs=batch.get("added"), return_dict=False,
            )
            return unet_forward(batch, down_block_additional_residuals=down, mid_block_additional_residual=mid)

        return TrainingSetup(model, controlnet_forward)

    editor = SkipEditor(unet).attach()
    with torch.device("meta"):
        if method.startswith("csc"):
            # The official SDXL controllers widen the hint encoder (PRE_HINT_OUT_CHANNELS 320, DIM_RATIO 2.0).
            hint = {"hint_channels": 320, "hint_dim_ratio": 2.0} if guess_architecture(config) == "sdxl" else {}
            tuner: nn.Module = CSCTuner(editor.layout, kernel_size=3 if method == "csc3" else 1, **hint)
        else:
            tuner = SCTuner(editor.layout, 0.1 if method.startswith("scedit10") else 1.0)
    if isinstance(tuner, SCTuner):
        editor.add_sc_tuner("bench", tuner)
    else:
        editor.set_conditions([ControlCondition(tuner, condition)])
    editor.train_mode(True)
    model = nn.ModuleDict({"unet": unet, "tuner": tuner})

    return TrainingSetup(model, unet_forward, keep=(editor,))


def materialize(model: nn.Module, setting: Setting, fake: FakeTensorMode | None) -> None:
    """Give every meta parameter and buffer a tensor on `setting.device`: fake under `fake`, else real random
    values (costs depend on shapes, not values). Trainable weights fp32; frozen ones fp16 in the fp16 regime."""
    generator = torch.Generator().manual_seed(0)

    def tensor(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if fake is not None:
            with fake:
                return torch.empty(like.shape, dtype=dtype, device=setting.device)
        return (torch.randn(like.shape, generator=generator) * 0.02).to(setting.device, dtype)

    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                dtype = torch.float16 if setting.fp16 and not parameter.requires_grad else torch.float32
                module._parameters[name] = nn.Parameter(tensor(parameter, dtype), requires_grad=parameter.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = tensor(buffer, buffer.dtype)


def make_batch(setting: Setting, config: dict[str, Any]) -> dict[str, Any]:
    """Inputs of one step, as a training loop feeds them: latents fp32, text embeddings in the text
    encoder's dtype. The timestep is a Python number (fake tensors have no values to read back)."""
    b, s = setting.batch, setting.latent_size
    text_dtype = torch.float16 if setting.fp16 else torch.float32
    batch: dict[str, Any] = {
        "latents": torch.randn(b, config["in_channels"], s, s, device=setting.device),
        "timestep": 500,
        "text": torch.randn(b, TEXT_TOKENS, config["cross_attention_dim"], device=setting.device, dtype=text_dtype),
        "target": torch.randn(b, config["out_channels"], s, s, device=setting.device),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        batch["added"] = {
            "text_embeds": torch.randn(b, pooled, device=setting.device, dtype=text_dtype),
            "time_ids": torch.randn(b, 6, device=setting.device, dtype=text_dtype),
        }
    return batch



def count_step(method: str, setting: Setting, real: bool = False, config: dict[str, Any] | None = None) -> MemoryCount:
    """Count one training step of `method`: traced on fake tensors, or with `real` run for real (on CPU,
    to validate the trace; on CUDA, by `--cuda-confirm`). `config` overrides the architecture's UNet
    config (the tests use a tiny one)."""
    config = config or unet_config(setting.architecture)
    setup, counter, fake = prepare(method, setting, real, config)
    loss = forward(setup, setting, config, counter, fake)
    del loss
    return memory_count(setup, counter)


def prepare(method: str, setting: Setting, real: bool, config: dict[str, Any]) -> tuple[TrainingSetup, SavedTensorCounter, FakeTensorMode | None]:
    if setting.fp16 and setting.device != "cuda":
        raise ValueError("the fp16 regime is CUDA autocast; count CPU steps in fp32")
    condition = torch.rand(setting.batch, 3, setting.image_size, setting.image_size)
    setup = build_setup(method, config, condition)
    fake = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    materialize(setup.model, setting, fake)
    counter = SavedTensorCounter(setup.model)
    if method.endswith("_ckpt"):
        # The trainer's --gradient-checkpointing. The encoder and mid block run without autograd, where
        # diffusers does not checkpoint, so only the decoder's blocks are.
        setup.model["unet"].enable_gradient_checkpointing()
    return setup, counter, fake


def forward(
    setup: TrainingSetup, setting: Setting, config: dict[str, Any], counter: SavedTensorCounter, fake: FakeTensorMode | None,
) -> torch.Tensor:
    """The forward pass and loss of one step, with every saved tensor counted."""
    with ExitStack() as stack:
        if fake is not None:
            stack.enter_context(fake)
            stack.enter_context(FlashAttention())
        batch = make_batch(setting, config)
        if setting.fp16:
            stack.enter_context(cuda_autocast_fp16())
        with counter.recording():
            prediction = setup.forward(batch)
            return F.mse_loss(prediction.float(), batch["target"].float())


def memory_count(setup: TrainingSetup, counter: SavedTensorCounter) -> MemoryCount:
    parameters = [p for p in setup.model.parameters() if p.requires_grad]
    return MemoryCount(
        weights=sum(t.numel() * t.element_size() for t in [*setup.model.parameters(), *setup.model.buffers()]),
        saved_activations=counter.bytes,
        gradients=sum(p.numel() * p.element_size() for p in parameters),
        optimizer_state={name: optimizer_state_bytes(parameters, name) for name in OPTIMIZERS},
        trainable_parameters=sum(p.numel() for p in parameters),
    )


# --- the benchmark -----------------------------------------------------------------------------------------------


def count_all(architectures: list[str], batches: list[int], methods: list[str]) -> dict[str, Any]:
    """Every method at every batch size, per architecture at its native size."""
    rows: dict[str, Any] = {}
    for architecture in architectures:
        rows[architecture] = {}
        for method in methods:
            rows[architecture][method] = {}
            for batch in batches:
                setting = Setting(architecture, NATIVE_SIZE[architecture], batch)
                count = count_step(method, setting)
                rows[architecture][method][batch] = {**asdict(count), "total": {o: count.total(o) for o in OPTIMIZERS}}
                _common.log(f"{architecture} {method} batch {batch}: {_common.gib(count.total())}")
                gc.collect()
    return rows


def targets(rows: dict[str, Any], optimizer: str = "adamw") -> list[dict[str, Any]]:
    """The issue's targets on SD 1.5 at 512 px, at every counted batch size: total memory ratios, and the
    saved activations' ratios beside them."""
    methods = rows.get("sd15", {})
    out = []
    for name, method, reference, limit in TARGETS:
        if method not in methods or reference not in methods:
            continue
        for batch in sorted(set(methods[method]) & set(methods[reference]), key=int):
            a, b = methods[method][batch], methods[reference][batch]
            ratio = a["total"][optimizer] / b["total"][optimizer]
            out.append({
                "target": name, "batch": batch, "ratio": round(ratio, 3), "met": ratio <= limit,
                "saved_activations_ratio": round(a["saved_activations"] / b["saved_activations"], 3),
            })
    return out


def validate(methods: tuple[str, ...] = ("full", "scedit", "scedit_ckpt")) -> dict[str, Any]:
    """Fake trace against a real CPU step (SD 1.5, fp32, 256 px, batch 1): the same saved bytes?"""
    setting = Setting("sd15", 256, 1, "cpu", fp16=False)
    out = {}
    for method in methods:
        _common.log(f"validation: {method}, fake trace and real CPU step ...")
        fake, real = count_step(method, setting), count_step(method, setting, real=True)
        out[method] = {"fake": fake.saved_activations, "real": real.saved_activations, "same": fake == real}
        gc.collect()
    return out


def cuda_confirm(methods: tuple[str, ...] = ("full", "lora64", "scedit"), batch: int = 8) -> dict[str, Any]:
    """Three counted figures against `torch.cuda.max_memory_allocated` on a GPU: SD 1.5, 512 px, fp16
    autocast, one real step (forward, backward, torch AdamW step), each method alone in memory."""
    if not torch.cuda.is_available():
        raise SystemExit("--cuda-confirm needs a CUDA GPU; PyTorch sees none")
    setting = Setting("sd15", 512, batch)
    config = unet_config("sd15")
    out = {"device": torch.cuda.get_device_name(), "setting": asdict(setting), "methods": {}}
    for method in methods:
        counted = count_step(method, setting)
        gc.collect()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        setup, counter, _ = prepare(method, setting, True, config)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = forward(setup, setting, config, counter, None)
        after_forward = torch.cuda.memory_allocated()
        loss.backward()
        parameters = [p for p in setup.model.parameters() if p.requires_grad]
        torch.optim.AdamW(parameters, lr=1e-6).step()
        torch.cuda.synchronize()
        measured = memory_count(setup, counter)
        out["methods"][method] = {
            "counted_total": counted.total(),
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "counted_saved_activations": counted.saved_activations,
            "real_saved_activations": measured.saved_activations,  # the same hooks on the real GPU step
            "allocated_by_forward": after_forward - before,
            "weights": measured.weights,
        }
        _common.log(f"confirm {method}: {out['methods'][method]}")
        del setup, counter, loss, parameters
        gc.collect()
        torch.cuda.empty_cache()
    return out


def plot(rows: dict[str, Any], path: Path, optimizer: str = "adamw") -> None:
    """Memory against batch size, one line per method, one panel per architecture."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (a bench extra in requirements-dev.txt)") from None
    figure, axes = plt.subplots(1, len(rows), figsize=(6.2 * len(rows), 5.2), squeeze=False)
    for axis, (architecture, methods) in zip(axes[0], rows.items()):
        for method, by_batch in methods.items():
            batches = sorted(by_batch, key=int)  # int keys, or str keys from a --json file
            style = "--" if method in ("full", "lora64", "lora6", "controlnet") else "-"
            totals = [by_batch[b]["total"][optimizer] / 2**30 for b in batches]
            axis.plot([int(b) for b in batches], totals, style, marker="o", label=METHODS[method])
        axis.set_title(f"{NAMES[architecture]} UNet, {NATIVE_SIZE[architecture]} px, fp16 autocast, {OPTIMIZERS[optimizer]}", fontsize=9)
        axis.set_xlabel("batch size")
        axis.set_ylabel("counted training memory (GiB)")
        axis.set_xticks([int(b) for b in batches])
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=110)
    _common.log(f"wrote {path}")


def print_result(result: dict[str, Any]) -> None:
    if "validation" in result:
        print("Validation: saved-activation bytes, fake trace vs real CPU step (SD 1.5, fp32, 256 px, batch 1)")
        for method, v in result["validation"].items():
            print(f"  {METHODS[method]:<34} fake {v['fake']:>12,}  real {v['real']:>12,}  {'same' if v['same'] else 'DIFFERENT'}")
        print()
    for architecture, methods in result.get("rows", {}).items():
        print(f"{NAMES[architecture]} UNet, {NATIVE_SIZE[architecture]} px, fp16 autocast; GiB (2^30 bytes); AdamW unless named")
        batches = sorted({b for m in methods.values() for b in m}, key=int)
        header = ["method", "trainable", "weights", "grads+AdamW"] + [f"saved b{b}" for b in batches] + [f"total b{b}" for b in batches] + [f"8-bit b{batches[-1]}"]
        table = []
        for method, by_batch in methods.items():
            first, last = by_batch[batches[0]], by_batch[batches[-1]]
            table.append(
                [METHODS[method], f"{first['trainable_parameters'] / 1e6:.2f}M", f"{first['weights'] / 2**30:.2f}",
                 f"{(first['gradients'] + first['optimizer_state']['adamw']) / 2**30:.2f}"]
                + [f"{by_batch[b]['saved_activations'] / 2**30:.2f}" for b in batches]
                + [f"{by_batch[b]['total']['adamw'] / 2**30:.2f}" for b in batches]
                + [f"{last['total']['adamw-8bit'] / 2**30:.2f}"]
            )
        print(_common.table(table, header))
        print()
    if result.get("targets"):
        print("Targets (SD 1.5, 512 px, AdamW): total memory ratio (saved activations alone)")
        for t in result["targets"]:
            print(f"  {t['target']:<44} batch {t['batch']:>3}  {t['ratio']:.3f} ({t['saved_activations_ratio']:.3f})  {'met' if t['met'] else 'MISSED'}")
    if "cuda_confirm" in result:
        print(f"CUDA confirm on {result['cuda_confirm']['device']}")
        for method, c in result["cuda_confirm"]["methods"].items():
            print(f"  {METHODS[method]:<34} counted {_common.gib(c['counted_total'])}  max_memory_allocated {_common.gib(c['max_memory_allocated'])}"
                  f"  saved counted {_common.gib(c['counted_saved_activations'])} / on GPU {_common.gib(c['real_saved_activations'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--architectures", default="sd15,sdxl", help="comma-separated: sd15 (512 px), sd21 (768 px), sdxl (1024 px)")
    parser.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes (default 1,4,8)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--validate", action="store_true", help="also check the trace against a real CPU step (256 px, ~1 min, ~5 GB)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="draw memory against batch size (needs matplotlib)")
    parser.add_argument("--cuda-confirm", action="store_true", help="only: measure three counted figures on a CUDA GPU")
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "train_memory", "machine": _common.machine()}
    if args.cuda_confirm:
        result["cuda_confirm"] = cuda_confirm()
    else:
        architectures = [a.strip() for a in args.architectures.split(",") if a.strip()]
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [a for a in architectures if a not in NATIVE_SIZE] + [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown architecture(s) or method(s) {unknown}; architectures {list(NATIVE_SIZE)}, methods {list(METHODS)}")
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            parser.error(f"--batches takes whole numbers separated by commas, got {args.batches!r}")
        if args.validate:
            result["validation"] = validate()
        result["rows"] = count_all(architectures, batches, methods)
        result["targets"] = targets(result["rows"])
        if args.plot:
            plot(result["rows"], args.plot)
    _common.report(result, args.json, print_result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
