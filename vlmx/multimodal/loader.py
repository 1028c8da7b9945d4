"""`MediaLoader`: one engine's image loading: its limits, its cache of decoded data URLs and its
thread pool. Nothing here is shared between engines, so one engine's `reset_mm_cache` never
touches another's images.

```
LLMEngine.__init__:       self.media = MediaLoader(config.model_config.media_limits)
LLMEngine.process_prompt: tensors = self.media.load_all(images)   # uint8 [3, H, W] each
LLMEngine.reset_mm_cache: self.media.clear()
```
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import blake3
import torch

from vlmx.multimodal.cache import TensorCache
from vlmx.multimodal.media import MediaLimits, describe_source, load_image

if TYPE_CHECKING:
    from vlmx.multimodal.url_policy import MediaURLPolicy

IMAGE_THREADS = 8  # threads of one loader's pool: downloads and decodes of one prompt at once
DATA_URL_CACHE_BYTES = 256 << 20


class DataURLCache:
    """Decoded images of base64 data URLs, keyed by a blake3 digest of the URL's text, in a
    `TensorCache` of `max_bytes` (least recently used dropped). Its owner's limits apply.

    A data URL carries its image, so equal text decodes to equal pixels: a chat resends the
    same data URLs every turn, and a batch may repeat one. Decoding a 1024x768 JPEG data URL
    costs about 8 ms of CPU, part of it with the GIL held; a hit costs a digest and a copy.
    Thread-safe.
    """

    def __init__(self, limits: MediaLimits, max_bytes: int = DATA_URL_CACHE_BYTES) -> None:
        self.limits = limits
        self.images: TensorCache[torch.Tensor] = TensorCache(max_bytes)

    def load(self, url: str) -> torch.Tensor:
        """`url`'s image as `load_image` returns it: a tensor of the caller's own (a copy)."""
        key = blake3.blake3(url.encode()).hexdigest()
        cached = self.images.get(key)
        if cached is not None:
            return cached.clone()
        image = load_image(url, limits=self.limits)
        self.images.put(key, image.clone())
        return image

    def __len__(self) -> int:
        return len(self.images)

    def clear(self) -> None:
        self.images.clear()


class MediaLoader:
    """Loads the images of prompts under one set of limits, on a pool of its own.

    `load` is `load_image` (same sources, same errors) with data URLs served from the loader's
    `DataURLCache`; `load_all` loads a prompt's images on the pool, at most `max_workers` at a
    time; `clear` forgets the decoded data URLs. Thread-safe: several prompts may load at once.

    The pool starts on first use and its threads end when the loader is garbage collected. In a
    forked child the parent's threads (and maybe a held lock) are gone: the loader notices the
    new process id and starts a fresh pool and an empty cache.

    `url_policy`: which image URLs and paths may be read (a server sets one; None, the offline
    default, trusts the caller). Data URLs are always allowed.
    """

    def __init__(
        self,
        limits: MediaLimits | None = None,
        *,
        max_workers: int = IMAGE_THREADS,
        data_url_cache_bytes: int = DATA_URL_CACHE_BYTES,
        url_policy: MediaURLPolicy | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.limits = limits or MediaLimits.from_env()
        self.max_workers = max_workers
        self.url_policy = url_policy
        self._data_url_cache_bytes = data_url_cache_bytes
        self._start_fresh()

    def _start_fresh(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.data_urls = DataURLCache(self.limits, self._data_url_cache_bytes)

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked child
            self._start_fresh()

    def load(self, item: Any) -> torch.Tensor:
        """One image as a uint8 [3, H, W] contiguous CPU tensor (the caller's own)."""
        self._check_process()
        if isinstance(item, str) and item[:5].lower() == "data:":
            return self.data_urls.load(item)
        return load_image(item, limits=self.limits, policy=self.url_policy)

    def load_all(
        self, sources: Sequence[Any], max_workers: int | None = None
    ) -> list[torch.Tensor]:
        """`load` over `sources`, results in their order: uint8 [3, H, W] each.

        The first failure (by index) is raised as a ValueError naming the image's index; images
        not yet started are cancelled. Must not be called from the loader's own pool threads.
        """
        max_workers = self.max_workers if max_workers is None else max_workers
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        max_workers = min(max_workers, self.max_workers)
        if len(sources) <= 1 or max_workers == 1:
            return [self._load_one(idx, source) for idx, source in enumerate(sources)]
        pool = self._get_pool()
        images: list[torch.Tensor] = []
        in_flight: deque[Future[torch.Tensor]] = deque()
        try:
            # NOTE: results are taken in index order, so the first error raised is the first
            # image's.
            for idx, source in enumerate(sources):
                if len(in_flight) == max_workers:
                    images.append(in_flight.popleft().result())
                in_flight.append(pool.submit(self._load_one, idx, source))
            while in_flight:
                images.append(in_flight.popleft().result())
        except BaseException:
            # NOTE: don't wait for downloads in flight (each is bounded by its own timeout).
            for future in in_flight:
                future.cancel()
            raise
        return images

    def clear(self) -> None:
        """Forget the decoded data URLs (`LLM.reset_mm_cache`)."""
        self._check_process()
        self.data_urls.clear()

    def _get_pool(self) -> ThreadPoolExecutor:
        self._check_process()
        with self._lock:
            if self._pool is None:
                # NOTE: its tasks only load images and never wait on other tasks, so callers
                # that run on a pool of their own (LLM's prompt threads) may wait on them.
                self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="vlmx-image")
            return self._pool

    def _load_one(self, idx: int, source: Any) -> torch.Tensor:
        try:
            return self.load(source)
        except Exception as e:
            raise ValueError(f"image {idx} ({describe_source(source)}) failed to load: {e}") from e
