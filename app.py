"""SCEdit Studio: `python app.py` opens the Gradio app (also the Hugging Face Spaces entry point).

With no arguments it runs offline on the built-in tiny model and the shipped tuners.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tuners.validation import UserInputError

if TYPE_CHECKING:  # the heavy imports wait until the app is built, so --help answers at once
    import gradio as gr

    from scedit_ui.ui.state import AppState

DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="SCEdit Studio: skip-connection editing of Stable Diffusion, in the browser.")
    parser.add_argument("--model", default="", metavar="PATH_OR_ID", help="diffusers folder, .safetensors file or hub id (default: the built-in tiny model)")
    parser.add_argument("--config", metavar="FOLDER", help="for a single-file --model: a diffusers folder with its configs")
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=port_number, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)), help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked for)")
    parser.add_argument("--library", default="library", metavar="DIR", help="folder of your tuners (default: ./library)")
    parser.add_argument("--outputs", default="outputs", metavar="DIR", help="folder for generated images (default: ./outputs)")
    parser.add_argument("--annotators", metavar="DIR", help="folder of annotator weights for hed/depth/pose/seg conditions")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="where the model runs (default: auto)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def port_number(text: str) -> int:
    """A TCP port from the command line (argparse turns the ValueError into a usage error)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return port


def create_app(args: argparse.Namespace) -> tuple[gr.Blocks, AppState, dict]:
    """Load the base model and build the Blocks: the blocks, their state and the `launch` keyword arguments."""
    from scedit_ui.conditions import annotators
    from scedit_ui.model_manager import ModelManager
    from scedit_ui.tuner_library import TunerLibrary
    from scedit_ui.ui.app_builder import build_app
    from scedit_ui.ui.state import AppState

    if args.annotators:
        annotators.set_annotators_dir(args.annotators)
    manager = ModelManager(args.device)
    manager.load(args.model, args.config)
    library, outputs = Path(args.library), Path(args.outputs)
    for folder in (library, outputs):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserInputError(f"cannot use {folder} as a folder: {error.strerror}") from None
    state = AppState(manager, TunerLibrary(library), outputs)
    demo = build_app(state)
    # Returned files may only come from these folders (and Gradio's own upload cache).
    allowed = [str(p.resolve()) for p in (library, outputs, state.assets_dir)]
    launch = dict(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=allowed, ssr_mode=False, footer_links=["api"])
    return demo, state, launch


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        demo, state, launch = create_app(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(**launch)  # blocks until Ctrl-C
    except OSError as error:  # the port is taken, or the address is not this machine's
        print(f"error: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    finally:
        state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
