"""The real app, launched on a free local port for the HTTP and browser tests."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served_app(model: Path, root: Path) -> Iterator[SimpleNamespace]:
    """`python app.py` on `model` with root/library and root/outputs; yields url, demo, state and launch arguments."""
    port = free_port()
    args = app.build_parser().parse_args(
        ["--model", str(model), "--device", "cpu", "--library", str(root / "library"), "--outputs", str(root / "outputs"), "--port", str(port)]
    )
    demo, state, launch = app.create_app(args)
    demo.queue(default_concurrency_limit=1)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", demo=demo, state=state, launch=launch)
    finally:
        state.close()
        demo.close()
