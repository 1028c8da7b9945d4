"""Shared fixtures: tiny Qwen-VL checkpoints in both layouts, the Qwen2 tokenizer, test images.

Checkpoints are built once per test session into pytest's temp folder; nothing touches the network
or the user's vlmx cache (`VLMX_CACHE_DIR` points at a session temp folder).
"""

from __future__ import annotations

import os

# NOTE: set before transformers / huggingface_hub are imported: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tests.loopback import PROXY_VARIABLES  # noqa: E402

# (width, height, variant): square, wide 2:1, tall, 4:3 and a small one.
TEST_IMAGE_SPECS = ((224, 224, 0), (320, 160, 1), (150, 330, 2), (400, 300, 3), (64, 96, 4))


@pytest.fixture(scope="session", autouse=True)
def _offline_session_cache(tmp_path_factory):
    """Point the vlmx cache (tokenizer folder, demo model) at a fresh session folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMX_CACHE_DIR", str(tmp_path_factory.mktemp("vlmx-cache")))
        yield


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2 tokenizer (151665 tokens, eos <|im_end|>), with the Qwen-VL chat template."""
    from vlmx.demo.tokenizer import build_qwen2_tokenizer

    return build_qwen2_tokenizer()


def _build(tmp_path_factory, family: str, layout: str, tokenizer) -> str:
    from vlmx.demo.checkpoint import build_tiny_checkpoint

    folder = tmp_path_factory.mktemp(f"{family}-{layout}")
    # The hub layout copies the published-style tokenizer files instead of saving the object.
    tokenizer = tokenizer if layout == "transformers" else None
    return build_tiny_checkpoint(folder, family, layout, seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def qwen2_vl_ckpt(tmp_path_factory, qwen_tokenizer) -> str:
    """Tiny Qwen2-VL, as transformers 5 `save_pretrained` writes it (nested config)."""
    return _build(tmp_path_factory, "qwen2_vl", "transformers", qwen_tokenizer)


@pytest.fixture(scope="session")
def qwen2_5_vl_ckpt(tmp_path_factory, qwen_tokenizer) -> str:
    """Tiny Qwen2.5-VL, as transformers 5 `save_pretrained` writes it (nested config)."""
    return _build(tmp_path_factory, "qwen2_5_vl", "transformers", qwen_tokenizer)


@pytest.fixture(scope="session")
def qwen2_vl_hub_ckpt(tmp_path_factory, qwen_tokenizer) -> str:
    """The same tiny Qwen2-VL as `qwen2_vl_ckpt`, in the published hub layout (flat config)."""
    return _build(tmp_path_factory, "qwen2_vl", "hub", qwen_tokenizer)


@pytest.fixture(scope="session")
def qwen2_5_vl_hub_ckpt(tmp_path_factory, qwen_tokenizer) -> str:
    """The same tiny Qwen2.5-VL as `qwen2_5_vl_ckpt`, in the published hub layout."""
    return _build(tmp_path_factory, "qwen2_5_vl", "hub", qwen_tokenizer)


@pytest.fixture(scope="session")
def test_images() -> list[Image.Image]:
    """Five distinct structured RGB images: 224x224, 320x160, 150x330, 400x300, 64x96."""
    from vlmx.demo.images import structured_image

    return [structured_image(w, h, variant) for w, h, variant in TEST_IMAGE_SPECS]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # NOTE: a proxy set in the environment would otherwise receive the loopback requests.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def pytest_terminal_summary(terminalreporter):
    """On a non-default parity run (VLMX_TEST_DEVICE / VLMX_TEST_DTYPE), list the largest
    logprob difference from the float32 reference that each parity test saw."""
    from tests.hf_reference import MAX_LOGPROB_DIFFS, TEST_DEVICE, TEST_DTYPE

    if (TEST_DEVICE, TEST_DTYPE) == ("cpu", "float32") or not MAX_LOGPROB_DIFFS:
        return
    terminalreporter.section(f"parity on {TEST_DEVICE} in {TEST_DTYPE}: max |logprob diff|")
    for test_id, diff in sorted(MAX_LOGPROB_DIFFS.items()):
        terminalreporter.write_line(f"{diff:.2e}  {test_id}")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module: 2 CPUs, a small object store."""
    import ray

    # NOTE: the workers import this checkout's vlmx (not an installed one) as the tests do.
    repo_root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", path)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 2**20,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            yield ray
        finally:
            ray.shutdown()
