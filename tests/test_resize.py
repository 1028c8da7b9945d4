"""`vlmx.multimodal.resize`: the fixed-point kernel (the path off the CPU) equals torch's CPU uint8
antialiased kernel, as HF's processors call it (torchvision for bicubic and bilinear, `interpolate`
for lanczos), bit for bit, for every filter, up and down."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as tvF

from tests.test_qwen2_vl_processor import structured_image
from vlmx.multimodal.resize import resize_uint8, resize_uint8_fixed_point

FILTERS = ("bicubic", "bilinear", "lanczos")
# (height, width): tiny, square, very wide, very tall, odd
IN_SIZES = [(1, 1), (2, 3), (5, 300), (300, 5), (17, 17), (48, 64), (77, 333), (150, 97)]
# NOTE: no 1x1 output: torch's CPU kernel fails an internal assert on it (torch 2.14).
OUT_SIZES = [(1, 4), (4, 1), (3, 5), (13, 7), (32, 32), (48, 64), (61, 96), (10, 200), (160, 90)]


def torch_cpu(images: torch.Tensor, size: tuple[int, int], filter: str) -> torch.Tensor:
    """What the families' HF processors run on the CPU."""
    if filter == "lanczos":
        return F.interpolate(
            images, size=list(size), mode="lanczos", antialias=True, align_corners=False
        )
    mode = tvF.InterpolationMode.BICUBIC if filter == "bicubic" else tvF.InterpolationMode.BILINEAR
    return tvF.resize(images, list(size), mode, antialias=True)


def random_images(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 [2, 3, H, W] noise: every edge as sharp as it gets."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("filter", FILTERS)
@pytest.mark.parametrize("size", IN_SIZES)
def test_fixed_point_equals_torch_cpu_over_sizes(filter, size):
    images = random_images(*size, seed=size[0] * 1000 + size[1])
    for out in OUT_SIZES + [size, (size[0], size[1] * 2), (size[0] * 3, size[1])]:
        expected = torch_cpu(images, out, filter)
        assert torch.equal(resize_uint8_fixed_point(images, *out, filter), expected), (size, out)


@pytest.mark.parametrize("filter", FILTERS)
def test_resize_uint8_on_cpu_is_torch_cpu(filter):
    images = torch.stack([structured_image(90, 70, seed) for seed in range(2)])
    for out in [(90, 70), (45, 35), (200, 13)]:
        ours = resize_uint8(images, *out, filter)
        assert ours.dtype == torch.uint8 and ours.shape == (2, 3, *out)
        assert torch.equal(ours, torch_cpu(images, out, filter))


# -- the kernels' tests from the processor test files, moved here with the kernels --------------


@pytest.mark.parametrize(
    "size, target",
    [
        ((20, 30), (56, 84)),
        ((1, 150), (28, 700)),
        ((333, 517), (336, 504)),
        ((777, 555), (784, 560)),
        ((640, 480), (420, 308)),
        ((300, 200), (28, 28)),
        ((57, 3000), (56, 112)),
        ((13, 17), (700, 900)),
    ],
)
def test_fixed_point_resize_is_torchvision_cpu_kernel(size, target):
    """The resize used off the CPU (CUDA) equals torchvision's CPU uint8 kernel bit for bit."""
    images = torch.stack([structured_image(*size, seed) for seed in range(2)])  # [2, 3, H, W]
    expected = tvF.resize(images, list(target), tvF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(resize_uint8_fixed_point(images, *target, "bicubic"), expected)


@pytest.mark.parametrize("size", [(32, 32), (5, 300), (333, 77), (900, 64), (20, 21)])
def test_fixed_point_bilinear_resize_equals_torch_cpu(size):
    """The device path (used on CUDA) equals torchvision's CPU uint8 kernel bit for bit."""
    w, h = size
    pixels = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    for out in [(32, 32), (64, 48), (7, 13)]:
        expected = tvF.resize(image, list(out), tvF.InterpolationMode.BILINEAR, antialias=True)
        assert torch.equal(resize_uint8_fixed_point(image, *out, "bilinear"), expected)


def test_lanczos_kernel_matches_torch_cpu() -> None:
    """The tensor-op kernel (used on CUDA) equals torch's CPU uint8 LANCZOS, down and up."""
    gen = torch.Generator().manual_seed(0)
    for in_h, in_w, out_h, out_w in ((150, 97, 33, 64), (20, 30, 96, 64), (321, 200, 96, 61)):
        x = torch.randint(0, 256, (2, 3, in_h, in_w), dtype=torch.uint8, generator=gen)
        ours = resize_uint8_fixed_point(x, out_h, out_w, "lanczos")
        assert torch.equal(ours, resize_uint8(x, out_h, out_w, "lanczos"))


def test_lanczos_without_torch_support_falls_back_to_the_same_result(monkeypatch) -> None:
    # torch releases before lanczos in `interpolate` (e.g. 2.11): the fixed-point kernel serves.
    from vlmx.multimodal import resize

    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    native = resize.resize_uint8(images, 20, 31, "lanczos")
    monkeypatch.setattr(resize, "_torch_has_lanczos", lambda: False)
    torch.testing.assert_close(
        resize.resize_uint8(images, 20, 31, "lanczos"), native, atol=0, rtol=0
    )
