"""Image loading: every source kind, every mode, every failure as a readable ValueError."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.loopback import serve
from vlmx.multimodal import MediaLimits, fetch_image, load_image, media
from vlmx.multimodal.loader import MediaLoader
from vlmx.multimodal.media import image_from_bytes


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


NOISE = _noise()
PNG = _encode(Image.fromarray(NOISE), "PNG")
JPEG = _encode(Image.fromarray(_noise(64, 64, seed=1)), "JPEG", quality=90)


def _oriented_jpeg(orientation: int) -> bytes:
    """A 40x24 JPEG whose EXIF Orientation tag (0x0112) is `orientation` (1..8)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(_noise(40, 24, seed=2)), "JPEG", quality=95, exif=exif)


ORIENTED = {o: _oriented_jpeg(o) for o in range(1, 9)}


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height; the pixel data is a stub."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


# ---------------------------------------------------------------------------------------------
# Loopback HTTP server


class _Handler(BaseHTTPRequestHandler):
    stop: threading.Event  # set on the class by the fixture

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, body: bytes, content_type: str, status: int = 200, length: bool = True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up first (timeout tests)
            self.wfile.write(body)

    def do_GET(self) -> None:
        routes = {
            "/img.png": (PNG, "image/png"),
            "/img.jpg": (JPEG, "image/jpeg"),
            "/page.html": (
                b"<!DOCTYPE html><html><body>cat</body></html>",
                "text/html; charset=utf-8",
            ),
            "/html-as-png": (b"<html><body>login</body></html>", "image/png"),
            "/octet.png": (PNG, "application/octet-stream"),
            "/empty": (b"", "image/png"),
            "/big": (b"\x00" * 10_000, "image/png"),
        }
        if self.path in routes:
            self._send(*routes[self.path])
        elif self.path.startswith("/oriented-"):  # /oriented-<1..8>.jpg
            self._send(ORIENTED[int(self.path[len("/oriented-")])], "image/jpeg")
        elif self.path == "/missing":
            self._send(b"not found", "text/plain", status=404)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
        elif self.path == "/big-unsized":  # no Content-Length: the body ends when the socket closes
            self._send(b"\x00" * 10_000, "image/png", length=False)
        elif self.path == "/slow":  # nothing at all until well past the client's timeout
            self.stop.wait(3.0)
            self._send(PNG, "image/png")
        elif self.path == "/trickle":  # one byte every 50 ms: no single read times out
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for byte in PNG:
                    if self.stop.wait(0.05):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            except OSError:
                return
        else:
            self._send(b"?", "text/plain", status=500)


@pytest.fixture(scope="module")
def server():
    stop = threading.Event()
    handler = type("Handler", (_Handler,), {"stop": stop})
    with serve(handler) as url:
        try:
            yield url
        finally:
            stop.set()  # release slow handlers before the server joins their threads


# ---------------------------------------------------------------------------------------------
# http(s)


def test_http_png_and_jpeg(server):
    png = fetch_image(f"{server}/img.png")
    assert png.mode == "RGB" and png.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(png), NOISE)
    jpeg = fetch_image(f"{server}/img.jpg")
    assert jpeg.mode == "RGB" and jpeg.size == (64, 64)
    tensor = load_image(f"{server}/img.png")
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 32, 48) and tensor.is_contiguous()
    torch.testing.assert_close(tensor, torch.from_numpy(NOISE).permute(2, 0, 1))


def test_http_redirect_and_generic_content_type(server):
    assert fetch_image(f"{server}/redirect").size == (48, 32)
    assert fetch_image(f"{server}/octet.png").size == (48, 32)


def test_http_html_page(server):
    with pytest.raises(ValueError, match=r"web page.*text/html"):
        fetch_image(f"{server}/page.html")
    with pytest.raises(ValueError, match=r"could not be identified.*looks like text"):
        fetch_image(f"{server}/html-as-png")


def test_http_404(server):
    with pytest.raises(ValueError, match=r"HTTP error 404"):
        fetch_image(f"{server}/missing")


def test_http_empty_body(server):
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        fetch_image(f"{server}/empty")


def test_http_timeout(server):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"timed out after 0.3 s"):
        fetch_image(f"{server}/slow", timeout=0.3)
    assert time.monotonic() - start < 2.0


def test_http_trickle_hits_total_deadline(server):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"timed out"):
        fetch_image(f"{server}/trickle", timeout=0.4)
    assert time.monotonic() - start < 2.0


def test_http_timeout_from_env(server, monkeypatch):
    monkeypatch.setenv("VLMX_IMAGE_FETCH_TIMEOUT", "0.3")
    with pytest.raises(ValueError, match=r"timed out after 0.3 s"):
        fetch_image(f"{server}/slow")


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_http_byte_limit(server, monkeypatch, path):
    monkeypatch.setenv("VLMX_IMAGE_MAX_BYTES", "1000")
    with pytest.raises(ValueError, match=r"larger than the limit of 1000 bytes"):
        fetch_image(f"{server}{path}")


def test_http_connection_refused():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ValueError, match=r"could not fetch image URL"):
        fetch_image(f"http://127.0.0.1:{port}/img.png", timeout=2)


# ---------------------------------------------------------------------------------------------
# data URLs, files, paths


def test_data_url():
    assert np.array_equal(np.asarray(fetch_image(_data_url(PNG))), NOISE)
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert np.array_equal(np.asarray(fetch_image("data:image/png;base64," + wrapped)), NOISE)
    assert fetch_image(_data_url(JPEG, "image/jpeg")).size == (64, 64)


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("data:image/png;base64,!!!notbase64!!!", r"invalid base64"),
        ("data:image/png;base64,abc", r"invalid base64"),
        ("data:image/png," + "x" * 10, r"not base64-encoded"),
        ("data:image/png;base64", r"no ','"),
        ("data:image/png;base64,", r"empty \(0 bytes\)"),
        (_data_url(b"hello world, not an image"), r"could not be identified"),
    ],
)
def test_data_url_errors(url, cause):
    with pytest.raises(ValueError, match=cause):
        fetch_image(url)


def _count_decodes(monkeypatch) -> list[str]:
    decodes: list[str] = []
    real = media.fetch_image
    monkeypatch.setattr(media, "fetch_image", lambda u, **k: decodes.append(u) or real(u, **k))
    return decodes


def test_repeated_data_url_is_decoded_once(monkeypatch):
    """A loader decodes a data URL it has seen once; each caller gets its own tensor."""
    loader = MediaLoader()
    decodes = _count_decodes(monkeypatch)
    url = _data_url(PNG)
    first = loader.load(url)
    first.zero_()  # the caller's own: the next load is unaffected
    again = loader.load("".join(url))  # equal text, another string object
    assert len(decodes) == 1
    assert torch.equal(again, torch.from_numpy(NOISE).permute(2, 0, 1))
    assert loader.load(_data_url(JPEG, "image/jpeg")).shape == (3, 64, 64)
    assert len(decodes) == 2
    # load_image alone keeps nothing: it decodes every time
    load_image(url)
    load_image(url)
    assert len(decodes) == 4 and len(loader.data_urls) == 2


def test_data_url_cache_is_bounded(monkeypatch):
    png, jpeg = _data_url(PNG), _data_url(JPEG, "image/jpeg")
    loader = MediaLoader(data_url_cache_bytes=NOISE.size + 64 * 64 * 3 - 1)  # not both images
    cache = loader.data_urls
    decodes = _count_decodes(monkeypatch)
    loader.load(png)
    loader.load(jpeg)  # over the bound with both: the least recently used (png) goes
    assert len(cache) == 1 and cache.images.num_bytes <= cache.images.capacity_bytes
    loader.load(jpeg)
    assert decodes == [png, jpeg]  # jpeg kept
    # a failure is not cached
    for _ in range(2):
        with pytest.raises(ValueError, match="invalid base64"):
            loader.load("data:image/png;base64,abc")
    assert len(cache) == 1
    loader.load(png)
    assert decodes.count(png) == 2  # evicted before, decoded again


def test_loaders_keep_their_own_limits_and_caches(monkeypatch):
    """Each engine's loader has its own limits and data URL cache: clearing one, or a stricter
    one failing, leaves the other's images alone."""
    jpeg = _data_url(JPEG, "image/jpeg")
    first, second = MediaLoader(), MediaLoader()
    strict = MediaLoader(MediaLimits(max_pixels=100))
    decodes = _count_decodes(monkeypatch)
    first.load(jpeg)
    second.load(jpeg)
    assert len(decodes) == 2  # nothing shared
    with pytest.raises(ValueError, match=r"4096 pixels, over the limit of 100"):
        strict.load(jpeg)  # checked under its own limits, not served from another's cache
    second.clear()
    assert len(first.data_urls) == 1 and len(second.data_urls) == 0
    first.load(jpeg)
    assert len(decodes) == 3  # first's entry survived second's clear
    second.load(jpeg)
    assert len(decodes) == 4


def test_loader_limits_default_to_the_environment(monkeypatch):
    monkeypatch.setenv("VLMX_IMAGE_MAX_PIXELS", "1000")
    loader = MediaLoader()
    assert loader.limits.max_pixels == 1000
    monkeypatch.delenv("VLMX_IMAGE_MAX_PIXELS")
    with pytest.raises(ValueError, match=r"1536 pixels, over the limit of 1000"):
        loader.load(NOISE)  # read once, when the loader was made
    assert MediaLoader(MediaLimits(max_pixels=2000)).load(NOISE).shape == (3, 32, 48)
    assert MediaLimits.from_env(max_pixels=5).max_pixels == 5


# ---------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_transformers(orientation, server, tmp_path):
    """Paths, file / http(s) / data URLs come out upright, pixel for pixel as transformers'
    `load_image` (which applies `ImageOps.exif_transpose`) returns them."""
    from transformers.image_utils import load_image as hf_load_image

    data = ORIENTED[orientation]
    path = tmp_path / f"oriented-{orientation}.jpg"
    path.write_bytes(data)
    expected = np.asarray(hf_load_image(str(path)))  # [H, W, 3]
    assert np.array_equal(expected, np.asarray(hf_load_image(_data_url(data, "image/jpeg"))))
    # orientations 5..8 swap width and height; the others keep the stored 40x24
    assert expected.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(expected, raw) == (orientation == 1)
    sources = (
        str(path),
        path,
        path.as_uri(),
        f"{server}/oriented-{orientation}.jpg",
        _data_url(data, "image/jpeg"),
    )
    for source in sources:
        assert np.array_equal(np.asarray(fetch_image(str(source))), expected), source
        tensor = load_image(source)
        assert np.array_equal(tensor.permute(1, 2, 0).numpy(), expected), source
    loader = MediaLoader()
    for _ in range(2):  # decoded, then from the data URL cache: upright both times
        tensor = loader.load(_data_url(data, "image/jpeg"))
        assert np.array_equal(tensor.permute(1, 2, 0).numpy(), expected)


def test_pil_images_handed_in_are_taken_as_they_are():
    """A PIL image the caller passes keeps its pixels, as vLLM and the HF image processors take
    it; `ImageOps.exif_transpose` first turns it upright."""
    from PIL import ImageOps

    image = Image.open(io.BytesIO(ORIENTED[6]))
    tensor = load_image(image)
    assert tensor.shape == (3, 24, 40)
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(image.convert("RGB")))
    upright = load_image(ImageOps.exif_transpose(image))
    assert upright.shape == (3, 40, 24)
    assert torch.equal(upright, load_image(_data_url(ORIENTED[6], "image/jpeg")))


def test_data_url_byte_limit():
    with pytest.raises(ValueError, match=r"larger than the limit of 100 bytes"):
        fetch_image(_data_url(PNG), limits=MediaLimits(max_bytes=100))


def test_file_url_and_plain_path(tmp_path):
    path = tmp_path / "my image.png"
    path.write_bytes(PNG)
    for source in (path.as_uri(), str(path), path):
        image = load_image(source)
        torch.testing.assert_close(image, torch.from_numpy(NOISE).permute(2, 0, 1))
    assert "%20" in path.as_uri()
    assert fetch_image(str(path)).size == (48, 32)


def test_relative_path_with_colon_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shot:1.png").write_bytes(PNG)
    assert fetch_image("shot:1.png").size == (48, 32)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist"):
        fetch_image(str(tmp_path / "nope.png"))
    with pytest.raises(ValueError, match=r"does not exist"):
        fetch_image((tmp_path / "nope.png").as_uri())
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        fetch_image(str(empty))
    with pytest.raises(ValueError, match=r"not a regular file"):
        fetch_image(str(tmp_path))
    with pytest.raises(ValueError, match=r"only local files"):
        fetch_image("file://otherhost/x.png")
    with pytest.raises(ValueError, match=r"unsupported scheme 'ftp'"):
        fetch_image("ftp://example.com/x.png")
    with pytest.raises(ValueError, match=r"empty string"):
        fetch_image("  ")
    big = tmp_path / "big.png"
    big.write_bytes(PNG)
    with pytest.raises(ValueError, match=r"over the limit of 10"):
        fetch_image(str(big), limits=MediaLimits(max_bytes=10))


@pytest.mark.parametrize(("data", "fmt"), [(PNG, "PNG"), (JPEG, "JPEG")])
def test_truncated_bytes(tmp_path, data, fmt):
    with pytest.raises(ValueError, match=rf"{fmt}.*truncated or corrupt"):
        image_from_bytes(data[: len(data) // 2], "'cut'")
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_image(str(path))


def test_garbage_bytes():
    with pytest.raises(ValueError, match=r"not a format PIL can read"):
        image_from_bytes(b"\x01\x02\x03 definitely not an image", "'junk'")


# ---------------------------------------------------------------------------------------------
# Pixel limit (decompression bombs)


def test_pixel_limit_from_header_before_decoding():
    bomb = _png_header(9000, 9000)  # 81 Mpixel: over the default limit, under PIL's own
    with pytest.raises(ValueError, match=r"9000x9000 = 81000000 pixels.*decompression bomb"):
        image_from_bytes(bomb, "'bomb'")
    with pytest.raises(ValueError, match=r"too large to decode safely"):
        image_from_bytes(_png_header(100_000, 100_000), "'huge'")  # PIL's own guard, wrapped


def test_pixel_limit_env_applies_to_every_input(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMX_IMAGE_MAX_PIXELS", "1000")  # the test image has 48 * 32 = 1536
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    for source in (
        str(path),
        _data_url(PNG),
        Image.fromarray(NOISE),
        NOISE,
        torch.from_numpy(NOISE).permute(2, 0, 1),
    ):
        with pytest.raises(ValueError, match=r"1536 pixels, over the limit of 1000"):
            load_image(source)


def test_limits_validation(monkeypatch):
    with pytest.raises(ValueError, match=r"max_bytes must be a positive number"):
        MediaLimits(max_bytes=0)
    monkeypatch.setenv("VLMX_IMAGE_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match=r"VLMX_IMAGE_MAX_PIXELS='lots'"):
        load_image(NOISE)


# ---------------------------------------------------------------------------------------------
# Mode conversion


def _pixels(image: Image.Image, via_png: bool) -> np.ndarray:
    if via_png:
        return np.asarray(fetch_image(_data_url(_encode(image, "PNG"))))
    return load_image(image).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("via_png", [False, True])
def test_rgba_composited_on_white(via_png):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    pixels = _pixels(image, via_png)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert pixels[0, 1].tolist() == [255, 0, 0]
    assert all(abs(v - 127) <= 1 for v in pixels[0, 2].tolist())


@pytest.mark.parametrize("via_png", [False, True])
def test_la_composited_on_white(via_png):
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (50, 255)])
    pixels = _pixels(image, via_png)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [50, 50, 50]


@pytest.mark.parametrize("via_png", [False, True])
def test_palette_with_and_without_transparency(via_png):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    image.putdata([0, 1])
    assert _pixels(image, via_png)[0].tolist() == [[0, 0, 0], [10, 200, 30]]
    image.info["transparency"] = 0
    assert _pixels(image, via_png)[0].tolist() == [[255, 255, 255], [10, 200, 30]]


def test_rgb_with_transparency_key():
    image = Image.new("RGB", (2, 1))
    image.putdata([(1, 2, 3), (9, 9, 9)])
    image.info["transparency"] = (1, 2, 3)
    assert _pixels(image, via_png=True)[0].tolist() == [[255, 255, 255], [9, 9, 9]]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("L", [0, 77], [[0, 0, 0], [77, 77, 77]]),
        ("1", [0, 1], [[0, 0, 0], [255, 255, 255]]),
        ("CMYK", [(0, 0, 0, 0), (0, 255, 255, 0)], [[255, 255, 255], [255, 0, 0]]),
        ("I", [0, 200], [[0, 0, 0], [200, 200, 200]]),
        ("I", [0, 65535], [[0, 0, 0], [255, 255, 255]]),
        ("I;16", [32768, 65535], [[128, 128, 128], [255, 255, 255]]),
    ],
)
def test_other_modes_to_rgb(mode, values, expected):
    image = Image.new(mode, (2, 1))
    image.putdata(values)
    assert load_image(image).permute(1, 2, 0)[0].tolist() == expected


def test_sixteen_bit_png_is_scaled_not_clipped():
    gray = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(gray), "PNG")
    assert np.asarray(fetch_image(_data_url(data)))[0, :, 0].tolist() == [0, 100, 255]


# ---------------------------------------------------------------------------------------------
# Tensors, arrays, other types


def test_uint8_tensor_forms():
    chw = torch.from_numpy(NOISE).permute(2, 0, 1)  # a non-contiguous view
    out = load_image(chw)
    assert out.is_contiguous() and out.dtype == torch.uint8 and out.device.type == "cpu"
    torch.testing.assert_close(out, chw)
    contiguous = chw.contiguous()
    assert load_image(contiguous).data_ptr() == contiguous.data_ptr()  # no copy when not needed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_float_tensor_in_unit_range(dtype):
    values = torch.tensor([0.0, 0.5, 1.0, 0.2]).reshape(1, 2, 2).expand(3, 2, 2)
    tensor = values.to(dtype).requires_grad_(dtype != torch.bfloat16)
    out = load_image(tensor)
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 2) and out.is_contiguous()
    assert out[0].flatten().tolist() == [0, 128, 255, 51]


@pytest.mark.parametrize(
    ("tensor", "cause"),
    [
        (torch.zeros(4, 5, 3, dtype=torch.uint8), r"\[3, H, W\].*permute\(2, 0, 1\)"),
        (torch.zeros(1, 3, 4, 5, dtype=torch.uint8), r"\[3, H, W\].*one image per item"),
        (torch.zeros(4, 4, 5, dtype=torch.uint8), r"\[3, H, W\]"),
        (torch.zeros(4, 5, dtype=torch.uint8), r"\[3, H, W\]"),
        (torch.zeros(3, 0, 5, dtype=torch.uint8), r"empty size"),
        (torch.zeros(3, 4, 5, dtype=torch.int32), r"dtype torch.int32"),
        (torch.zeros(3, 4, 5, dtype=torch.bool), r"dtype torch.bool"),
        (torch.full((3, 4, 5), 255.0), r"values in \[255, 255\].*\[0, 1\]"),
        (torch.full((3, 4, 5), -0.5), r"\[0, 1\]"),
        (torch.full((3, 4, 5), float("nan")), r"\[0, 1\]"),
    ],
)
def test_bad_tensors(tensor, cause):
    with pytest.raises(ValueError, match=cause):
        load_image(tensor)


def test_numpy_forms():
    out = load_image(NOISE)
    assert out.shape == (3, 32, 48) and out.is_contiguous()
    torch.testing.assert_close(out, torch.from_numpy(NOISE).permute(2, 0, 1))
    read_only = NOISE.copy()
    read_only.flags.writeable = False
    torch.testing.assert_close(load_image(read_only), out)
    torch.testing.assert_close(load_image(NOISE[:, ::2]), out[:, :, ::2])  # strided view


@pytest.mark.parametrize(
    ("array", "cause"),
    [
        (np.zeros((4, 5), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((4, 5, 4), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((3, 4, 5), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((4, 5, 3), dtype=np.float32), r"must be uint8"),
    ],
)
def test_bad_arrays(array, cause):
    with pytest.raises(ValueError, match=cause):
        load_image(array)


@pytest.mark.parametrize("item", [None, 3, [1, 2, 3], {"url": "x"}])
def test_unsupported_types(item):
    with pytest.raises(ValueError, match=r"unsupported image type"):
        load_image(item)
    if not isinstance(item, str):
        with pytest.raises(ValueError, match=r"URL or path string"):
            fetch_image(item)


def test_lazy_pil_truncated_file(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(PNG[: len(PNG) // 2])
    lazy = Image.open(path)  # opening reads only the header
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_image(lazy)
    lazy.close()


def test_messages_never_dump_a_data_url():
    url = _data_url(b"not an image" * 1000)
    with pytest.raises(ValueError) as info:
        fetch_image(url)
    assert "data URL (image/png" in str(info.value) and len(str(info.value)) < 500


def test_path_object_input(tmp_path: Path):
    path = tmp_path / "a.jpg"
    path.write_bytes(JPEG)
    assert load_image(path).shape == (3, 64, 64)


def test_encoded_bytes_input(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    from_bytes = load_image(PNG)
    assert torch.equal(from_bytes, load_image(str(path)))
    assert torch.equal(load_image(bytearray(PNG)), from_bytes)
    with pytest.raises(ValueError, match=r"\(27 encoded bytes\) could not be identified"):
        load_image(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"\(4 encoded bytes\) could not be identified"):
        load_image(b"\x89PNG")  # a PNG's signature, nothing after it
    with pytest.raises(ValueError, match="over the limit of 100 bytes"):
        load_image(PNG, limits=MediaLimits(max_bytes=100))
    with pytest.raises(ValueError, match=r"URL or path string"):
        fetch_image(PNG)  # fetch_image reads URLs and paths only, as vLLM's
