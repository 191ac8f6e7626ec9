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


def write_image_tree(root: Path, splits=("train", "test"), classes=("a", "b"), train=6, other=3) -> Path:
    """A small ImageFolder tree of 12x12 PNGs, ``root/<split>/<class>/<i>.png``: ``train``
    images per class in train/, ``other`` in every other split; the classes differ in
    brightness (seeded)."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(train if split == "train" else other):
                img = np.clip(rng.normal(80 + 100 * c, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def write_test_resnet_weights(path: Path) -> Path:
    """A safetensors weights file of timm's small ``test_resnet`` (seed 0), as a user's
    local weights file for the classification commands."""
    import timm
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
              str(path), metadata={"arch": "test_resnet"})
    return path


def cores_for_tests() -> int:
    """The usable cores, at most 2: what a heavy code-path test may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


def all_cores_env(**extra) -> dict:
    """The environment for a command whose test checks what it writes, not float sums:
    torch threads on :func:`cores_for_tests` cores."""
    return {**os.environ, "OMP_NUM_THREADS": str(cores_for_tests()), **extra}


@pytest.fixture
def all_cores():
    """Torch threads on every usable core (at most 2) for one heavy test whose checks
    allow float rounding (allclose, accuracies), restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(cores_for_tests())
    yield
    torch.set_num_threads(before)
