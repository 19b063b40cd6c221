"""Time per image of controlled generation on the SD 1.5 UNet architecture (random weights), relative
to the plain UNet.

    python bench/control_cost.py [--repeats 5] [--steps 20] [--mode calls|loop] [--kernel 1] [--threads 1] [--json [PATH]]

Variants (all through `tuners.SkipEditor` except ControlNet):
  plain          the UNet alone
  plain_aa       the UNet alone again, as a second module on the same weights (what every editor variant
                 uses): an A/A control whose ratio to plain is the noise of the measurement
  csc1/2/3       1, 2, 3 CSC-Tuners (k = `--kernel`), each with its own condition image; condition
                 features cached: computed once per image, reused by every call and both CFG halves
  csc1_recompute 1 CSC-Tuner recomputing the condition branch on every UNet call, as the reference
                 implementation does: a UNet forward pre-hook, registered before the editor's, clears
                 `editor.cache` before every call (features are recomputed from the (1, 3, H, W) image
                 and broadcast over the CFG batch, so this is a lower bound on the reference's cost)
  controlnet     diffusers `ControlNetModel.from_unet(unet)`; its residuals go to the UNet as
                 `down_block_additional_residuals` / `mid_block_additional_residual` on every call,
                 with the condition image repeated for both CFG halves, as diffusers' pipeline does
  sc             one SC-Tuner (down ratio 1)
  rho            Skip-Tuning ρ linear 1.0 → 0.8

One image = `--steps` DDIM steps with classifier-free guidance (UNet batch 2), random (2, 77, 768)
text embeddings, no VAE and no text encoder (the same for every variant, so they would only dilute the
ratios). CPU: 256×256 (32×32 latents); CUDA: 512×512.

`--mode loop` (default on CUDA) times whole 20-step generations. `--mode calls` (default on CPU, where
one SD 1.5 call takes seconds and 8 variants × 20 steps would not fit in 10 minutes) times single
UNet calls and extrapolates: image = steps × call + the once-per-image condition features
(timed separately). Both modes run the variants round-robin, `--repeats` rounds, medians, with wall
and process CPU time; with one CPU thread the targets are judged on CPU time, which leaves out the
waits for a core on a shared machine. On CPU in calls mode, `added` is the time spent during those
same calls in what the variant adds (the editor's hooks, timed by hooks around them, or the ControlNet
forward): a precise measure of overheads too small for the whole-call timing to resolve, and
`ratio from added` = (plain + steps × added + once-per-image features) / plain.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import _common  # noqa: E402

_common.set_threads()

import torch  # noqa: E402
from diffusers import ControlNetModel, DDIMScheduler  # noqa: E402

from tuners import ControlCondition, CSCTuner, SCTuner, SkipEditor, SkipScaling  # noqa: E402

VARIANTS = {
    "plain": "plain UNet",
    "plain_aa": "plain UNet again (A/A control)",
    "csc1": "+1 CSC (cached features)",
    "csc2": "+2 CSC (cached features)",
    "csc3": "+3 CSC (cached features)",
    "csc1_recompute": "+1 CSC, recomputed every call",
    "controlnet": "+ ControlNet (diffusers)",
    "sc": "+ SC-Tuner (ratio 1)",
    "rho": "+ Skip-Tuning rho 1.0->0.8",
}
TARGETS = {"csc1": 1.08, "csc3": 1.2, "sc": 1.05, "rho": 1.01}
GUIDANCE = 7.5
CLOCKS = ("wall", "cpu")


def clocks() -> dict[str, float]:
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


class AddedCostTimer:
    """Wall and CPU seconds spent in what a variant adds to the plain UNet call: the editor's hooks
    (timer pre-hooks prepended before and appended after the editor's, on the UNet, where condition
    features are computed on a cache miss, and on every up block, where the skips are edited), or the
    ControlNet forward. CPU only: on CUDA the kernels run asynchronously to these timers."""

    def __init__(self, unet: torch.nn.Module | None = None) -> None:
        self.seconds = dict.fromkeys(CLOCKS, 0.0)
        self._started = clocks()
        for module in (unet, *unet.up_blocks) if unet is not None else ():
            module.register_forward_pre_hook(lambda module, args: self.begin(), prepend=True)
            module.register_forward_pre_hook(lambda module, args: self.end())

    def begin(self) -> None:
        self._started = clocks()

    def end(self) -> None:
        now = clocks()
        for clock in CLOCKS:
            self.seconds[clock] += now[clock] - self._started[clock]

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, dict.fromkeys(CLOCKS, 0.0)
        return seconds


@dataclass
class Variant:
    name: str
    unet_call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (CFG latents, t) -> noise prediction
    editor: SkipEditor | None = None
    per_image: Callable[[], None] | None = None  # once-per-image work (condition features)
    timer: AddedCostTimer | None = None


def make_variants(names: list[str], base: torch.nn.Module, text: torch.Tensor, size: int, kernel: int) -> dict[str, Variant]:
    device, dtype = text.device, text.dtype
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 3, size, size, generator=generator).to(device) for _ in range(3)]
    variants: dict[str, Variant] = {}
    for name in names:
        if name == "plain":
            variants[name] = Variant(name, lambda x, t: base(x, t, text).sample)
        elif name == "plain_aa":  # a second module on the same weights, no edits: shows the noise floor
            unet = _common.unet_view(base).eval()
            variants[name] = Variant(name, lambda x, t, unet=unet: unet(x, t, text).sample)
        elif name == "controlnet":
            controlnet = ControlNetModel.from_unet(base).to(device).eval()
            if dtype != torch.float32:  # (casting to float32 would only print a diffusers warning)
                controlnet.to(dtype)
            hint = images[0].to(dtype).repeat(2, 1, 1, 1)
            timer = AddedCostTimer()

            def call(x: torch.Tensor, t: torch.Tensor, controlnet=controlnet, hint=hint, timer=timer) -> torch.Tensor:
                timer.begin()
                down, mid = controlnet(x, t, text, controlnet_cond=hint, conditioning_scale=1.0, return_dict=False)
                timer.end()
                return base(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

            variants[name] = Variant(name, call, timer=timer)
        else:
            unet = _common.unet_view(base).eval()
            editor = SkipEditor(unet)
            if name == "csc1_recompute":  # registered before the editor's pre-hook, so it runs first
                unet.register_forward_pre_hook(lambda module, args, cache=editor.cache: cache.clear())
            editor.attach()
            if name.startswith("csc"):
                count = 1 if name == "csc1_recompute" else int(name[3])
                tuners = [CSCTuner(editor.layout, kernel, f"condition{i}").to(device, dtype).eval() for i in range(count)]
                editor.set_conditions([ControlCondition(tuner, image) for tuner, image in zip(tuners, images)])
            elif name == "sc":
                editor.add_sc_tuner("style", SCTuner(editor.layout).to(device, dtype).eval())
            elif name == "rho":
                editor.set_skip_scaling(SkipScaling.linear(editor.layout.num_skips, 1.0, 0.8))
            per_image = None
            if name in ("csc1", "csc2", "csc3"):
                def per_image(editor=editor) -> None:
                    for condition in editor.conditions:
                        condition.tuner.condition_features(condition.image)
            call = lambda x, t, unet=unet: unet(x, t, text).sample  # noqa: E731
            variants[name] = Variant(name, call, editor, per_image, AddedCostTimer(unet))
    return variants


def cfg_call(variant: Variant, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    noise = variant.unet_call(torch.cat([latents, latents]), t)
    uncond, cond = noise.chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def generate(variant: Variant, scheduler: DDIMScheduler, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """A plain DDIM loop with classifier-free guidance; a new image starts with an empty feature cache."""
    if variant.editor is not None:
        variant.editor.cache.clear()
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        latents = scheduler.step(cfg_call(variant, latents, t), t, latents).prev_sample
    return latents


def once_per_image_seconds(variant: Variant, repeats: int = 5) -> dict[str, float]:
    if variant.per_image is None:
        return dict.fromkeys(CLOCKS, 0.0)
    samples = []
    for _ in range(repeats):
        _common.sync()
        started = clocks()
        variant.per_image()
        _common.sync()
        ended = clocks()
        samples.append({c: ended[c] - started[c] for c in CLOCKS})
    return {c: _common.median(s[c] for s in samples) for c in CLOCKS}


def measure(variants: dict[str, Variant], mode: str, steps: int, repeats: int, latents: torch.Tensor) -> dict[str, dict]:
    in_calls = mode == "calls" and latents.device.type == "cpu"
    timers = {n: v.timer for n, v in variants.items() if v.timer is not None and in_calls}
    t = torch.tensor(500, device=latents.device)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False, set_alpha_to_one=False
    )
    if mode == "loop":
        task = lambda v: generate(v, scheduler, latents, steps)  # noqa: E731
    else:
        task = lambda v: cfg_call(v, latents, t)  # noqa: E731
    added: dict[str, list[dict[str, float]]] = {n: [] for n in timers}

    def run(variant: Variant) -> None:
        task(variant)
        if variant.name in timers:
            added[variant.name].append(timers[variant.name].take())

    with torch.no_grad():
        for variant in variants.values():  # warm-up; in calls mode this also fills the feature caches
            _common.log(f"{variant.name}: warm-up ...")
            run(variant)
        for values in added.values():
            values.clear()
        tasks = {n: (lambda v=v: run(v)) for n, v in variants.items()}
        times = _common.round_robin(tasks, repeats, _common.log)
        per_image = {n: once_per_image_seconds(v) for n, v in variants.items()} if mode == "calls" else {}

    rows = {}
    for name, samples in times.items():
        row: dict = {"variant": VARIANTS[name], "seconds_all": {c: [round(x, 4) for x in samples[c]] for c in CLOCKS}}
        median = {c: _common.median(samples[c]) for c in CLOCKS}
        if mode == "calls":
            row["call_seconds"] = {c: round(median[c], 4) for c in CLOCKS}
            row["per_image_seconds"] = {c: round(per_image[name][c], 4) for c in CLOCKS}
            row["image_seconds"] = {c: round(steps * median[c] + per_image[name][c], 3) for c in CLOCKS}
        else:
            row["image_seconds"] = {c: round(median[c], 3) for c in CLOCKS}
        if name in added:
            row["added_seconds_per_call"] = {c: round(_common.median(e[c] for e in added[name]), 5) for c in CLOCKS}
        rows[name] = row
    return rows


def run(names: list[str], mode: str | None, steps: int, repeats: int, kernel: int) -> dict:
    device = _common.device()
    cuda = device.type == "cuda"
    mode = mode or ("loop" if cuda else "calls")
    size = 512 if cuda else 256
    dtype = torch.float16 if cuda else torch.float32
    _common.log(f"building the SD 1.5 UNet (random weights) on {device} ...")
    base = _common.build_sd15_unet(0, device).eval()
    if dtype != torch.float32:
        base.to(dtype)
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(2, 77, 768, generator=generator).to(device, dtype)  # [uncond; cond]
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(device, dtype)
    variants = make_variants(names, base, text, size, kernel)
    machine = _common.machine()
    rows = measure(variants, mode, steps, repeats, latents)
    machine["loadavg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    # One thread on a CPU: judge by CPU time, which leaves out the waits for a core on a shared machine.
    primary = "cpu" if not cuda and machine["threads"] == 1 else "wall"
    plain = rows.get("plain")
    ratios: dict[str, dict[str, float]] = {}
    if plain:
        for name, row in rows.items():
            row["ratio_to_plain"] = {c: round(row["image_seconds"][c] / plain["image_seconds"][c], 4) for c in CLOCKS}
            ratios[name] = row["ratio_to_plain"]
            if "added_seconds_per_call" in row:
                row["ratio_from_added_cost"] = {
                    c: round(
                        (plain["image_seconds"][c] + steps * row["added_seconds_per_call"][c] + row["per_image_seconds"][c])
                        / plain["image_seconds"][c], 4,
                    )
                    for c in CLOCKS
                }
    targets = {}
    for name, limit in TARGETS.items():
        if name in ratios:
            target = {"target": f"<= {limit}", "clock": primary, "value": ratios[name][primary], "met": ratios[name][primary] <= limit}
            if "ratio_from_added_cost" in rows[name]:
                added = rows[name]["ratio_from_added_cost"][primary]
                target.update(value_from_added_cost=added, met_from_added_cost=added <= limit)
            if "plain_aa" in ratios:
                target["a_a_control"] = ratios["plain_aa"][primary]
            targets[name] = target
    return {
        "benchmark": "control_cost",
        "machine": machine,
        "setting": {
            "device": device.type,
            "precision": "fp16" if cuda else "fp32",
            "image_size": size,
            "steps": steps,
            "guidance": GUIDANCE,
            "unet_batch": 2,
            "csc_kernel": kernel,
            "mode": mode,
            "method": (
                f"median of {repeats} round-robin single UNet calls (CFG batch 2), extrapolated: "
                f"image = {steps} x call + once-per-image condition features" if mode == "calls"
                else f"median of {repeats} round-robin {steps}-step DDIM generations"
            ),
            "clocks": "wall = perf_counter, cpu = process_time; targets judged on " + primary,
            "not_included": "VAE decode and text encoder (the same for every variant)",
        },
        "variants": rows,
        "ratios": ratios,
        "targets": targets,
    }


def verdict(target: dict) -> str:
    text = f"{target['target']}: {'met' if target['met'] else 'MISSED'}"
    if "met_from_added_cost" in target:
        text += f" ({'met' if target['met_from_added_cost'] else 'MISSED'} from added cost)"
    return text


def print_table(result: dict) -> None:
    s, m = result["setting"], result["machine"]
    print(
        f"Time per image, SD 1.5 UNet (random weights), {s['image_size']}px, {s['steps']} DDIM steps with CFG, "
        f"{s['precision']}, {s['device']}, {m['threads']} thread(s), load {m['loadavg_1_5_15']} -> {m['loadavg_1_5_15_end']}"
    )
    print(f"({s['method']}; {s['not_included']} not included; {s['clocks']})")
    rows = []
    for name, row in result["variants"].items():
        ratio, added = row.get("ratio_to_plain"), row.get("added_seconds_per_call")
        target = result["targets"].get(name)
        rows.append([
            row["variant"],
            f"{row['image_seconds']['wall']:.2f} s", f"x{ratio['wall']:.3f}" if ratio else "",
            f"{row['image_seconds']['cpu']:.2f} s", f"x{ratio['cpu']:.3f}" if ratio else "",
            f"{added['cpu'] * 1000:.1f} ms" if added else "",
            f"x{row['ratio_from_added_cost']['cpu']:.4f}" if "ratio_from_added_cost" in row else "",
            verdict(target) if target else "",
        ])
    header = ["variant", "image wall", "ratio", "image cpu", "ratio", "added cpu/call", "ratio from added", "target"]
    print(_common.table(rows, header))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image (default 20)")
    parser.add_argument("--mode", choices=("calls", "loop"), help="default: calls on CPU, loop on CUDA")
    parser.add_argument("--kernel", type=int, choices=(1, 3), default=1, help="CSC dense conv kernel size (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    result = run(names, args.mode, args.steps, args.repeats, args.kernel)
    _common.report(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
