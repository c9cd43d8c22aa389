"""Decoding any image to RGB, masks, and the resize/crop/normalise transform."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softpatch.errors import ImageLoadError, SoftPatchError
from softpatch.io.images import (
    ImageTransform,
    failure_reason,
    image_size,
    load_image,
    load_mask,
    load_mask_for_crop,
)
from softpatch.io.limits import LoadLimits
from tests.hostile_corpus import (
    animated_gif,
    bomb_png,
    encode,
    exif_rotated_jpeg,
    multipage_tiff,
    noise_image,
    palette_png_with_transparency,
    png_16bit,
)


def _reason(excinfo: pytest.ExceptionInfo[ImageLoadError]) -> str:
    return failure_reason(excinfo.value)


# ---------------------------------------------------------------- modes -> RGB


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.new("L", (5, 4), 77), "PNG"),
        (Image.new("1", (5, 4), 1), "PNG"),
        (Image.new("RGB", (5, 4), (1, 2, 3)), "PNG"),
        (Image.new("RGB", (5, 4), (1, 2, 3)), "BMP"),
        (Image.new("RGB", (5, 4), (1, 2, 3)), "PPM"),
        (Image.new("RGB", (5, 4), (1, 2, 3)), "WEBP"),
        (Image.new("CMYK", (5, 4), (0, 0, 0, 0)), "JPEG"),
        (Image.new("CMYK", (5, 4), (0, 0, 0, 0)), "TIFF"),
        (Image.new("LA", (5, 4), (90, 255)), "PNG"),
        (Image.new("P", (5, 4), 3), "GIF"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.mode,
)
def test_any_mode_becomes_rgb(image: Image.Image, fmt: str) -> None:
    out = load_image(encode(image, fmt))
    assert out.mode == "RGB"
    assert out.size == (5, 4)
    assert type(out) is Image.Image  # a plain image, not tied to a file


def test_cmyk_colours_are_converted() -> None:
    out = np.asarray(load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)))
    r, g, b = out[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full = red


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    out = np.asarray(load_image(png_16bit(values)))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_big_endian_tiff_and_int32_and_float_modes() -> None:
    values = np.array([[0, 65535]], dtype=np.uint16)
    big = Image.fromarray(values.astype(">u2"))
    assert big.mode == "I;16B"
    assert np.asarray(load_image(encode(big, "TIFF")))[0, :, 0].tolist() == [0, 255]
    as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert as_int.mode == "I"
    assert np.asarray(load_image(encode(as_int, "TIFF")))[0, :, 0].tolist() == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_image(encode(floats, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 1000.0]], dtype=np.float32))  # no natural range: min-max
    assert np.asarray(load_image(encode(wide, "TIFF")))[0, :, 0].tolist() == [0, 3, 255]


def test_palette_transparency_is_composited_onto_black() -> None:
    out = np.asarray(load_image(palette_png_with_transparency()))
    assert out[:, :4].max() == 0  # transparent magenta key -> black, not magenta
    assert out[:, 4:].min() == 255


def test_rgba_alpha_is_composited_and_opaque_rgba_kept() -> None:
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[..., :3] = 200
    arr[0, 0, 3] = 0
    arr[0, 1, 3] = 255
    arr[1, :, 3] = 128
    out = np.asarray(load_image(encode(Image.fromarray(arr), "PNG")))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [200, 200, 200]
    assert 95 <= out[1, 0, 0] <= 105


def test_exif_orientation_is_applied() -> None:
    out = load_image(exif_rotated_jpeg(40, 20, orientation=6))
    assert out.size == (20, 40)
    # Orientation 6 = rotate 90 degrees clockwise: the left (blue) stripe ends up at the top.
    top, bottom = np.asarray(out)[2, 10], np.asarray(out)[-2, 10]
    assert top[2] > top[0] and bottom[0] > bottom[2]


def test_image_size_from_the_header(tmp_path: Path) -> None:
    rotated = tmp_path / "r.jpg"
    rotated.write_bytes(exif_rotated_jpeg(40, 20, orientation=6))
    assert image_size(rotated) == (20, 40) == load_image(rotated).size
    plain = tmp_path / "p.png"
    plain.write_bytes(encode(noise_image(7, 3), "PNG"))
    assert image_size(plain) == (7, 3)
    with pytest.raises(ImageLoadError, match="file not found"):
        image_size(tmp_path / "missing.png")
    (tmp_path / "t.png").write_bytes(b"text")
    with pytest.raises(ImageLoadError, match="unreadable image header"):
        image_size(tmp_path / "t.png")


def test_exif_without_rotation_keeps_size() -> None:
    assert load_image(exif_rotated_jpeg(40, 20, orientation=1)).size == (40, 20)


def test_first_frame_of_animated_gif_and_multipage_tiff() -> None:
    gif = np.asarray(load_image(animated_gif()))
    assert gif[0, 0].tolist() == [255, 0, 0]
    tiff = np.asarray(load_image(multipage_tiff()))
    assert tiff[0, 0].tolist() == [10, 20, 30]


def test_extension_does_not_decide_the_format(tmp_path: Path) -> None:
    png_as_jpg = tmp_path / "really_png.jpg"
    png_as_jpg.write_bytes(encode(noise_image(7, 3), "PNG"))
    jpg_as_bmp = tmp_path / "really_jpeg.bmp"
    jpg_as_bmp.write_bytes(encode(noise_image(7, 3), "JPEG"))
    assert load_image(png_as_jpg).size == (7, 3)
    assert load_image(jpg_as_bmp).size == (7, 3)


def test_path_bytes_and_pathlike_give_the_same_pixels(tmp_path: Path) -> None:
    data = encode(noise_image(9, 6), "PNG")
    path = tmp_path / "a b ü.png"
    path.write_bytes(data)
    expected = np.asarray(load_image(data))
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert np.array_equal(np.asarray(load_image(str(path))), expected)
    assert np.array_equal(np.asarray(load_image(bytearray(data))), expected)


# ---------------------------------------------------------------- refusals


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(path)
    assert _reason(excinfo) == "empty file (0 bytes)"
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("data", "keyword"),
    [
        (b"just some notes\n", "looks like text"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "looks like html"),
        (b"  <html><head></head></html>", "looks like html"),
        (b"PK\x03\x04" + bytes(40), "zip archive"),
        (b"%PDF-1.4\n" + bytes(40), "pdf"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "svg"),
        (bytes(range(256)) * 2, "unsupported image format"),
    ],
)
def test_non_images_say_what_they_are(data: bytes, keyword: str) -> None:
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(data)
    assert keyword in _reason(excinfo).lower()


def test_known_but_unsupported_format_is_named() -> None:
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(encode(Image.new("RGB", (16, 16)), "ICO"))
    assert _reason(excinfo).startswith("unsupported image format: ICO")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP"])
def test_truncated_images(fmt: str) -> None:
    data = encode(noise_image(64, 64), fmt)
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(data[: len(data) // 2])
    assert _reason(excinfo) == "truncated or corrupt image data"


def test_decompression_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[object] = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(bomb_png(30000, 30000))
    assert decoded == [], "the pixels were never decoded"
    assert _reason(excinfo) == (
        "image is 30000x30000 = 900,000,000 pixels, over the limit of 50,000,000 (LoadLimits.max_image_pixels)"
    )


def test_pixel_limit_is_ours_not_pillows() -> None:
    # 10000x6000 is under Pillow's own guard (89M) but over our default 50M.
    with pytest.raises(ImageLoadError, match="10000x6000 = 60,000,000 pixels"):
        load_image(bomb_png(10000, 6000))
    data = encode(noise_image(20, 20), "PNG")
    with pytest.raises(ImageLoadError, match="400 pixels, over the limit of 399"):
        load_image(data, LoadLimits(max_image_pixels=399))
    assert load_image(data, LoadLimits(max_image_pixels=400)).size == (20, 20)


def test_bomb_in_other_formats_is_refused_too() -> None:
    # A BMP header claiming 20000x20000 (sniffed before Pillow parses it) and a TIFF (Pillow's header parse).
    bmp = bytearray(encode(Image.new("RGB", (2, 2)), "BMP"))
    bmp[18:22] = (20000).to_bytes(4, "little")
    bmp[22:26] = (-20000).to_bytes(4, "little", signed=True)
    with pytest.raises(ImageLoadError, match="20000x20000 = 400,000,000 pixels"):
        load_image(bytes(bmp))
    tiff = encode(Image.new("L", (3000, 2000)), "TIFF", compression="tiff_deflate")
    with pytest.raises(ImageLoadError, match="3000x2000 = 6,000,000 pixels, over the limit of 5,000,000"):
        load_image(tiff, LoadLimits(max_image_pixels=5_000_000))


def test_file_size_limit() -> None:
    with pytest.raises(ImageLoadError, match="max_upload_bytes"):
        load_image(encode(noise_image(20, 20), "PNG"), LoadLimits(max_upload_bytes=100))


def test_missing_folder_and_special_files(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)  # must not block


def test_errors_are_one_line_softpatch_errors() -> None:
    with pytest.raises(SoftPatchError) as excinfo:
        load_image(b"\n\n<html>\n")
    assert "\n" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None or not isinstance(excinfo.value.__cause__, SoftPatchError)


def test_wrong_source_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        load_image(123)  # type: ignore[arg-type]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_file_handles_are_closed(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode(noise_image(30, 30), "PNG"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(encode(noise_image(30, 30), "PNG")[:200])
    gif = tmp_path / "anim.gif"
    gif.write_bytes(animated_gif())
    before = _open_fds()
    for _ in range(20):
        load_image(good)
        load_image(gif)
        with pytest.raises(ImageLoadError):
            load_image(bad)
    assert _open_fds() <= before


# ---------------------------------------------------------------- masks


def test_mask_threshold_at_128() -> None:
    arr = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    mask = load_mask(encode(Image.fromarray(arr), "PNG"))
    assert mask.dtype == bool and mask.shape == (1, 4)
    assert mask.tolist() == [[False, False, True, True]]


def test_mask_from_16bit_and_rgb_files() -> None:
    m16 = load_mask(png_16bit(np.array([[0, 32000, 33000, 65535]], dtype=np.uint16)))
    assert m16.tolist() == [[False, False, True, True]]
    rgb = np.zeros((1, 2, 3), dtype=np.uint8)
    rgb[0, 1] = 255
    assert load_mask(encode(Image.fromarray(rgb), "PNG")).tolist() == [[False, True]]


# ---------------------------------------------------------------- transform


def test_transform_matches_torchvision() -> None:
    tv = pytest.importorskip("torchvision.transforms")
    image = noise_image(300, 170, seed=3)
    for resize, crop in ((256, 224), (37, 30), (64, 64)):
        reference = tv.Compose(
            [
                tv.Resize((resize, resize), interpolation=tv.InterpolationMode.BILINEAR),
                tv.CenterCrop(crop),
                tv.ToTensor(),
                tv.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )(image)
        ours = ImageTransform(resize, crop)(image)
        assert ours.shape == (3, crop, crop) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_transform_accepts_other_modes_and_extreme_shapes() -> None:
    t = ImageTransform(64, 56)
    for image in (Image.new("L", (4000, 3), 10), Image.new("RGBA", (3, 4000)), Image.new("RGB", (1, 1))):
        assert t(image).shape == (3, 56, 56)


def test_transform_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(32, 64)
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(32, 0)


def test_mask_follows_the_image_geometry() -> None:
    t = ImageTransform(64, 48)
    mask = np.zeros((90, 150), dtype=bool)
    mask[20:50, 100:140] = True
    image = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    crop_mask = t.mask(mask)
    assert crop_mask.shape == (48, 48) and crop_mask.dtype == bool
    bright = t(image)[0].numpy() > 0  # white pixels normalise to > 0, black to < 0
    assert (crop_mask == bright).mean() > 0.97
    with pytest.raises(ValueError):
        t.mask(np.zeros((2, 2, 2), dtype=bool))


def test_mask_for_crop_matches_the_transform_and_none_is_all_false(tmp_path) -> None:
    t = ImageTransform(64, 48)
    arr = np.zeros((90, 150), dtype=np.uint8)
    arr[20:50, 100:140] = 200
    path = tmp_path / "m.png"
    path.write_bytes(encode(Image.fromarray(arr), "PNG"))
    crop_mask = load_mask_for_crop(path, t)
    assert crop_mask.shape == (48, 48) and crop_mask.dtype == bool
    assert np.array_equal(crop_mask, t.mask(arr >= 128)) and crop_mask.any()
    empty = load_mask_for_crop(None, t)
    assert empty.shape == (48, 48) and not empty.any()
    with pytest.raises(ImageLoadError):
        load_mask_for_crop(tmp_path / "missing.png", t)


def test_map_to_original_shape_and_constant_maps() -> None:
    t = ImageTransform(32, 24)
    out = t.map_to_original(np.full((24, 24), 3.5, dtype=np.float32), (70, 40))
    assert out.shape == (40, 70) and out.dtype == np.float32
    assert np.allclose(out, 3.5)
    with pytest.raises(ValueError):
        t.map_to_original(np.zeros((10, 10)), (70, 40))


def test_map_to_original_inverts_the_geometry() -> None:
    width, height = 120, 80
    t = ImageTransform(64, 48)
    # A horizontal ramp: after the transform and back, the pixels the crop covered come back in place.
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32), (height, 1))
    crop_values = np.asarray(
        Image.fromarray(ramp).resize((64, 64), Image.Resampling.BILINEAR).crop((t.offset,) * 2 + (t.offset + 48,) * 2)
    )
    back = t.map_to_original(crop_values, (width, height))
    margin = int(np.ceil(t.offset * width / 64)) + 2
    inner = slice(margin, width - margin)
    assert np.abs(back[:, inner] - ramp[:, inner]).max() < 4.0
    # Outside the crop, edge replication: the left border repeats the first cropped column.
    assert np.allclose(back[:, 0], back[:, 0].mean(), atol=1e-3)


def test_decoding_via_streams_is_not_accepted_silently() -> None:
    with pytest.raises(TypeError):
        load_image(io.BytesIO(b"x"))  # type: ignore[arg-type]
