"""Shared pieces of the benchmarks: threads, the random-weight SD 1.5 UNet, machine facts, output.

Every script takes `--threads` (default 1) and `--json [PATH]` (JSON to stdout, or to PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def set_threads(argv: list[str] | None = None) -> int:
    """Read `--threads` before torch is imported (OpenMP reads OMP_NUM_THREADS once, at import)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=1)
    threads = parser.parse_known_args(argv)[0].threads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return threads


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads (default 1: on a shared, busy 2-core machine OpenMP spin-waiting makes 2 threads slower)",
    )
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON to stdout, or to PATH")


def report(result: Any, json_target: str | None, show: Callable[[Any], None] | None = None) -> None:
    """``result`` as JSON where `--json` was given (to stdout for "-", else to that file), else ``show(result)``
    (a table for people); a bench without one prints the JSON either way."""
    if json_target is None and show is not None:
        show(result)
        return
    json_target = json_target or "-"
    text = json.dumps(result, indent=2)
    if json_target == "-":
        print(text)
    else:
        Path(json_target).write_text(text + "\n")


def machine() -> dict[str, Any]:
    """What the numbers were measured on: device, threads, versions and the load at this moment."""
    import diffusers
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_sd15_unet(seed: int = 0, target: Any = "cpu") -> Any:
    """The real SD 1.5 UNet architecture with random weights (costs depend on shapes, not values)."""
    import torch
    from diffusers import UNet2DConditionModel

    from tuners.reference_configs import REFERENCE_UNET_CONFIGS

    torch.manual_seed(seed)
    return UNet2DConditionModel(**REFERENCE_UNET_CONFIGS["sd15"]).to(target)


def unet_view(unet: Any) -> Any:
    """A second UNet module whose parameters share storage with `unet`'s but are separate Parameter
    objects: its own `requires_grad` flags, hooks, adapters and checkpointing, no extra weight memory."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        view = UNet2DConditionModel(**unet.config)
    view.load_state_dict(unet.state_dict(), assign=True)
    return view.train(unet.training)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def round_robin(
    tasks: dict[str, Callable[[], Any]], repeats: int, log: Callable[[str], None] | None = None
) -> dict[str, dict[str, list[float]]]:
    """Time every task once per round, `repeats` rounds, so that background load hits all of them alike;
    the order rotates each round, so none always runs first. Returns wall-clock and process CPU seconds
    per task. With one thread, CPU time leaves out the time the process waited for a core: on a shared,
    busy machine it is the steadier measure of what a method costs; wall time is what a user waits."""
    names = list(tasks)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            tasks[name]()
            sync()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
        if log is not None:
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n]['wall'][-1]:.2f}s (cpu {times[n]['cpu'][-1]:.2f}s)" for n in names))
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
