"""Image files for restoration (moce_kernels.imageio): bit depth, gray, alpha, EXIF orientation, bad files."""
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from moce_kernels.imageio import (LUMA, ImageError, Picture, encode_image, from_tensor, read_image, to_tensor,
                                  write_image, write_problem)


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"numpy seed {seed}")
    return np.random.default_rng(seed)


def model_stand_in(x: torch.Tensor) -> torch.Tensor:
    """What a model might produce: a per-channel change, partly outside [0, 1] (must be clipped)."""
    return x * torch.tensor([0.9, 1.1, 0.7])[:, None, None] + torch.tensor([0.03, -0.02, 0.2])[:, None, None]


def _expected(x: torch.Tensor, gray: bool, maxval: int) -> np.ndarray:
    y = model_stand_in(x)[0].double().clamp(0, 1).permute(1, 2, 0).numpy()
    if gray:
        y = LUMA[0] * y[..., 0] + LUMA[1] * y[..., 1] + LUMA[2] * y[..., 2]
    return np.rint(y * maxval)


# ---------------------------------------------------------------- bit depth and values
@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("gray", [False, True])
def test_16_bit_round_trip_keeps_16_bits_and_the_models_values(tmp_path, rng, ext, gray):
    shape = (37, 53) if gray else (37, 53, 3)
    stored = rng.integers(0, 65536, shape, dtype=np.uint16)
    src = tmp_path / f"in{ext}"
    cv2.imwrite(str(src), stored if gray else stored[..., ::-1])
    picture = read_image(src)
    assert picture.dtype == np.uint16 and picture.gray == gray and picture.alpha is None
    assert np.array_equal(picture.color, stored)
    x = to_tensor(picture)
    assert x.shape == (1, 3, 37, 53) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.from_numpy(stored if gray else stored[..., 0]).float() / 65535)
    dst = tmp_path / f"out{ext}"
    write_image(dst, from_tensor(model_stand_in(x), picture))
    back = read_image(dst)
    assert back.dtype == np.uint16 and back.gray == gray
    assert np.array_equal(back.color, _expected(x, gray, 65535))
    assert (back.color % 257 != 0).mean() > 0.9, "values between the 8-bit levels survive"


def test_8_bit_formats_and_16_bit_into_jpeg(tmp_path, rng):
    stored = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    for ext in (".png", ".tiff", ".webp"):
        write_image(tmp_path / f"a{ext}", Picture(stored)) if ext != ".webp" else \
            (tmp_path / "a.webp").write_bytes(encode_image(Picture(stored), ".webp", quality=101))  # lossless
        back = read_image(tmp_path / f"a{ext}")
        assert back.dtype == np.uint8 and np.array_equal(back.color, stored), ext
    ramp = np.linspace(0, 65535, 40)[None, :, None] * np.linspace(0.2, 1, 24)[:, None, None] * np.ones(3)
    deep = Picture(np.rint(ramp).astype(np.uint16))  # smooth, so that JPEG keeps it closely
    write_image(tmp_path / "deep.jpg", deep)
    back = read_image(tmp_path / "deep.jpg")
    assert back.dtype == np.uint8 and back.color.shape == (24, 40, 3)
    assert np.abs(back.color - deep.color / 257).max() < 4, "16-bit written as the nearest 8-bit values"


# ---------------------------------------------------------------- alpha
@pytest.mark.parametrize("dtype,ext", [(np.uint8, ".png"), (np.uint16, ".png"), (np.uint16, ".tif"),
                                       (np.uint8, ".webp")])
def test_alpha_is_passed_through_untouched(tmp_path, rng, dtype, ext):
    top = np.iinfo(dtype).max + 1
    rgba = rng.integers(0, top, (21, 34, 4), dtype=dtype)
    if ext == ".webp":  # lossless WebP drops the colour of fully transparent pixels
        rgba[..., 3] = np.maximum(rgba[..., 3], 1)
    src = tmp_path / f"in{ext}"
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []
    cv2.imwrite(str(src), rgba[..., [2, 1, 0, 3]], params)
    picture = read_image(src)
    assert np.array_equal(picture.alpha, rgba[..., 3]) and np.array_equal(picture.color, rgba[..., :3])
    x = to_tensor(picture)
    write_image(tmp_path / f"out{ext}", from_tensor(model_stand_in(x), picture), quality=101)
    back = read_image(tmp_path / f"out{ext}")
    assert np.array_equal(back.alpha, rgba[..., 3])
    assert np.array_equal(back.color, _expected(x, False, top - 1))


def test_gray_with_alpha_stays_gray_with_alpha(tmp_path, rng):
    gray = rng.integers(0, 65536, (19, 23), dtype=np.uint16)
    alpha = rng.integers(0, 65536, (19, 23), dtype=np.uint16)
    write_image(tmp_path / "ga.png", Picture(gray, alpha))
    data = (tmp_path / "ga.png").read_bytes()
    assert data[24:26] == bytes([16, 4]), "IHDR: 16-bit, colour type 4 (gray + alpha)"
    decoded = cv2.imread(str(tmp_path / "ga.png"), cv2.IMREAD_UNCHANGED)  # an independent decoder's view
    assert np.array_equal(decoded[..., 0], gray) and np.array_equal(decoded[..., 3], alpha)
    back = read_image(tmp_path / "ga.png")
    assert back.gray and np.array_equal(back.color, gray) and np.array_equal(back.alpha, alpha)


def _png(samples: np.ndarray, colour_type: int, depth: int, trns: bytes) -> bytes:
    """A PNG written by hand (OpenCV writes no tRNS): rows of already packed ``samples`` (uint8 bytes, or
    uint16 for 16-bit), one IDAT, and a tRNS chunk."""
    h, w = samples.shape[:2]
    rows = samples.astype(">u2").reshape(h, -1).view(np.uint8) if depth == 16 else samples.reshape(h, -1)
    width = w if depth >= 8 else (w * 8) // depth
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, h, depth, colour_type, 0, 0, 0))
            + chunk(b"tRNS", trns) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("depth", [8, 16])
def test_gray_png_transparency_becomes_alpha_as_for_rgb(tmp_path, rng, depth):
    dtype = np.uint16 if depth == 16 else np.uint8
    gray = rng.integers(0, 4, (9, 14)).astype(dtype) * (np.iinfo(dtype).max // 3)  # few levels: many transparent
    level = int(gray[2, 3])
    top = np.iinfo(dtype).max
    want_alpha = np.where(gray == level, 0, top)
    (tmp_path / "g.png").write_bytes(_png(gray, 0, depth, struct.pack(">H", level)))
    (tmp_path / "rgb.png").write_bytes(_png(np.stack([gray] * 3, axis=2), 2, depth, struct.pack(">HHH", *[level] * 3)))
    rgb = read_image(tmp_path / "rgb.png")
    assert np.array_equal(rgb.alpha, want_alpha), "OpenCV's own expansion of an RGB tRNS"
    picture = read_image(tmp_path / "g.png")
    assert picture.gray and picture.dtype == dtype and np.array_equal(picture.color, gray)
    assert picture.alpha is not None and np.array_equal(picture.alpha, want_alpha)
    write_image(tmp_path / "out.png", from_tensor(model_stand_in(to_tensor(picture)), picture))
    back = read_image(tmp_path / "out.png")
    assert back.gray and np.array_equal(back.alpha, want_alpha)


def test_low_bit_depth_gray_transparency(tmp_path):
    samples = np.array([[0b00011011]], np.uint8)  # 2-bit levels 0, 1, 2, 3
    (tmp_path / "g2.png").write_bytes(_png(samples, 0, 2, struct.pack(">H", 2)))
    picture = read_image(tmp_path / "g2.png")
    assert np.array_equal(picture.color, [[0, 85, 170, 255]]) and np.array_equal(picture.alpha, [[255, 255, 0, 255]])


# ---------------------------------------------------------------- what can be written
def test_what_cannot_be_written_is_known_before_encoding(tmp_path, rng):
    rgb = Picture(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    rgba = Picture(rgb.color, rng.integers(0, 256, (6, 7), dtype=np.uint8))
    assert write_problem(".png") is None and write_problem(".PNG", rgba) is None and write_problem(".bmp", rgb) is None
    assert "cannot write .gif" in write_problem(".gif") and "without an extension" in write_problem("")
    for ext, name in [(".jpg", "JPEG"), (".bmp", "BMP")]:
        assert write_problem(ext) is None and f"which {name} cannot hold" in write_problem(ext, rgba)
        with pytest.raises(ImageError, match=f"{name} cannot hold"):
            write_image(tmp_path / f"a{ext}", rgba)
    for picture in (rgb, Picture(rgb.color[..., 0])):
        write_image(tmp_path / "b.bmp", picture)
        back = read_image(tmp_path / "b.bmp")
        assert back.gray == picture.gray and np.array_equal(back.color, picture.color)


def test_write_image_without_overwrite_keeps_what_exists(tmp_path):
    picture = Picture(np.full((4, 5, 3), 7, np.uint8))
    (tmp_path / "x.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        write_image(tmp_path / "x.png", picture, overwrite=False)
    assert (tmp_path / "x.png").read_bytes() == b"mine"
    (tmp_path / "target.png").write_bytes(b"theirs")
    (tmp_path / "link.png").symlink_to(tmp_path / "target.png")
    with pytest.raises(FileExistsError):
        write_image(tmp_path / "link.png", picture, overwrite=False)
    write_image(tmp_path / "link.png", picture)  # replaces the link, not what it points to
    assert not (tmp_path / "link.png").is_symlink() and (tmp_path / "target.png").read_bytes() == b"theirs"
    write_image(tmp_path / "new.png", picture, overwrite=False)
    assert np.array_equal(read_image(tmp_path / "new.png").color, picture.color)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "new.png", "target.png", "x.png"]


# ---------------------------------------------------------------- EXIF orientation
def _tiff_ifd(entries, order=">"):
    """A TIFF header + IFD0 with (tag, type 3 = SHORT or 4 = LONG, value) entries, then the image data offset."""
    n = len(entries)
    out = (b"MM\x00\x2a" if order == ">" else b"II\x2a\x00") + struct.pack(order + "I", 8) + struct.pack(order + "H", n)
    for tag, kind, value in entries:
        out += struct.pack(order + "HHIHH", tag, 3, 1, value, 0) if kind == 3 else \
            struct.pack(order + "HHII", tag, 4, 1, value)
    return out + struct.pack(order + "I", 0)


def _with_jpeg_exif(jpeg: bytes, orientation: int, order: str) -> bytes:
    payload = b"Exif\0\0" + _tiff_ifd([(0x0112, 3, orientation)], order)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _with_png_exif(png: bytes, orientation: int) -> bytes:
    blob = _tiff_ifd([(0x0112, 3, orientation)])
    chunk = struct.pack(">I", len(blob)) + b"eXIf" + blob + struct.pack(">I", zlib.crc32(b"eXIf" + blob))
    return png[:33] + chunk + png[33:]  # after the signature and IHDR


def _tiff_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    h, w, _ = rgb.shape
    tags = [(256, 3, w), (257, 3, h), (258, 3, 8), (259, 3, 1), (262, 3, 2), (273, 4, 0), (274, 3, orientation),
            (277, 3, 3), (278, 3, h), (279, 4, rgb.nbytes)]
    offset = 8 + 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, offset)
    return _tiff_ifd(tags) + rgb.tobytes()


# Upright pixels for each EXIF orientation, written out independently of the library's table.
UPRIGHT = {1: lambda a: a, 2: lambda a: np.fliplr(a), 3: lambda a: np.rot90(a, 2), 4: lambda a: np.flipud(a),
           5: lambda a: np.transpose(a, (1, 0, 2)), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2), 8: lambda a: np.rot90(a, 1)}


def test_exif_orientation_is_applied(tmp_path, rng):
    stored = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", stored[..., ::-1])
    ok, jpeg = cv2.imencode(".jpg", stored[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    plain_jpeg = read_image_bytes(tmp_path, "plain.jpg", jpeg.tobytes()).color
    for o in range(1, 9):
        want = UPRIGHT[o](stored)
        got = read_image_bytes(tmp_path, f"o{o}.png", _with_png_exif(png.tobytes(), o)).color
        assert np.array_equal(got, want), f"PNG orientation {o}"
        got = read_image_bytes(tmp_path, f"o{o}.jpg", _with_jpeg_exif(jpeg.tobytes(), o, "<" if o % 2 else ">")).color
        assert np.array_equal(got, UPRIGHT[o](plain_jpeg)), f"JPEG orientation {o}"
        oracle = cv2.imread(str(tmp_path / f"o{o}.jpg"), cv2.IMREAD_COLOR)  # OpenCV's own EXIF handling
        assert np.array_equal(got, oracle[..., ::-1]), f"JPEG orientation {o} vs OpenCV"
        got = read_image_bytes(tmp_path, f"o{o}.tif", _tiff_with_orientation(stored, o)).color
        assert np.array_equal(got, want), f"TIFF orientation {o}"


def read_image_bytes(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    return read_image(tmp_path / name)


# ---------------------------------------------------------------- bad files
def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    ok, png = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "cut.png").write_bytes(png.tobytes()[:40])
    for name, match in [("empty.png", "empty file"), ("text.png", "not a readable image"),
                        ("cut.png", "not a readable image")]:
        with pytest.raises(ImageError, match=match):
            read_image(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="cannot write .gif"):
        write_image(tmp_path / "x.gif", Picture(np.zeros((4, 4, 3), np.uint8)))
    assert not (tmp_path / "x.gif").exists()
    with pytest.raises(ValueError, match="expects"):
        from_tensor(torch.zeros(1, 3, 5, 5), Picture(np.zeros((4, 4, 3), np.uint8)))
