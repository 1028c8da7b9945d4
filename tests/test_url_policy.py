"""`MediaURLPolicy`: the image sources a server accepts, through `fetch_image` and `MediaLoader`
(the offline default, no policy, keeps trusting its caller)."""

from __future__ import annotations

import base64
import contextlib
import io
from http.server import BaseHTTPRequestHandler

import pytest

from tests.loopback import serve
from vlmx.demo.images import structured_image
from vlmx.multimodal.loader import MediaLoader
from vlmx.multimodal.media import fetch_image
from vlmx.multimodal.url_policy import MediaURLPolicy


def _png() -> bytes:
    buf = io.BytesIO()
    structured_image(40, 30, 2).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Hops(BaseHTTPRequestHandler):
    """/img.png: an image; /hop?URL: a redirect to URL."""

    def do_GET(self) -> None:
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(PNG)
            return
        if self.path.startswith("/hop?"):
            self.send_response(302)
            self.send_header("Location", self.path.split("?", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def host():
    with serve(_Hops) as base:
        yield base


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://localhost/a.png",
        "http://10.1.2.3/a.png",
        "http://192.168.0.7/a.png",
        "http://172.16.0.1/a.png",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata: link-local
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://0.0.0.0/a.png",
    ],
)
def test_non_public_hosts_are_refused(url):
    with pytest.raises(ValueError, match="non-public address"):
        MediaURLPolicy.create().check(url)


def test_public_hosts_and_data_urls_pass():
    policy = MediaURLPolicy.create()
    policy.check("http://8.8.8.8/a.png")  # NOTE: an address literal resolves without a network
    policy.check("https://[2606:4700:4700::1111]/a.png")
    policy.check("data:image/png;base64," + base64.b64encode(PNG).decode())


def test_listed_domains_are_the_only_hosts(host):
    policy = MediaURLPolicy.create(["127.0.0.1"])
    image = fetch_image(f"{host}/img.png", policy=policy)
    assert image.size == (40, 30)
    with pytest.raises(ValueError, match="not in --allowed-media-domains"):
        policy.check("http://8.8.8.8/a.png")
    with pytest.raises(ValueError, match="non-public"):
        fetch_image(f"{host}/img.png", policy=MediaURLPolicy.create())


def test_each_redirect_hop_is_checked(host):
    port = host.rsplit(":", 1)[1]
    policy = MediaURLPolicy.create(["127.0.0.1"])
    same = f"{host}/hop?{host}/img.png"
    assert fetch_image(same, policy=policy).size == (40, 30)  # a hop to a listed host is fine
    for target in (f"http://localhost:{port}/img.png", f"{host}/hop?http://localhost:{port}/x"):
        with pytest.raises(ValueError, match="redirect refused"):
            fetch_image(f"{host}/hop?{target}", policy=policy)
    with pytest.raises(ValueError, match="not allowed|not http"):  # urllib refuses it first
        fetch_image(f"{host}/hop?file:///etc/hostname", policy=policy)
    # without a policy (the offline LLM) the same redirect is followed
    assert fetch_image(f"{host}/hop?http://localhost:{port}/img.png").size == (40, 30)


def test_local_files_only_under_the_allowed_folder(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.png").write_bytes(PNG)
    (outside / "b.png").write_bytes(PNG)
    (inside / "link.png").symlink_to(outside / "b.png")
    policy = MediaURLPolicy.create(allowed_local_path=str(inside))
    assert fetch_image((inside / "a.png").as_uri(), policy=policy).size == (40, 30)
    assert fetch_image(str(inside / "a.png"), policy=policy).size == (40, 30)
    for source in (
        (outside / "b.png").as_uri(),
        str(outside / "b.png"),
        f"{inside}/../out/b.png",
        str(inside / "link.png"),  # a symlink out of the folder
    ):
        with pytest.raises(ValueError, match="outside --allowed-local-media-path"):
            fetch_image(source, policy=policy)
    with pytest.raises(ValueError, match="only under --allowed-local-media-path"):
        fetch_image(str(inside / "a.png"), policy=MediaURLPolicy.create())
    with pytest.raises(ValueError, match="not a folder"):
        MediaURLPolicy.create(allowed_local_path=str(inside / "a.png"))


def test_other_schemes_are_refused():
    with pytest.raises(ValueError, match="scheme 'ftp'"):
        MediaURLPolicy.create().check("ftp://example.com/a.png")


def test_the_loader_consults_its_policy(host, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    trusting = MediaLoader()
    assert trusting.load(f"{host}/img.png").shape == (3, 30, 40)
    assert trusting.load(str(tmp_path / "a.png")).shape == (3, 30, 40)
    strict = MediaLoader(url_policy=MediaURLPolicy.create())
    assert strict.load(data_url).shape == (3, 30, 40)
    with pytest.raises(ValueError, match="image 0 .* non-public"):
        strict.load_all([f"{host}/img.png"])
    with pytest.raises(ValueError, match="allowed-local-media-path"):
        strict.load(str(tmp_path / "a.png"))
