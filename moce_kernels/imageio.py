"""Reading and writing photographs for restoration, with OpenCV (``opencv-python-headless``).

What it keeps: 8- and 16-bit PNG and TIFF (and 32-bit float TIFF), JPEG and WebP (8-bit); gray
images stay gray, an alpha channel is carried through untouched, and the stored bit depth is kept
where the output format has it. EXIF orientation is applied on reading, so pixels come upright and
outputs are written upright without an orientation tag: JPEG, PNG and WebP orientation is read here
from the file's EXIF block (OpenCV ignores it when asked for the unchanged pixels), TIFF orientation
is applied by OpenCV's TIFF decoder. Other metadata (EXIF, ICC profiles) is not copied to outputs.

A gray PNG's tRNS chunk (one gray level marked transparent) becomes an alpha channel, as OpenCV
makes it for RGB and palette PNGs (its decoder drops it for gray). Formats that cannot hold an
image are refused before anything is encoded (:func:`write_problem`): GIF (256 colours) and files
without an extension; alpha into JPEG or BMP (neither holds it as other programs read it).

Limits: OpenCV cannot write two-channel files, so gray with alpha is written as PNG by a small
encoder here and as RGBA with equal colour channels in the other formats; 8-bit RGBA TIFFs come
out of OpenCV's decoder with premultiplied colour; WebP's encoder drops the colour of fully
transparent pixels.
"""
from __future__ import annotations

import contextlib
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from ._files import write_atomic

LOSSLESS_EXTENSIONS = (".png", ".tif", ".tiff")
EXTENSIONS = LOSSLESS_EXTENSIONS + (".jpg", ".jpeg", ".webp", ".bmp")  # what moce-restore looks for in folders
_DEPTHS = {".png": (np.uint8, np.uint16), ".tif": (np.uint8, np.uint16, np.float32),
           ".tiff": (np.uint8, np.uint16, np.float32), ".jpg": (np.uint8,), ".jpeg": (np.uint8,),
           ".webp": (np.uint8,), ".bmp": (np.uint8,)}
WRITABLE_EXTENSIONS = tuple(_DEPTHS)  # the output formats, by extension
_NO_ALPHA = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}  # formats that cannot carry an alpha channel
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as OpenCV's and Pillow's RGB -> gray


class ImageError(ValueError):
    """An image file that cannot be read or written as asked."""


@dataclass(frozen=True)
class Picture:
    """An image as stored: ``color`` (H, W, 3) RGB or (H, W) gray, ``alpha`` (H, W) or None, both
    uint8, uint16 or float32 (in [0, 1]); upright (orientation applied)."""

    color: np.ndarray
    alpha: Optional[np.ndarray] = None

    @property
    def gray(self) -> bool:
        return self.color.ndim == 2

    @property
    def dtype(self) -> np.dtype:
        return self.color.dtype

    @property
    def megapixels(self) -> float:
        return self.color.shape[0] * self.color.shape[1] / 1e6


def _cv2():
    import cv2
    return cv2


@contextlib.contextmanager
def _opencv_quiet() -> Iterator[None]:
    """OpenCV's own log lines off (a decode failure is reported once, by the ImageError)."""
    from cv2.utils import logging as cv_logging
    level = cv_logging.getLogLevel()
    cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv_logging.setLogLevel(level)


# ---------------------------------------------------------------- EXIF orientation
def _jpeg_exif(data: bytes) -> Optional[bytes]:
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return None
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without length
            i += 1 if marker == 0xFF else 2
            continue
        n = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0":
            return data[i + 10:i + 2 + n]
        i += 2 + n
    return None


def _png_chunk_body(data: bytes, wanted: bytes) -> Optional[bytes]:
    """The body of a PNG file's first chunk of type ``wanted``; None if it has none (or is cut before it)."""
    i = 8
    while i + 8 <= len(data):
        n, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        if kind == wanted:
            return data[i + 8:i + 8 + n]
        if kind == b"IEND":
            return None
        i += 12 + n
    return None


def _png_exif(data: bytes) -> Optional[bytes]:
    return _png_chunk_body(data, b"eXIf")


def _webp_exif(data: bytes) -> Optional[bytes]:
    i = 12
    while i + 8 <= len(data):
        kind, n = data[i:i + 4], int.from_bytes(data[i + 4:i + 8], "little")
        if kind == b"EXIF":
            blob = data[i + 8:i + 8 + n]
            return blob[6:] if blob[:6] == b"Exif\0\0" else blob
        i += 8 + n + (n & 1)
    return None


def _tiff_orientation(blob: bytes) -> int:
    """The Orientation tag (0x0112) of a TIFF-structured EXIF block's first IFD; 1 if absent or bad."""
    try:
        end = {b"II": "<", b"MM": ">"}[blob[:2]]
        ifd = struct.unpack(end + "I", blob[4:8])[0]
        for k in range(struct.unpack(end + "H", blob[ifd:ifd + 2])[0]):
            e = ifd + 2 + 12 * k
            tag, kind = struct.unpack(end + "HH", blob[e:e + 4])
            if tag == 0x0112 and kind == 3:
                value = struct.unpack(end + "H", blob[e + 8:e + 10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def exif_orientation(data: bytes) -> int:
    """EXIF orientation (1-8) of a JPEG, PNG or WebP file's bytes; 1 when absent, unreadable or other formats."""
    if data[:2] == b"\xff\xd8":
        blob = _jpeg_exif(data)
    elif data[:8] == _PNG_SIGNATURE:
        blob = _png_exif(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        blob = _webp_exif(data)
    else:
        blob = None
    return _tiff_orientation(blob) if blob else 1


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The upright view of stored (H, W, ...) pixels with EXIF ``orientation`` (1-8)."""
    t = np.swapaxes(pixels, 0, 1)  # transpose: orientation 5
    views = {1: pixels, 2: pixels[:, ::-1], 3: pixels[::-1, ::-1], 4: pixels[::-1],
             5: t, 6: t[:, ::-1], 7: t[::-1, ::-1], 8: t[::-1]}
    return np.ascontiguousarray(views[orientation])


# ---------------------------------------------------------------- reading
def _png_is_gray(data: bytes) -> bool:
    """PNG colour type 0 or 4 (gray, gray + alpha) in the IHDR chunk."""
    return data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[25] in (0, 4)


def _png_gray_transparency(data: bytes, gray: np.ndarray) -> Optional[np.ndarray]:
    """The alpha a gray PNG's tRNS chunk gives (H, W) ``gray`` as OpenCV decoded it (1, 2 and 4-bit
    samples scaled to 8 bits): zero where the pixel has the transparent level, opaque elsewhere;
    None for other PNGs (colour type other than 0, or no tRNS)."""
    if not (data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[25] == 0):
        return None
    trns = _png_chunk_body(data, b"tRNS")
    if trns is None or len(trns) < 2:
        return None
    depth = data[24]
    level = int.from_bytes(trns[:2], "big") & ((1 << depth) - 1)
    if depth < 8:
        level *= 255 // ((1 << depth) - 1)  # as libpng expands 1/2/4-bit gray to 8 bits
    top = np.iinfo(gray.dtype).max
    return np.where(gray == level, 0, top).astype(gray.dtype)


def decode_image(data: bytes, name: str = "image") -> Picture:
    """Decode a file's bytes (any format OpenCV reads; first page of multi-page files)."""
    if not data:
        raise ImageError(f"{name}: empty file")
    cv2 = _cv2()
    with _opencv_quiet():
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageError(f"{name}: not a readable image (unknown format, corrupt or truncated)")
    if pixels.dtype not in (np.uint8, np.uint16, np.float32):
        raise ImageError(f"{name}: {pixels.dtype} samples are not supported (8-bit, 16-bit or 32-bit float)")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels not in (1, 3, 4):
        raise ImageError(f"{name}: {channels} channels are not supported (gray, RGB or RGBA)")
    pixels = apply_orientation(pixels, exif_orientation(data))
    if pixels.dtype == np.float32 and not (np.isfinite(pixels).all() and 0 <= pixels.min() and pixels.max() <= 1):
        raise ImageError(f"{name}: float samples must lie in [0, 1] (got {pixels.min():.4g} .. {pixels.max():.4g}); "
                         "HDR images are not supported")
    if channels == 1:
        gray = pixels.reshape(pixels.shape[:2])
        return Picture(gray, _png_gray_transparency(data, gray))
    alpha = np.ascontiguousarray(pixels[..., 3]) if channels == 4 else None
    color = np.ascontiguousarray(pixels[..., 2::-1])  # BGR -> RGB
    if _png_is_gray(data):  # gray + alpha, decoded by OpenCV as BGRA with equal channels
        color = np.ascontiguousarray(color[..., 0])
    return Picture(color, alpha)


def read_image(path: "str | os.PathLike") -> Picture:
    """Read an image file as :class:`Picture`; :class:`ImageError` (or ``OSError``) names what is wrong."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory")
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, path)


# ---------------------------------------------------------------- tensors
def _scale(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def to_tensor(picture: Picture) -> torch.Tensor:
    """(1, 3, H, W) float32 RGB in [0, 1] (gray repeated over the three channels)."""
    color = picture.color.astype(np.float32) / _scale(picture.dtype)
    if picture.gray:
        color = np.repeat(color[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(color.transpose(2, 0, 1)))[None]


def _quantize(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float64 values in [0, 1] to ``dtype`` (rounded to nearest for integers)."""
    if np.issubdtype(dtype, np.integer):
        return np.rint(values * _scale(dtype)).astype(dtype)
    return values.astype(dtype)


def from_tensor(image: torch.Tensor, like: Picture) -> Picture:
    """The model's output ((1, 3, H, W) or (3, H, W), RGB) as a :class:`Picture` shaped like ``like``:
    clipped to [0, 1], same sample type, gray again if ``like`` is gray (BT.601 luma), its alpha."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"from_tensor takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != like.color.shape[:2]:
        raise ValueError(f"from_tensor expects (3, {like.color.shape[0]}, {like.color.shape[1]}), "
                         f"got {tuple(image.shape)}")
    rgb = image.detach().to("cpu", torch.float64).clamp(0, 1).permute(1, 2, 0).numpy()
    color = rgb @ np.array(LUMA) if like.gray else rgb
    return Picture(_quantize(color, like.dtype), like.alpha)


# ---------------------------------------------------------------- writing
def _convert_depth(pixels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if pixels.dtype == dtype:
        return pixels
    return _quantize(pixels.astype(np.float64) / _scale(pixels.dtype), np.dtype(dtype))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_gray_alpha_png(gray: np.ndarray, alpha: np.ndarray) -> bytes:
    """A PNG of colour type 4 (gray + alpha), 8 or 16 bits, from (H, W) uint8/uint16 arrays."""
    h, w = gray.shape
    pixels = np.stack([gray, alpha], axis=2)
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(">u2")
    rows = pixels.reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8 * pixels.dtype.itemsize, 4, 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 6))
            + _png_chunk(b"IEND", b""))


def write_problem(ext: str, picture: Optional[Picture] = None) -> Optional[str]:
    """Why an image cannot be written in format ``ext`` (a file extension such as ``.png``, or ``""``), or
    None if it can: the format alone, or with ``picture`` also whether the format holds what it has."""
    ext = ext.lower()
    if ext not in _DEPTHS:
        what = "a file without an extension has no output format" if not ext else \
            "cannot write .gif (256 colours)" if ext == ".gif" else f"cannot write {ext} files"
        return f"{what}; the output formats are {', '.join(_DEPTHS)}"
    if picture is not None and picture.alpha is not None and ext in _NO_ALPHA:
        return (f"the image has an alpha channel, which {_NO_ALPHA[ext]} cannot hold; "
                f"write it as .png, .tif or .webp")
    return None


def encode_image(picture: Picture, ext: str, quality: int = 95) -> bytes:
    """The bytes of ``picture`` in format ``ext`` (``.png``, ``.tif``/``.tiff``, ``.jpg``/``.jpeg``, ``.webp``,
    ``.bmp``), at the picture's bit depth where the format has it, else the nearest it has (16-bit -> 8-bit for
    JPEG); :class:`ImageError` if the format cannot hold it (see :func:`write_problem`)."""
    ext = ext.lower()
    problem = write_problem(ext, picture)
    if problem:
        raise ImageError(problem)
    depths = _DEPTHS[ext]
    target = picture.dtype if picture.dtype in depths else (np.uint16 if np.uint16 in depths else np.uint8)
    color = _convert_depth(picture.color, target)
    alpha = None if picture.alpha is None else _convert_depth(picture.alpha, target)
    if ext == ".png" and picture.gray and alpha is not None:
        return encode_gray_alpha_png(color, alpha)
    if picture.gray:
        pixels = color if alpha is None else np.stack([color] * 3 + [alpha], axis=2)
    else:
        pixels = color[..., ::-1] if alpha is None else np.concatenate([color[..., ::-1], alpha[..., None]], axis=2)
    cv2 = _cv2()
    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, quality], ".jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
              ".webp": [cv2.IMWRITE_WEBP_QUALITY, quality], ".png": [cv2.IMWRITE_PNG_COMPRESSION, 3]}.get(ext, [])
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(pixels), params)
    if not ok:
        raise ImageError(f"OpenCV could not encode a {pixels.dtype} image with {pixels.shape[-1]} channels as {ext}")
    return buf.tobytes()


def write_image(path: "str | os.PathLike", picture: Picture, quality: int = 95, overwrite: bool = True) -> None:
    """Write ``picture`` to ``path`` (format from the extension, see :func:`encode_image`), atomically:
    to a temporary file beside it, then renamed, so a failure leaves no partial file. With
    ``overwrite=False`` an existing ``path`` (a symbolic link included) raises ``FileExistsError``
    and is left as it was; a link at ``path`` is replaced, never written through."""
    path = os.fspath(path)
    try:
        data = encode_image(picture, os.path.splitext(path)[1], quality)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    write_atomic(path, data, replace=overwrite)
