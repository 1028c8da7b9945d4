"""Which image URLs a server may fetch: `MediaURLPolicy`, consulted by the engine's `MediaLoader`.

The offline `LLM` trusts its caller and has no policy. A server takes URLs from anyone who can
reach it, so `vlmx serve` sets one:

```
data:image/...;base64,...           always allowed (the bytes are in the request)
http(s)://host/...                  allowed_domains empty: host must resolve to public addresses
                                    allowed_domains given: host must be one of them
                                    every redirect hop is checked the same way
file:///path, /path, relative/path  only under allowed_local_path (after resolving symlinks)
anything else                       refused
```

NOTE: the address check resolves the host before the download, which resolves it again; a DNS
server that answers differently the second time (rebinding) is not caught here.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vlmx.multimodal.media import describe_source


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_unspecified
        or ip.is_multicast
    )


@dataclass(frozen=True, slots=True)
class MediaURLPolicy:
    """The image sources a server accepts (see the module docstring).

    allowed_domains: host names (lower case) that may be fetched whatever they resolve to; when
    given, no other host may be fetched. allowed_local_path: a folder whose files may be read.
    """

    allowed_domains: frozenset[str] = frozenset()
    allowed_local_path: str | None = None

    @classmethod
    def create(
        cls, allowed_domains: list[str] | None = None, allowed_local_path: str | None = None
    ) -> MediaURLPolicy:
        if allowed_local_path is not None:
            folder = Path(allowed_local_path).expanduser().resolve()
            if not folder.is_dir():
                raise ValueError(
                    f"allowed_local_media_path {allowed_local_path!r} is not a folder; give an "
                    "existing folder whose images the server may read"
                )
            allowed_local_path = str(folder)
        domains = frozenset(d.strip().lower() for d in allowed_domains or [] if d.strip())
        return cls(domains, allowed_local_path)

    def check(self, url: str) -> None:
        """Raise ValueError if `url` (an image source string) may not be loaded."""
        text = url.strip()
        scheme = urllib.parse.urlsplit(text).scheme.lower() if ":" in text else ""
        if scheme == "data":
            return
        if scheme in ("http", "https"):
            self.check_host(text)
            return
        if scheme == "file" or not scheme or (len(scheme) == 1 and Path(text).is_absolute()):
            self._check_local(text, scheme == "file")
            return
        raise ValueError(
            f"image URL {describe_source(text)} has scheme {scheme!r}; this server takes "
            "http(s) URLs and data:image/...;base64, URLs"
        )

    def check_host(self, url: str) -> None:
        """An http(s) URL's host: listed, or (no list) resolving to public addresses only."""
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        name = describe_source(url)
        if not host:
            raise ValueError(f"image URL {name} has no host")
        if self.allowed_domains:
            if host not in self.allowed_domains:
                raise ValueError(
                    f"image URL {name}: host {host!r} is not in --allowed-media-domains "
                    f"({', '.join(sorted(self.allowed_domains))})"
                )
            return
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise ValueError(f"could not resolve the host of image URL {name}: {e}") from None
        for info in infos:
            address = str(info[4][0])
            if not _is_public(address):
                raise ValueError(
                    f"image URL {name}: host {host!r} resolves to the non-public address "
                    f"{address}; this server fetches public URLs only (start it with "
                    f"--allowed-media-domains {host} to allow this host)"
                )

    def _check_local(self, text: str, is_url: bool) -> None:
        name = describe_source(text)
        if self.allowed_local_path is None:
            raise ValueError(
                f"image {name} is a local file; this server reads local files only under "
                "--allowed-local-media-path (send an http(s) or data URL instead)"
            )
        if is_url:
            parsed = urllib.parse.urlsplit(text)
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(f"file URL {name} names host {parsed.netloc!r}")
            path = Path(urllib.request.url2pathname(parsed.path))
        else:
            path = Path(text)
        resolved = path.resolve()
        if not resolved.is_relative_to(self.allowed_local_path):
            raise ValueError(
                f"image {name} is outside --allowed-local-media-path ({self.allowed_local_path})"
            )

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener that checks every redirect's target with `check_host`."""
        return urllib.request.build_opener(_CheckedRedirects(self))


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: MediaURLPolicy) -> None:
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"image URL redirected to {describe_source(newurl)}, not http(s)")
        try:
            self.policy.check_host(newurl)
        except ValueError as e:
            raise ValueError(f"redirect refused: {e}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)
