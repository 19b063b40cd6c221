"""Model load time and time per image on the built-in tiny model (issue targets: ≤ 5 s and ≤ 3 s on a 2-core CPU).

    python bench/generation_speed.py [--model PATH_OR_ID] [--repeats 5] [--threads 1] [--json]

Load is measured in a fresh process state (first load in this process: imports are excluded, file
reads and module construction are included). Generation: one 128×128 image (the model's native
size), 20 DDIM steps with classifier-free guidance, median over `--repeats` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import _common  # noqa: E402

_common.set_threads()

import torch  # noqa: E402

from scedit_ui.model_manager import ModelManager  # noqa: E402
from scedit_ui.request import GenerationRequest  # noqa: E402


def measure(model: str, repeats: int, steps: int) -> dict:
    manager = ModelManager("auto")
    started = time.perf_counter()
    info = manager.load(model)
    load_seconds = time.perf_counter() - started

    request = GenerationRequest("a red circle at the top left and a blue star in the center on a yellow background", seed=0, steps=steps, guidance=5.0)
    manager.generate(request)  # warm-up
    times = [manager.generate(request).seconds for _ in range(repeats)]
    return {
        "model": info.name,
        "device": info.device,
        "threads": torch.get_num_threads(),
        "size": info.native_size,
        "steps": steps,
        "load_seconds": round(load_seconds, 3),
        "image_seconds_median": round(statistics.median(times), 3),
        "image_seconds_all": [round(t, 3) for t in times],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="default: the built-in tiny model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.model, args.repeats, args.steps)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {result['model']} on {result['device']} ({result['threads']} threads)")
        print(f"load                         {result['load_seconds']:.2f} s   (target ≤ 5 s)")
        print(f"{result['size']}px, {result['steps']} steps, CFG     {result['image_seconds_median']:.2f} s   (target ≤ 3 s; median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
