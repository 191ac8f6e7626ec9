"""common.images: every PIL mode decodes to the 8-bit RGB a person sees; bad files name themselves."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import DataError, MissingFileError, UsageError
from common.images import decode_rgb, load_rgb_array, to_rgb


def _saved(img, path, **kw):
    img.save(path, **kw)
    return path


def _pixel(path_or_img, **kw):
    arr = load_rgb_array(path_or_img, **kw) if not isinstance(path_or_img, Image.Image) \
        else np.asarray(to_rgb(path_or_img, **kw))
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return tuple(int(v) for v in arr[0, 0])


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    path = _saved(Image.fromarray(np.full((4, 5), 32768, dtype=np.uint16)), tmp_path / "g16.png")
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    assert _pixel(path) == (128, 128, 128)
    assert decode_rgb(path).mode == "RGB" and decode_rgb(path).size == (5, 4)
    ramp = np.array([[0, 257, 65535]], dtype=np.uint16)
    assert load_rgb_array(_saved(Image.fromarray(ramp), tmp_path / "r.png"))[0, :, 0].tolist() == [0, 1, 255]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_every_16bit_mode(mode):
    img = Image.new(mode, (3, 2), 65535 // 4)
    assert _pixel(img) == (64, 64, 64)


def test_32bit_integer_mode_uses_its_range():
    wide = Image.fromarray(np.array([[40000, 0]], dtype=np.int32))
    assert wide.mode == "I" and _pixel(wide) == (156, 156, 156)
    narrow = Image.fromarray(np.array([[200, -5]], dtype=np.int32))
    assert np.asarray(to_rgb(narrow))[0, :, 0].tolist() == [200, 0]


def test_float_mode():
    unit = Image.fromarray(np.array([[0.5, 1.0, 0.0]], dtype=np.float32))
    assert unit.mode == "F" and np.asarray(to_rgb(unit))[0, :, 0].tolist() == [128, 255, 0]
    levels = Image.fromarray(np.array([[100.0, 300.0, -4.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(levels))[0, :, 0].tolist() == [100, 255, 0, 0]


def test_bilevel_and_gray(tmp_path):
    bits = Image.fromarray(np.array([[True, False]]))
    assert bits.mode == "1"
    assert np.asarray(to_rgb(bits))[0].tolist() == [[255] * 3, [0] * 3]
    path = _saved(bits, tmp_path / "b.png")
    assert load_rgb_array(path)[0].tolist() == [[255] * 3, [0] * 3]
    assert _pixel(Image.new("L", (2, 2), 77)) == (77, 77, 77)


def test_alpha_is_composited_on_the_background(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 0, 0, 128]]], dtype=np.uint8)
    path = _saved(Image.fromarray(rgba), tmp_path / "a.png")
    arr = load_rgb_array(path)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 1].tolist() == [10, 20, 30]
    assert arr[0, 2].tolist() == [227, 127, 127]  # half red over white
    assert load_rgb_array(path, background=(0, 0, 0))[0, 0].tolist() == [0, 0, 0]
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(la, background=(0, 255, 0)))[0].tolist() == [[0, 255, 0], [50, 50, 50]]
    assert _pixel(Image.new("RGBa", (1, 1), (100, 100, 100, 255))) == (100, 100, 100)
    assert _pixel(Image.new("La", (1, 1), (100, 0))) == (255, 255, 255)
    with pytest.raises(UsageError, match="background"):
        load_rgb_array(path, background=(0, 0))


def test_palette_with_transparent_index_and_alpha_palette(tmp_path):
    p = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert load_rgb_array(_saved(p, tmp_path / "p.png"))[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    path = _saved(p, tmp_path / "pt.png", transparency=0)
    with Image.open(path) as img:
        assert img.mode == "P" and "transparency" in img.info
    assert load_rgb_array(path)[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    # per-index alpha (a tRNS chunk of several entries)
    path = _saved(p, tmp_path / "pa.png", transparency=bytes([255, 0]))
    assert load_rgb_array(path, background=(9, 9, 9))[0].tolist() == [[255, 0, 0], [9, 9, 9]]
    pa = Image.new("P", (1, 1))
    pa.putpalette([0, 255, 0, 0], "RGBA")
    assert _pixel(pa) == (255, 255, 255)


def test_gray_with_transparent_level(tmp_path):
    path = _saved(Image.fromarray(np.array([[7, 8]], dtype=np.uint8)), tmp_path / "lt.png", transparency=7)
    assert load_rgb_array(path, background=(0, 0, 0))[0].tolist() == [[0, 0, 0], [8, 8, 8]]


def test_cmyk_ycbcr_hsv_lab(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert _pixel(cmyk) == (255, 0, 0)
    assert _pixel(_saved(Image.new("CMYK", (8, 8), (0, 0, 0, 128)), tmp_path / "c.jpg", quality=100)) == \
        pytest.approx((127, 127, 127), abs=2)
    ycc = Image.new("RGB", (1, 1), (0, 128, 255)).convert("YCbCr")
    assert _pixel(ycc) == pytest.approx((0, 128, 255), abs=2)
    assert _pixel(Image.new("HSV", (1, 1), (85, 255, 255))) == (0, 255, 0)
    gray_lab = _pixel(Image.new("LAB", (1, 1), (128, 128, 128)))
    assert gray_lab[0] == gray_lab[1] == gray_lab[2] and 100 < gray_lab[0] < 140


def test_rgb_files_and_streams_unchanged(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    path = _saved(Image.fromarray(arr), tmp_path / "x.png")
    assert np.array_equal(load_rgb_array(path), arr)
    assert np.array_equal(load_rgb_array(io.BytesIO(path.read_bytes())), arr)
    assert np.array_equal(load_rgb_array(str(path)), arr)


def test_exif_orientation_only_when_asked(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    path = _saved(Image.new("RGB", (20, 10)), tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_rgb_array(path).shape == (10, 20, 3)
    assert load_rgb_array(path, exif_transpose=True).shape == (20, 10, 3)


def test_corrupt_truncated_and_missing_files_name_the_path(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk\.png: not a readable image") as err:
        decode_rgb(junk)
    assert "\n" not in str(err.value) and err.value.reason
    photo = _saved(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                   tmp_path / "cut.jpg")
    photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])
    with pytest.raises(DataError, match=r"cut\.jpg: not a readable image \(image file is truncated"):
        decode_rgb(photo)
    png = _saved(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                 tmp_path / "cut.png")
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        decode_rgb(png)
    with pytest.raises(MissingFileError, match="gone.png"):
        decode_rgb(tmp_path / "gone.png")


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    path = _saved(Image.new("L", (64, 64)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"big\.png: not a readable image"):
        decode_rgb(path)


def test_image_folder_of_16bit_pngs_matches_8bit(tmp_path):
    from classification.data import ClassificationTransform, ImageFolderDataset

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(2):
                v8 = rng.integers(0, 256, (12, 14), dtype=np.uint8)
                for kind, arr in (("d8", v8), ("d16", v8.astype(np.uint16) * 257)):
                    folder = tmp_path / kind / split / c
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(folder / f"{i}.png")
    tf = ClassificationTransform(train=False, size=12, eval_resize=12, mean=(0, 0, 0), std=(1, 1, 1))
    d8, d16 = (ImageFolderDataset(tmp_path / k, "train", tf) for k in ("d8", "d16"))
    assert len(d8) == len(d16) == 4
    for i in range(len(d8)):
        x8, y8 = d8[i]
        x16, y16 = d16[i]
        assert y8 == y16 and x8.shape == x16.shape == (3, 12, 12)
        assert torch.allclose(x8, x16, atol=1 / 255 + 1e-6)
        assert x16.max() > 0.5  # not clipped white, not crushed
