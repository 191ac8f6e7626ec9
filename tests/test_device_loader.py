"""Device-side decathlon batches: the same pixels as the worker loader, crops and flips
that are real windows of the square image, reproducible per (seed, epoch), a cache that
fills once."""
import numpy as np
import pytest
import torch

from common.distributed import make_sampler
from common.loaders import build_loader
from decathlon.data import DecathlonDataset
from decathlon.device_loader import DeviceBatches, SquareImages, augment_on_device, images_fit_on_device
from decathlon.synthetic import make_synthetic_decathlon
from decathlon.tasks import get_task
from decathlon.transforms import build_transforms


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("devloader") / "decathlon-1.0"
    make_synthetic_decathlon(root, tasks=("dtd",), num_classes={"dtd": 4}, train_per_class=5,
                             val_per_class=3, test_per_class=1, seed=3)
    return root


def _batches(ds, images, train, seed=0, batch_size=6, resident=False):
    spec = get_task("dtd")
    return DeviceBatches(images, ds, batch_size=batch_size, train=train, crop=16, hflip=True, mean=spec.mean,
                         std=spec.std, device=torch.device("cpu"), sampler=make_sampler(ds, None, shuffle=train, seed=seed),
                         seed=seed, resident=resident)


def test_eval_batches_equal_the_worker_loader(root):
    ds = DecathlonDataset(root, "dtd", "val", transform=build_transforms("dtd", False, resize=20, crop=16))
    images = SquareImages(DecathlonDataset(root, "dtd", "val"), 20, log=lambda *_: None)
    reference = build_loader(ds, batch_size=5, train=False, workers=0)
    ours = _batches(ds, images, train=False, batch_size=5)
    assert len(ours) == len(reference)
    for (a, ya), (b, yb) in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert torch.equal(ya, yb)


def test_train_crops_are_windows_of_the_square_image_and_reproducible(root):
    ds = DecathlonDataset(root, "dtd", "train")
    images = SquareImages(ds, 20, log=lambda *_: None)
    spec = get_task("dtd")
    mean, std = torch.tensor(spec.mean) * 255, torch.tensor(spec.std) * 255
    loader = _batches(ds, images, train=True, seed=4)
    loader.set_epoch(2)
    first = [(x.clone(), y.clone()) for x, y in loader]
    loader.set_epoch(2)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # same (seed, epoch): same batches
    loader.set_epoch(3)
    other = list(loader)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    targets = np.asarray(ds.targets)
    seen_flip = False
    for x, y in first:
        assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
        for img, label in zip(x, y):
            pixels = (img * std.view(3, 1, 1) + mean.view(3, 1, 1)).round().permute(1, 2, 0).to(torch.uint8)
            candidates = [i for i in range(len(ds)) if targets[i] == int(label)]
            found = False
            for i in candidates:
                square = torch.from_numpy(np.asarray(images.pixels[i]))
                for top in range(5):
                    for left in range(5):
                        window = square[top:top + 16, left:left + 16]
                        if torch.equal(window, pixels):
                            found = True
                        elif torch.equal(window.flip(1), pixels):
                            found = seen_flip = True
            assert found
    assert seen_flip


def test_square_cache_fills_once(root, tmp_path):
    ds = DecathlonDataset(root, "dtd", "train")
    messages = []
    first = SquareImages(ds, 20, cache_dir=tmp_path, log=messages.append)
    second = SquareImages(ds, 20, cache_dir=tmp_path, log=messages.append)
    assert len(messages) == 1  # the second opening decodes nothing
    assert np.array_equal(np.asarray(first.pixels), np.asarray(second.pixels))
    assert not list(tmp_path.glob(".*.tmp"))


def test_augment_on_device_flip_and_normalise():
    pixels = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).view(2, 4, 4, 3)
    out = augment_on_device(pixels, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([False, True]), 2,
                            torch.zeros(3), torch.ones(3))
    assert torch.equal(out[0], pixels[0, 0:2, 1:3].permute(2, 0, 1).float())
    assert torch.equal(out[1], pixels[1, 1:3, 0:2].flip(1).permute(2, 0, 1).float())


def test_every_copy_to_the_device_is_from_pinned_memory(root, monkeypatch):
    """On a GPU a non-blocking copy from pageable memory may wait for the device, a stall
    every step: each batch crosses as two pinned tensors (pixels; targets with the draws)."""
    ds = DecathlonDataset(root, "dtd", "train")
    images = SquareImages(ds, 20, log=lambda *_: None)
    loader = _batches(ds, images, train=True)
    loader.pin = True  # what a CUDA device selects; pinning itself is faked on this machine
    pinned, copies = set(), []
    real_to = torch.Tensor.to

    def fake_pin(t):
        out = t.clone()
        pinned.add(out.data_ptr())
        return out

    def spy_to(t, *args, **kwargs):
        if kwargs.get("non_blocking"):
            copies.append(t.data_ptr() in pinned)
        return real_to(t, *args, **kwargs)

    plain = list(_batches(ds, images, train=True))
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    got = list(loader)
    monkeypatch.undo()
    assert copies and all(copies) and len(copies) == 2 * len(got)
    for (a, ya), (b, yb) in zip(got, plain):  # pinning changes nothing in the batches
        assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.parametrize("train", [True, False])
def test_resident_images_give_the_same_batches_with_one_copy_per_epoch(root, monkeypatch, train):
    """Images kept on the device: each batch is gathered there, and only the epoch's plan
    (and, once, the images) crosses from the host."""
    ds = DecathlonDataset(root, "dtd", "train")
    images = SquareImages(ds, 20, log=lambda *_: None)
    host, resident = _batches(ds, images, train=train, seed=2), _batches(ds, images, train=train, seed=2,
                                                                         resident=True)
    copies = []
    real_to = torch.Tensor.to

    def spy_to(t, *args, **kwargs):
        copies.append(tuple(t.shape))
        return real_to(t, *args, **kwargs)

    for epoch in (0, 1):
        host.set_epoch(epoch)
        resident.set_epoch(epoch)
        expected = list(host)
        monkeypatch.setattr(torch.Tensor, "to", spy_to)
        got = list(resident)
        monkeypatch.undo()
        assert len(got) == len(expected) == len(resident) > 1
        for (a, ya), (b, yb) in zip(got, expected):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    # epoch 0: the images and the plan; epoch 1: the plan alone
    assert copies == [tuple(images.pixels.shape), (5, len(ds)), (5, len(ds))]


def test_images_on_device_auto_needs_cuda_and_room(root, monkeypatch):
    images = SquareImages(DecathlonDataset(root, "dtd", "val"), 20, log=lambda *_: None)
    assert images.nbytes == len(images) * 20 * 20 * 3
    assert not images_fit_on_device([images], torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * images.nbytes, 10 ** 12))
    assert images_fit_on_device([images], torch.device("cuda"))
    assert not images_fit_on_device([images, images], torch.device("cuda"), share=0.4)
