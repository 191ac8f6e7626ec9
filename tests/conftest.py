"""Shared test helpers: where the project's shared reference material lives.

Every test runs with one CPU thread, in this process and in the commands it starts: the
resume and parity tests compare float sums, which change with the thread count, and the
thread count would otherwise follow the machine (OMP_NUM_THREADS, else its cores)."""
import os
import socket
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

# The published labelled test annotations of three decathlon tasks, kept beside the
# checkout in ../shared (they are not part of the repository).
REAL_LABELS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "decathlon" / "labels_test"


def require_real_labels(name: str = "dtd_test.json") -> Path:
    """The real labelled file ``name``: skipped where ../shared is absent, a failure in CI."""
    path = REAL_LABELS_DIR / name
    if not path.is_file():
        message = f"real decathlon labels not found at {path}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A free TCP port on the loopback interface, for two-process gloo tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
