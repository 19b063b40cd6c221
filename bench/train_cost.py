"""Memory and time of one training step on the SD 1.5 UNet architecture (random weights).

    python bench/train_cost.py [--repeats 3] [--size PX] [--batch N] [--methods full,lora64,...] [--threads 1] [--json [PATH]]

Methods: full fine-tuning; LoRA r=64 and r=6 on the attention projections to_q/to_k/to_v/to_out.0
(peft, through diffusers' `add_adapter`); SCEdit SC-Tuners at down ratio 1 and 0.1 (`SkipEditor.train_mode`);
SCEdit ratio 1 with gradient checkpointing of the decoder (up blocks) only. AdamW for all.

CPU: fp32, 256×256 images (32×32 latents), batch 1, text embeddings a random (1, 77, 768) tensor.
  memory = bytes of the non-parameter tensors saved for backward (counted once per storage through
  `torch.autograd.graph.saved_tensors_hooks`) + gradient bytes + optimizer-state bytes. The frozen
  or trained weights themselves (3.4 GB, the same for every method) are not included.
CUDA: fp16 autocast at 512×512 (64×64 latents); memory = `torch.cuda.max_memory_allocated` during the
  step with only that method set up (weights included), beside the same saved-tensor count.
Time: median over `--repeats` rounds of one full step (forward, backward, optimizer step), after one
warm-up step; the methods run round-robin in one process so background load affects them alike.
Wall-clock and process CPU time are both reported (with one thread, CPU time leaves out waiting for a core).

All methods share one set of UNet weights: each gets a module whose parameters alias the same storage,
so one process holds everything (peak ≈ 15 GB with full fine-tuning's gradients and AdamW state).
Before timing, the script checks that decoder checkpointing leaves the tuner gradients unchanged.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import _common  # noqa: E402

_common.set_threads()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from train_memory import LORA_TARGETS, SavedTensorCounter  # noqa: E402
from train_memory import METHODS as TRAIN_MEMORY_METHODS  # noqa: E402

from tuners import SCTuner, SkipEditor  # noqa: E402

# The methods train_memory.py counts, less the condition tuners: this benchmark runs an SD 1.5 text-to-image step.
METHODS = {key: name for key, name in TRAIN_MEMORY_METHODS.items() if key not in ("csc", "csc3", "controlnet")}
PAPER = {  # SCEdit paper, Table 1 (SD 1.5, GPU): memory in GB, time relative to full fine-tuning
    "full": (53.46, 1.0),
    "lora64": (60.57, 1.24),
    "scedit": (29.02, 0.78),
}


@dataclass
class Batch:
    latents: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    target: torch.Tensor


@dataclass
class Method:
    name: str
    unet: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    counter: SavedTensorCounter
    keep: list = field(default_factory=list)  # editor, tuner: alive as long as the method
    phases: dict[str, list[float]] = field(default_factory=lambda: {"forward": [], "backward": [], "optimizer": []})


def make_method(name: str, base: torch.nn.Module, seed: int = 0) -> Method:
    unet = _common.unet_view(base)
    keep: list = []
    counter = SavedTensorCounter(unet)
    if name == "full":
        unet.requires_grad_(True)
        parameters = list(unet.parameters())
    elif name.startswith("lora"):
        from peft import LoraConfig

        rank = int(name.removeprefix("lora"))
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        parameters = [p for p in unet.parameters() if p.requires_grad]
    else:
        editor = SkipEditor(unet).attach()
        torch.manual_seed(seed)  # the same tuner weights for scedit and scedit_ckpt
        tuner = SCTuner(editor.layout, 0.1 if name.startswith("scedit10") else 1.0).to(next(base.parameters()).device)
        for adapter in tuner.adapters:  # a tuner part-way through training: W_up no longer zero
            torch.nn.init.normal_(adapter.ln2.weight, std=1e-3)
        editor.add_sc_tuner("bench", tuner)
        parameters = editor.train_mode(True)
        counter = SavedTensorCounter(unet, tuner)
        if name.endswith("_ckpt"):  # the trainer's --gradient-checkpointing: only the decoder runs with autograd
            unet.enable_gradient_checkpointing()
        keep = [editor, tuner]
    return Method(name, unet, parameters, torch.optim.AdamW(parameters, lr=1e-6), counter, keep)


def forward_backward(method: Method, batch: Batch, count: bool = False) -> float:
    method.optimizer.zero_grad(set_to_none=True)
    cuda = batch.latents.is_cuda
    autocast = torch.autocast("cuda", torch.float16) if cuda else nullcontext()
    hooks = method.counter.recording() if count else nullcontext()
    started = time.perf_counter()
    with hooks, autocast:
        prediction = method.unet(batch.latents, batch.timestep, batch.text).sample
        loss = F.mse_loss(prediction.float(), batch.target)
    _common.sync()
    forward_done = time.perf_counter()
    loss.backward()
    _common.sync()
    method.phases["forward"].append(forward_done - started)
    method.phases["backward"].append(time.perf_counter() - forward_done)
    return loss.item()


def train_step(method: Method, batch: Batch, count: bool = False) -> None:
    forward_backward(method, batch, count)
    started = time.perf_counter()
    method.optimizer.step()
    _common.sync()
    method.phases["optimizer"].append(time.perf_counter() - started)


def state_bytes(method: Method) -> tuple[int, int]:
    gradients = sum(p.grad.nbytes for p in method.parameters if p.grad is not None)
    optimizer = sum(v.nbytes for state in method.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return gradients, optimizer


def check_checkpointing(base: torch.nn.Module, batch: Batch) -> dict:
    """Tuner gradients with and without decoder checkpointing, from the same weights and batch."""
    plain, checkpointed = make_method("scedit", base), make_method("scedit_ckpt", base)
    losses = [forward_backward(m, batch) for m in (plain, checkpointed)]
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(plain.parameters, checkpointed.parameters))
    scale = max(a.grad.abs().max().item() for a in plain.parameters)
    return {
        # Set on every block; these are the ones whose checkpoints take effect (the decoder's).
        "checkpointed_modules": sum(getattr(m, "gradient_checkpointing", False) for m in checkpointed.unet.up_blocks.modules()),
        "loss": losses,
        "max_abs_gradient_difference": diff,
        "max_abs_gradient": scale,
        "gradients_equal": diff <= 1e-6 * max(scale, 1e-12),
    }


def run(names: list[str], repeats: int, size: int | None, batch_size: int) -> dict:
    device = _common.device()
    cuda = device.type == "cuda"
    latent = (size or (512 if cuda else 256)) // 8
    _common.log(f"building the SD 1.5 UNet (random weights) on {device} ...")
    base = _common.build_sd15_unet(0, device)
    generator = torch.Generator().manual_seed(1)
    batch = Batch(
        latents=torch.randn(batch_size, 4, latent, latent, generator=generator).to(device),
        timestep=torch.full((batch_size,), 500, device=device),
        text=torch.randn(batch_size, 77, 768, generator=generator).to(device),
        target=torch.randn(batch_size, 4, latent, latent, generator=generator).to(device),
    )
    result: dict = {
        "benchmark": "train_cost",
        "machine": _common.machine(),
        "setting": {
            "device": device.type,
            "precision": "fp16 autocast" if cuda else "fp32",
            "image_size": latent * 8,
            "latent_size": latent,
            "batch": batch_size,
            "optimizer": "AdamW (torch defaults)",
            "lora": {"targets": LORA_TARGETS, "alpha": "= r", "dropout": 0.0},
            "memory": "cuda max_memory_allocated during the step (weights included)" if cuda
            else "saved-for-backward non-parameter bytes + gradient bytes + optimizer-state bytes (weights excluded)",
            "time": f"median of {repeats} round-robin steps after a warm-up step" if repeats else "not measured",
        },
    }
    if any(n.endswith("_ckpt") for n in names):
        _common.log("checking that decoder checkpointing leaves gradients unchanged ...")
        result["checkpointing_check"] = check_checkpointing(base, batch)
        gc.collect()

    # Memory, one method at a time. On CPU with timing the methods stay set up and this step is their
    # warm-up; on CUDA each is torn down so that the peak counts only its own state.
    keep = repeats > 0 and not cuda
    methods: dict[str, Method] = {}
    rows: dict[str, dict] = {}
    for name in names:
        _common.log(f"{name}: memory step ...")
        method = make_method(name, base)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        train_step(method, batch, count=True)
        gradients, optimizer = state_bytes(method)
        rows[name] = {
            "method": METHODS[name],
            "trainable_parameters": sum(p.numel() for p in method.parameters),
            "saved_activation_bytes": method.counter.bytes,
            "gradient_bytes": gradients,
            "optimizer_state_bytes": optimizer,
            "memory_bytes": method.counter.bytes + gradients + optimizer,
        }
        if cuda:
            rows[name]["memory_bytes"] = rows[name]["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        if keep:
            methods[name] = method
        del method
        gc.collect()

    if repeats > 0:
        if not keep:
            methods = {name: make_method(name, base) for name in names}
            for method in methods.values():
                train_step(method, batch)  # warm-up
        for method in methods.values():
            method.phases = {phase: [] for phase in method.phases}
        _common.log(f"timing {repeats} round-robin rounds ...")
        tasks = {n: (lambda m=m: train_step(m, batch)) for n, m in methods.items()}
        times = _common.round_robin(tasks, repeats, _common.log)
        for name, method in methods.items():
            rows[name]["step_seconds"] = round(_common.median(times[name]["wall"]), 3)
            rows[name]["step_cpu_seconds"] = round(_common.median(times[name]["cpu"]), 3)
            rows[name]["step_seconds_all"] = [round(t, 3) for t in times[name]["wall"]]
            rows[name]["step_cpu_seconds_all"] = [round(t, 3) for t in times[name]["cpu"]]
            rows[name]["phase_seconds_median"] = {k: round(_common.median(v), 3) for k, v in method.phases.items()}
    result["machine"]["loadavg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    result["methods"] = rows
    result["ratios"] = ratios(rows)
    return result


def ratios(rows: dict[str, dict]) -> dict:
    """The issue's targets (SCEdit memory ≤ 0.5 × LoRA r=64 and ≤ 0.55 × full; step time ≤ 0.8 × full;
    with checkpointing ≤ 0.2 × LoRA r=64 memory), then every method against full fine-tuning."""
    out: dict = {"targets": {}, "saved_activations": {}, "vs_full": {}}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in rows and b in rows and key in rows[a] and key in rows[b]:
            return round(rows[a][key] / rows[b][key], 3)
        return None

    checks = [
        ("scedit_memory_vs_lora64", "scedit", "lora64", "memory_bytes", 0.5),
        ("scedit_memory_vs_full", "scedit", "full", "memory_bytes", 0.55),
        ("scedit_time_vs_full", "scedit", "full", "step_seconds", 0.8),
        ("scedit_cpu_time_vs_full", "scedit", "full", "step_cpu_seconds", 0.8),
        ("scedit_ckpt_memory_vs_lora64", "scedit_ckpt", "lora64", "memory_bytes", 0.2),
    ]
    for key, a, b, what, target in checks:
        value = ratio(a, b, what)
        if value is not None:
            out["targets"][key] = {"value": value, "target": f"<= {target}", "met": value <= target}
    for a, b in (("scedit", "lora64"), ("scedit", "full"), ("scedit_ckpt", "lora64"), ("scedit_ckpt", "scedit")):
        value = ratio(a, b, "saved_activation_bytes")
        if value is not None:
            out["saved_activations"][f"{a}_vs_{b}"] = value
    for name in rows:
        if "full" in rows:
            out["vs_full"][name] = {
                "memory": ratio(name, "full", "memory_bytes"),
                "time": ratio(name, "full", "step_seconds"),
                "cpu_time": ratio(name, "full", "step_cpu_seconds"),
            }
    return out


def print_table(result: dict) -> None:
    setting = result["setting"]
    m = result["machine"]
    print(
        f"One training step, SD 1.5 UNet (random weights), {setting['image_size']}px, batch {setting['batch']}, "
        f"{setting['precision']}, {setting['device']}, {m['threads']} thread(s), load {m['loadavg_1_5_15']} -> {m['loadavg_1_5_15_end']}"
    )
    rows = []
    full = result["methods"].get("full")

    def rel(row: dict, key: str) -> str:
        return f"x{row[key] / full[key]:.2f}" if full and key in row and key in full else ""

    for row in result["methods"].values():
        phases = row.get("phase_seconds_median")
        rows.append([
            row["method"], f"{row['trainable_parameters'] / 1e6:.2f}M", _common.gib(row["saved_activation_bytes"]),
            _common.gib(row["gradient_bytes"] + row["optimizer_state_bytes"]), _common.gib(row["memory_bytes"]),
            rel(row, "memory_bytes"),
            f"{row['step_seconds']:.2f} s" if "step_seconds" in row else "-", rel(row, "step_seconds"),
            f"{row['step_cpu_seconds']:.2f} s" if "step_cpu_seconds" in row else "-", rel(row, "step_cpu_seconds"),
            "/".join(f"{phases[k]:.1f}" for k in ("forward", "backward", "optimizer")) if phases else "-",
        ])
    header = ["method", "trainable", "saved acts", "grad+optim", "memory", "vs full", "step", "vs full", "cpu", "vs full", "fwd/bwd/opt s"]
    print(_common.table(rows, header))
    if "checkpointing_check" in result:
        c = result["checkpointing_check"]
        print(f"\ncheckpointing ({c['checkpointed_modules']} modules): tuner gradients max |diff| "
              f"{c['max_abs_gradient_difference']:.3g} (max |grad| {c['max_abs_gradient']:.3g}) -> equal: {c['gradients_equal']}")
    print("\ntargets:")
    for key, check in result["ratios"]["targets"].items():
        print(f"  {key:<30} {check['value']:.3f}  (target {check['target']})  {'met' if check['met'] else 'MISSED'}")
    print("saved activations only: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"]["saved_activations"].items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up step; 0: memory only (default 3)")
    parser.add_argument("--size", type=int, help="image size in pixels (default 256 on CPU, 512 on CUDA)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    args = parser.parse_args()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    result = run(names, args.repeats, args.size, args.batch)
    _common.report(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
