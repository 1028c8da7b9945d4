"""Image loading: URLs, data URLs, paths, PIL images, tensors and arrays -> uint8 [3, H, W].

Every failure is a `ValueError` that names the image and the cause, so the engine can fail the one
request that carried it. Limits (`MediaLimits`) guard against slow servers, huge downloads and
decompression bombs. An engine takes them from its `EngineArgs` fields; where a field is None, and
for `fetch_image` / `load_image` called without limits, from these variables:

    EngineArgs field     variable                  bounds                              default
    image_fetch_timeout  VLMX_IMAGE_FETCH_TIMEOUT  seconds of one http(s) download     10
    image_max_bytes      VLMX_IMAGE_MAX_BYTES      bytes of one encoded image          64 MiB
    image_max_pixels     VLMX_IMAGE_MAX_PIXELS     width * height, before decoding     64 Mi

Images decoded from bytes (paths, file / http(s) / data URLs) are turned upright per their EXIF
orientation, as `transformers.image_utils.load_image` does. PIL images handed in are taken as they
are: their pixels are the caller's (as vLLM and the HF image processors take them); call
`PIL.ImageOps.exif_transpose` first to turn one upright.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from vlmx.multimodal.url_policy import MediaURLPolicy

_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_CHUNK_BYTES = 1 << 20
_USER_AGENT = "vlmx-image-fetch/0.1"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# NOTE: a PIL image opened from a file decodes on its first load(), which two threads must not
# run at once; one image object may be in several prompts that are processed at the same time.
# Images are spread over a few locks by identity, so different images still decode in parallel.
_PIL_LOAD_LOCKS = tuple(threading.Lock() for _ in range(64))


@dataclass(slots=True, frozen=True)
class MediaLimits:
    """Bounds on one image; `from_env()` reads the VLMX_IMAGE_* variables. Frozen: an engine
    keeps one in its `ModelConfig.media_limits`."""

    timeout_s: float = 10.0  # whole http(s) download, not just one socket read
    max_bytes: int = 64 * 1024 * 1024  # encoded size (download, file or decoded data URL)
    max_pixels: int = 64 * 1024 * 1024  # width * height, checked from the header

    def __post_init__(self) -> None:
        for name in ("timeout_s", "max_bytes", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MediaLimits.{name} must be a positive number, got {value!r}")

    @classmethod
    def from_env(
        cls,
        timeout_s: float | None = None,
        max_bytes: int | None = None,
        max_pixels: int | None = None,
    ) -> MediaLimits:
        """Each limit as given, or where None, from its VLMX_IMAGE_* variable, else the default."""
        default = cls()
        return cls(
            timeout_s=timeout_s
            if timeout_s is not None
            else _env_number("VLMX_IMAGE_FETCH_TIMEOUT", default.timeout_s, float),
            max_bytes=max_bytes
            if max_bytes is not None
            else _env_number("VLMX_IMAGE_MAX_BYTES", default.max_bytes, int),
            max_pixels=max_pixels
            if max_pixels is not None
            else _env_number("VLMX_IMAGE_MAX_PIXELS", default.max_pixels, int),
        )


def _env_number(name: str, default: float, cast: type) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} is not a valid {cast.__name__}; "
            f"set it to a positive number or unset it (default {default})"
        ) from None
    if value <= 0:
        raise ValueError(f"environment variable {name}={raw!r} must be positive")
    return value


def describe_source(source: Any, max_chars: int = 120) -> str:
    """A short, printable name for an image source (data URLs can be megabytes long)."""
    if isinstance(source, str):
        if source.startswith("data:"):
            media_type = source[5 : source.find(",")].split(";")[0] if "," in source else "?"
            return f"data URL ({media_type or 'no media type'}, {len(source)} chars)"
        return repr(source if len(source) <= max_chars else source[:max_chars] + "...")
    if isinstance(source, Image.Image):
        return f"PIL image {source.width}x{source.height} {source.mode}"
    if isinstance(source, torch.Tensor):
        return f"tensor {tuple(source.shape)} {source.dtype}"
    if isinstance(source, np.ndarray):
        return f"numpy array {source.shape} {source.dtype}"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"({len(source)} encoded bytes)"
    return type(source).__name__


# ---------------------------------------------------------------------------------------------
# Bytes -> PIL


def _check_pixels(width: int, height: int, source: str, limits: MediaLimits) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image {source} has an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ValueError(
            f"image {source} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} (a possible decompression bomb); downscale the image or raise "
            "image_max_pixels (or VLMX_IMAGE_MAX_PIXELS)"
        )


def _looks_like_text(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{", b"["))


def image_from_bytes(data: bytes, source: str, limits: MediaLimits | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image; `source` names the bytes in errors.

    The pixel limit is checked from the header, before any pixel is decoded; the whole image is
    then decoded (`load()`), so truncated files fail here and not later in the processor.
    """
    limits = limits or MediaLimits.from_env()
    if len(data) == 0:
        raise ValueError(f"image {source} is empty (0 bytes); check that the file or URL is right")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"image {source} is too large to decode safely ({e}); downscale it"
        ) from None
    except Exception as e:
        if _looks_like_text(data):
            hint = "the data looks like text (HTML/JSON/XML), not an image"
        else:
            hint = f"the data is not a format PIL can read (first bytes {data[:16]!r})"
        raise ValueError(
            f"image {source} could not be identified as an image: {hint}; "
            "pass a PNG, JPEG, WebP, GIF, BMP or TIFF image"
        ) from e
    _check_pixels(image.width, image.height, source, limits)
    try:
        image.load()  # NOTE: forces a full decode, so truncated or corrupt data fails now
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"image {source} is too large to decode safely ({e}); downscale it"
        ) from None
    except Exception as e:
        raise ValueError(
            f"image {source} ({image.format}, {image.width}x{image.height}) is truncated or "
            f"corrupt and could not be decoded: {e}; re-encode or re-download the image"
        ) from e
    _turn_upright(image, source)
    return to_rgb(image, source)


def _turn_upright(image: Image.Image, source: str) -> None:
    """Turn a decoded image, in place, as its EXIF orientation tag says (as
    `transformers.image_utils.load_image` does, with `PIL.ImageOps.exif_transpose`)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # NOTE: no copy when there is no tag
    except Exception as e:  # a malformed EXIF block
        raise ValueError(
            f"image {source} has EXIF data that could not be read to orient it: {e}; re-encode "
            "the image"
        ) from e


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # NOTE: PIL's own convert() clips 16-bit values to 255, which turns most of a 16-bit
    # grayscale image white; scale 0..65535 to 0..255 instead.
    array = np.asarray(image).astype(np.int64)
    if image.mode == "I" and array.max(initial=0) <= 255:
        scaled = array.clip(0, 255)
    else:
        scaled = (array.clip(0, 65535) + 128) // 257
    return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image, source: str = "") -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto white.

    Matches `transformers.image_transforms.convert_to_rgb` (RGBA composite over white) for images
    with alpha or a transparency key, and `Image.convert("RGB")` for the rest.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    try:
        if image.mode.startswith("I;16") or image.mode == "I":
            return _sixteen_bit_to_rgb(image)
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            if image.mode == "La":
                image = image.convert("RGBa")
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:
        raise ValueError(
            f"image {source or '(PIL)'} has mode {image.mode!r}, which could not be converted to "
            f"RGB: {e}; convert it to RGB before passing it"
        ) from e


# ---------------------------------------------------------------------------------------------
# URL / path -> bytes


class _FetchError(Exception):
    """A download failure whose message is ready for the user (raised as ValueError below)."""


def _read_http(
    url: str, limits: MediaLimits, opener: urllib.request.OpenerDirector | None = None
) -> tuple[bytes, str]:
    """Download `url` within the time and byte limits; returns (body, content type). `opener`:
    urllib's default where None (a server's checks each redirect, `MediaURLPolicy.opener`)."""
    name = describe_source(url)
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    deadline = time.monotonic() + limits.timeout_s
    too_big = (
        f"image URL {name} is larger than the limit of {limits.max_bytes} bytes; use a smaller "
        "image or raise image_max_bytes (or VLMX_IMAGE_MAX_BYTES)"
    )
    timed_out = (
        f"timed out after {limits.timeout_s:g} s fetching image URL {name}; check that the server "
        "is reachable or raise the timeout (timeout=, image_fetch_timeout or "
        "VLMX_IMAGE_FETCH_TIMEOUT)"
    )
    try:
        # NOTE: urlopen's timeout bounds each socket operation; the deadline bounds the whole
        # download, so a server that trickles bytes cannot hold a request for long.
        urlopen = urllib.request.urlopen if opener is None else opener.open
        with urlopen(request, timeout=limits.timeout_s) as response:
            content_type = response.headers.get("Content-Type", "") or ""
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limits.max_bytes:
                raise _FetchError(too_big + f" (Content-Length {length})")
            chunks: list[bytes] = []
            num_bytes = 0
            while chunk := response.read1(_CHUNK_BYTES):  # NOTE: read1 returns what has arrived
                num_bytes += len(chunk)
                if num_bytes > limits.max_bytes:
                    raise _FetchError(too_big)
                if time.monotonic() > deadline:
                    raise _FetchError(timed_out)
                chunks.append(chunk)
    except _FetchError as e:
        raise ValueError(str(e)) from None
    except urllib.error.HTTPError as e:
        raise ValueError(
            f"HTTP error {e.code} {e.reason} fetching image URL {name}; check that the URL is "
            "right and publicly reachable"
        ) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise ValueError(timed_out) from None
        raise ValueError(
            f"could not fetch image URL {name}: {e.reason}; check the host name and network"
        ) from None
    except TimeoutError:
        raise ValueError(timed_out) from None
    except Exception as e:  # http.client errors, connection resets, malformed URLs
        raise ValueError(f"could not fetch image URL {name}: {type(e).__name__}: {e}") from e
    return b"".join(chunks), content_type.split(";")[0].strip().lower()


def _read_data_url(url: str, limits: MediaLimits) -> bytes:
    name = describe_source(url)
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"image {name} has no ',' separating header and data")
    if not header.lower().endswith(";base64"):
        raise ValueError(
            f"image {name} is not base64-encoded; vlmx reads data URLs of the form "
            "data:image/<format>;base64,<data>"
        )
    payload = "".join(payload.split())  # NOTE: base64 wrapped over lines is common
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ValueError(
            f"image {name} is larger than the limit of {limits.max_bytes} bytes; use a smaller "
            "image or raise image_max_bytes (or VLMX_IMAGE_MAX_BYTES)"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image {name} has invalid base64 data: {e}") from None


def _read_file(path: Path, limits: MediaLimits) -> bytes:
    name = repr(str(path))
    if not path.exists():
        raise ValueError(
            f"image file {name} does not exist; pass an existing path, a file:// URL, an "
            "http(s) URL or a data:image/...;base64, URL"
        )
    if not path.is_file():
        raise ValueError(f"image path {name} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"image file {name} is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ValueError(
            f"image file {name} is {size} bytes, over the limit of {limits.max_bytes}; use a "
            "smaller image or raise image_max_bytes (or VLMX_IMAGE_MAX_BYTES)"
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"image file {name} could not be read: {e}") from None


def _file_url_to_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(
            f"file URL {describe_source(url)} names host {parsed.netloc!r}; only local files "
            "(file:///path) are supported"
        )
    return Path(urllib.request.url2pathname(parsed.path))


def fetch_image(
    image_url: str,
    *,
    timeout: float | None = None,
    limits: MediaLimits | None = None,
    policy: MediaURLPolicy | None = None,
) -> Image.Image:
    """Load an RGB PIL image from an http(s) URL, a base64 data URL, a file:// URL or a path.

    The counterpart of `vllm.multimodal.utils.fetch_image`. `timeout` (seconds) overrides the
    download timeout of `limits` (default: `MediaLimits.from_env()`). `policy`: which sources
    may be read, each redirect included (a server's; None trusts the caller).
    """
    if not isinstance(image_url, str):
        raise ValueError(
            f"fetch_image takes a URL or path string, got {type(image_url).__name__}; use "
            "load_image for PIL images, tensors and arrays"
        )
    limits = limits or MediaLimits.from_env()
    if timeout is not None:
        limits = replace(limits, timeout_s=timeout)
    url = image_url.strip()
    if not url:
        raise ValueError("image URL is an empty string")
    name = describe_source(url)
    if policy is not None:
        policy.check(url)
    match = _URL_SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("http", "https"):
        data, content_type = _read_http(url, limits, policy.opener() if policy else None)
        if ("html" in content_type or content_type.startswith("text/")) and _looks_like_text(data):
            raise ValueError(
                f"image URL {name} returned a web page (Content-Type {content_type!r}), not an "
                "image; use the direct link to the image file"
            )
        return image_from_bytes(data, name, limits)
    if scheme == "data":
        return image_from_bytes(_read_data_url(url, limits), name, limits)
    if scheme == "file":
        path = _file_url_to_path(url)
        return image_from_bytes(_read_file(path, limits), repr(str(path)), limits)
    path = Path(url).expanduser()
    # NOTE: a one-letter "scheme" is a Windows drive (C:\...); "a:b.png" may be a real file.
    if len(scheme) > 1 and not path.exists():
        raise ValueError(
            f"image URL {name} has unsupported scheme {scheme!r}; vlmx reads http(s)://, "
            "data:image/...;base64,, file:// URLs and local paths"
        )
    return image_from_bytes(_read_file(path, limits), repr(url), limits)


# ---------------------------------------------------------------------------------------------
# Anything -> uint8 [3, H, W]


def _tensor_to_chw_uint8(tensor: torch.Tensor, limits: MediaLimits) -> torch.Tensor:
    name = describe_source(tensor)
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        hint = ""
        if tensor.dim() == 3 and tensor.shape[-1] == 3:
            hint = "; it looks like [H, W, 3]: pass tensor.permute(2, 0, 1)"
        elif tensor.dim() == 4 and tensor.shape[0] == 1:
            hint = "; pass one image per item (tensor[0])"
        raise ValueError(f"image {name} must have shape [3, H, W] (RGB, channels first){hint}")
    _check_pixels(int(tensor.shape[2]), int(tensor.shape[1]), name, limits)
    tensor = tensor.detach()
    if tensor.dtype == torch.uint8:
        return tensor.cpu().contiguous()
    if not tensor.is_floating_point():
        raise ValueError(
            f"image {name} has dtype {tensor.dtype}; pass uint8 in 0..255 or a float dtype in "
            "[0, 1]"
        )
    tensor = tensor.cpu().float()
    low, high = float(tensor.min()), float(tensor.max())
    if not (low >= 0.0 and high <= 1.0):  # NOTE: written this way so that NaN fails too
        raise ValueError(
            f"image {name} is float with values in [{low:g}, {high:g}]; float images must be in "
            "[0, 1] (divide by 255, or pass a uint8 tensor)"
        )
    return tensor.mul(255.0).round_().to(torch.uint8).contiguous()


def _array_to_chw_uint8(array: np.ndarray, limits: MediaLimits) -> torch.Tensor:
    name = describe_source(array)
    if array.dtype != np.uint8:
        raise ValueError(
            f"image {name} must be uint8 in 0..255 with shape [H, W, 3]; convert with "
            "array.astype(np.uint8) or pass a float torch tensor [3, H, W] in [0, 1]"
        )
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image {name} must have shape [H, W, 3] (RGB, channels last)")
    _check_pixels(array.shape[1], array.shape[0], name, limits)
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))


def _pil_to_chw_uint8(image: Image.Image, limits: MediaLimits) -> torch.Tensor:
    name = describe_source(image)
    _check_pixels(image.width, image.height, name, limits)
    try:
        with _PIL_LOAD_LOCKS[(id(image) >> 4) % len(_PIL_LOAD_LOCKS)]:  # ids are 16-aligned
            image.load()
    except Exception as e:
        raise ValueError(f"image {name} is truncated or corrupt: {e}") from e
    rgb = to_rgb(image, name)
    # NOTE: asarray copies once (via tobytes), the transpose copy yields a writable array.
    chw = np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))
    return torch.from_numpy(chw)


def load_image(
    item: Any, *, limits: MediaLimits | None = None, policy: MediaURLPolicy | None = None
) -> torch.Tensor:
    """Load one image as a uint8 [3, H, W] contiguous CPU tensor (the caller's own).

    Accepts a PIL image, a string (http(s) / data / file URL or path, via `fetch_image`), encoded
    image bytes, a torch tensor [3, H, W] (uint8, or float in [0, 1]) or a numpy array [H, W, 3]
    uint8. `limits`: default `MediaLimits.from_env()`. An engine loads through its
    `MediaLoader`, which also keeps the decoded images of data URLs. `policy`: as for
    `fetch_image`.
    """
    limits = limits or MediaLimits.from_env()
    if isinstance(item, Image.Image):
        return _pil_to_chw_uint8(item, limits)
    if isinstance(item, str):
        return _pil_to_chw_uint8(fetch_image(item, limits=limits, policy=policy), limits)
    if isinstance(item, torch.Tensor):
        return _tensor_to_chw_uint8(item, limits)
    if isinstance(item, np.ndarray):
        return _array_to_chw_uint8(item, limits)
    if isinstance(item, os.PathLike):
        image = fetch_image(os.fspath(item), limits=limits, policy=policy)
        return _pil_to_chw_uint8(image, limits)
    if isinstance(item, bytes | bytearray | memoryview):
        return _pil_to_chw_uint8(_image_from_encoded(bytes(item), limits), limits)
    raise ValueError(
        f"unsupported image type {type(item).__module__}.{type(item).__qualname__}; pass a PIL "
        "image, a URL / path / data URL string, encoded image bytes, a torch tensor [3, H, W] or "
        "a numpy array [H, W, 3] uint8"
    )


def _image_from_encoded(data: bytes, limits: MediaLimits) -> Image.Image:
    """Encoded image bytes (a PNG, JPEG, ... file's content) under `limits`."""
    name = describe_source(data)
    if len(data) > limits.max_bytes:
        raise ValueError(
            f"image {name} is over the limit of {limits.max_bytes} bytes; use a smaller image or "
            "raise image_max_bytes (or VLMX_IMAGE_MAX_BYTES)"
        )
    return image_from_bytes(data, name, limits)
