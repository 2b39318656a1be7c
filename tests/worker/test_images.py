"""ImageLoader against real servers: loopback HTTP servers, moto's S3, real files and data: URIs;
the host policy (allowed_hosts, block_private_networks) against loopback servers too."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import ipaddress
import os
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from PIL import Image
from pydantic import ValidationError

from producer.config import ImageSettings, S3Settings
from producer.errors import (
    ImageDecodeError,
    ImageFetchError,
    ImageFetchTimeout,
    ImageFetchUnavailable,
    ImageTooLarge,
    ImageURLForbidden,
)
from tests.conftest import free_port
from worker.images import ImageLoader, LoadedImage, blocked_address, decode_image

MAX_BYTES = 200_000
TIMEOUT_S = 0.5


def _png(size: tuple[int, int] = (64, 48), color: tuple[int, ...] = (200, 30, 40, 128), mode: str = "RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A real PNG header declaring 1.6 billion pixels, with a token pixel stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    release: threading.Event

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", headers.pop("length", str(len(body))))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
        try:
            if path == "/img.png":
                self._send(200, PNG, Content_Type="image/png")
            elif path == "/slow.png":
                time.sleep(float(query["delay"][0]))
                shade = int(query["shade"][0])
                self._send(200, _png(color=(shade, shade, shade), mode="RGB"))
            elif path in ("/404", "/403", "/500", "/503", "/429"):
                self._send(int(path[1:]), b"nope")
            elif path == "/redirect":
                self._send(302, b"", Location="/img.png")
            elif path == "/corrupt":
                self._send(200, b"this is not an image\n" * 20, Content_Type="image/jpeg")
            elif path == "/stall-headers":
                self.release.wait(10)
            elif path == "/stall-body":
                self._send(200, b"", length="1000")
                self.wfile.flush()
                self.release.wait(10)
            elif path == "/drip":
                self._send(200, b"", length="1000")
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    if self.release.wait(0.1):
                        break
            elif path == "/huge-declared":
                self._send(200, b"", length=str(MAX_BYTES * 10))
                self.release.wait(2)
            elif path == "/huge-undeclared":
                self.send_response(200)
                self.end_headers()  # no Content-Length: the body runs until the connection closes
                for _ in range(100):
                    self.wfile.write(b"\0" * 16384)
                self.close_connection = True
            elif path == "/truncated":
                self._send(200, PNG[:50], length=str(len(PNG)))
                self.close_connection = True
            else:
                self._send(404)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def http_server():
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"release": release})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def loader(root: Path):
    settings = ImageSettings(max_bytes=MAX_BYTES, fetch_timeout_s=TIMEOUT_S, allowed_roots=[root])
    with ImageLoader(settings) as image_loader:
        yield image_loader


# -- http(s) ----------------------------------------------------------------------------------------


def test_an_http_image_is_decoded_to_rgb_with_its_sha256(loader: ImageLoader, http_server: str) -> None:
    img = loader.load(f"{http_server}/img.png")
    assert isinstance(img, LoadedImage)
    assert (img.width, img.height) == (64, 48) and img.image.mode == "RGB"
    assert img.image.getpixel((0, 0)) == (200, 30, 40)  # alpha dropped, as convert("RGB") does
    assert img.sha256 == hashlib.sha256(PNG).hexdigest()
    assert img.url == f"{http_server}/img.png"


def test_redirects_are_followed(loader: ImageLoader, http_server: str) -> None:
    assert loader.load(f"{http_server}/redirect").size == (64, 48)


@pytest.mark.parametrize("status", [404, 403])
def test_a_4xx_answer_is_a_permanent_fetch_error(loader: ImageLoader, http_server: str, status: int) -> None:
    with pytest.raises(ImageFetchError) as err:
        loader.load(f"{http_server}/{status}")
    assert err.value.code == "image_fetch_failed" and not err.value.retryable
    assert str(status) in err.value.message


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_5xx_or_429_answer_is_transient(loader: ImageLoader, http_server: str, status: int) -> None:
    with pytest.raises(ImageFetchUnavailable) as err:
        loader.load(f"{http_server}/{status}")
    assert err.value.code == "image_fetch_unavailable" and err.value.retryable


def test_a_refused_connection_is_transient(loader: ImageLoader) -> None:
    with pytest.raises(ImageFetchUnavailable, match="could not fetch .*ConnectError") as err:
        loader.load(f"http://127.0.0.1:{free_port()}/img.png")
    assert err.value.retryable


@pytest.mark.parametrize("block_private_networks", [True, False])  # the guard resolves names itself
def test_a_host_name_dns_says_does_not_exist_fails_at_once_and_one_it_could_not_look_up_is_transient(
    monkeypatch: pytest.MonkeyPatch, block_private_networks: bool
) -> None:
    answers = {"gone.example": socket.EAI_NONAME, "flaky.example": socket.EAI_AGAIN}
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host in answers:
            raise socket.gaierror(answers[host], "scripted answer")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    settings = ImageSettings(block_private_networks=block_private_networks, fetch_timeout_s=TIMEOUT_S)
    with ImageLoader(settings) as loader:
        with pytest.raises(ImageFetchError) as gone:
            loader.load("https://gone.example/photo.jpg")
        with pytest.raises(ImageFetchUnavailable) as flaky:
            loader.load("https://flaky.example/photo.jpg")
    assert gone.value.code == "image_fetch_failed" and not gone.value.retryable
    assert "'gone.example' does not exist" in gone.value.message and "check the URL" in gone.value.message
    assert flaky.value.retryable


@pytest.mark.parametrize("path", ["/stall-headers", "/stall-body", "/drip"])
def test_a_stalled_server_times_out_quickly(loader: ImageLoader, http_server: str, path: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImageFetchTimeout) as err:
        loader.load(http_server + path)
    assert time.monotonic() - start < 3 * TIMEOUT_S + 1.0
    assert err.value.code == "image_fetch_timeout" and err.value.retryable


def test_a_body_cut_off_mid_transfer_is_transient(loader: ImageLoader, http_server: str) -> None:
    with pytest.raises(ImageFetchUnavailable):
        loader.load(f"{http_server}/truncated")


@pytest.mark.parametrize("path", ["/huge-declared", "/huge-undeclared"])
def test_a_body_over_max_bytes_is_refused_while_reading(loader: ImageLoader, http_server: str, path: str) -> None:
    with pytest.raises(ImageTooLarge, match=str(MAX_BYTES)) as err:
        loader.load(http_server + path)
    assert err.value.code == "image_too_large"


def test_bytes_that_are_no_image_are_a_decode_error(loader: ImageLoader, http_server: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        loader.load(f"{http_server}/corrupt")
    assert err.value.code == "image_decode_failed"


def test_http_can_be_disabled(root: Path, http_server: str) -> None:
    with ImageLoader(ImageSettings(allow_http=False)) as loader:
        with pytest.raises(ImageURLForbidden, match="disabled"):
            loader.load(f"{http_server}/img.png")


def test_load_all_fetches_concurrently_and_keeps_order(http_server: str) -> None:
    urls = [f"{http_server}/slow.png?delay={d}&shade={s}" for d, s in [(0.8, 10), (0.0, 20), (0.4, 30)]]
    start = time.monotonic()
    with ImageLoader(ImageSettings(fetch_timeout_s=5)) as loader:
        images = loader.load_all(urls)
    assert time.monotonic() - start < 1.1  # not 1.2 s of sequential waits
    assert [im.image.getpixel((0, 0))[0] for im in images] == [10, 20, 30]
    assert [im.url for im in images] == urls


def test_load_all_names_the_failing_picture(loader: ImageLoader, http_server: str) -> None:
    with pytest.raises(ImageFetchError) as err:
        loader.load_all([f"{http_server}/img.png", f"{http_server}/404"])
    assert err.value.to_dict()["picture"] == 2


def test_a_real_photo_decodes_at_its_size(loader: ImageLoader, sample_images: Path, root: Path) -> None:
    (root / "demo.jpeg").write_bytes((sample_images / "demo.jpeg").read_bytes())
    with ImageLoader(ImageSettings(allowed_roots=[root])) as big:
        img = big.load(f"file://{root}/demo.jpeg")
    with Image.open(sample_images / "demo.jpeg") as ref:
        assert img.size == ref.size
        assert img.image.tobytes() == ref.convert("RGB").tobytes()


# -- file:// ----------------------------------------------------------------------------------------


def test_a_file_under_an_allowed_root_loads(loader: ImageLoader, root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "a b.png").write_bytes(PNG)
    assert loader.load(f"file://{root}/sub/a%20b.png").size == (64, 48)
    assert loader.load(f"file://{root}/sub/a b.png").size == (64, 48)


def test_a_relative_file_url_resolves_against_the_cwd(loader: ImageLoader, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "data").mkdir()
    (root / "data" / "image1.png").write_bytes(PNG)
    monkeypatch.chdir(root)
    assert loader.load("file://./data/image1.png").size == (64, 48)
    monkeypatch.chdir(root.parent)
    with pytest.raises(ImageURLForbidden):
        loader.load("file://./data/image1.png")  # now outside the root


def test_a_file_outside_the_roots_is_forbidden(loader: ImageLoader, root: Path) -> None:
    outside = root.parent / "secret.png"
    outside.write_bytes(PNG)
    for url in (f"file://{outside}", f"file://{root}/../secret.png", "file:///etc/passwd"):
        with pytest.raises(ImageURLForbidden, match="outside") as err:
            loader.load(url)
        assert err.value.code == "image_url_forbidden"


def test_a_symlink_leading_out_of_the_roots_is_forbidden(loader: ImageLoader, root: Path) -> None:
    outside = root.parent / "secret.png"
    outside.write_bytes(PNG)
    os.symlink(outside, root / "link.png")
    with pytest.raises(ImageURLForbidden):
        loader.load(f"file://{root}/link.png")


def test_file_urls_are_refused_without_roots(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    with ImageLoader(ImageSettings()) as loader:
        with pytest.raises(ImageURLForbidden, match="allowed_roots"):
            loader.load(f"file://{tmp_path}/a.png")


def test_a_missing_file_is_a_fetch_error(loader: ImageLoader, root: Path) -> None:
    with pytest.raises(ImageFetchError, match="not found"):
        loader.load(f"file://{root}/missing.png")


def test_a_corrupt_or_truncated_file_is_a_decode_error(loader: ImageLoader, root: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "garbage.jpg").write_bytes(os.urandom(5000))
    for name in ("truncated.jpg", "garbage.jpg"):
        with pytest.raises(ImageDecodeError):
            loader.load(f"file://{root}/{name}")


def test_a_file_over_max_bytes_is_too_large(loader: ImageLoader, root: Path) -> None:
    (root / "big.bin").write_bytes(b"\0" * (MAX_BYTES + 1))
    with pytest.raises(ImageTooLarge):
        loader.load(f"file://{root}/big.bin")


# -- pixels, decoding -------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_from_its_header(loader: ImageLoader) -> None:
    bomb = _bomb_png()
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="pixels") as err:
        loader.load("data:image/png;base64," + base64.b64encode(bomb).decode())
    # past PIL's own limit too, the message says how big it is, what is allowed and what to do
    assert "1,600,000,000 pixels" in err.value.message and "images.max_pixels" in err.value.message
    assert "send a smaller image" in err.value.message and err.value.context["pixels"] == 1_600_000_000


def test_more_pixels_than_max_pixels_is_too_large(root: Path) -> None:
    with ImageLoader(ImageSettings(max_pixels=64 * 47)) as loader:
        with pytest.raises(ImageTooLarge, match="64x48 = 3,072 pixels; at most 3,008 are accepted"):
            loader.load("data:image/png;base64," + base64.b64encode(PNG).decode())


def test_exif_orientation_is_not_applied_like_the_reference_model() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.new("RGB", (80, 20), (1, 2, 3)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (80, 20)


def test_palette_and_grayscale_images_become_rgb() -> None:
    for mode, color in (("P", 3), ("L", 77), ("1", 1)):
        assert decode_image(_png(color=color, mode=mode)).image.mode == "RGB"


# -- data: ------------------------------------------------------------------------------------------


def test_a_data_uri_loads(loader: ImageLoader) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    img = loader.load(uri)
    assert img.size == (64, 48) and img.sha256 == hashlib.sha256(PNG).hexdigest()


@pytest.mark.parametrize(
    "uri",
    ["data:image/png;base64,@@not base64@@", "data:image/png,rawbytes", "data:text/plain;base64,aGVsbG8="],
)
def test_a_bad_data_uri_is_a_decode_error(loader: ImageLoader, uri: str) -> None:
    with pytest.raises(ImageDecodeError):
        loader.load(uri)


def test_a_data_uri_over_max_bytes_is_too_large(loader: ImageLoader) -> None:
    with pytest.raises(ImageTooLarge):
        loader.load("data:image/png;base64," + base64.b64encode(b"\0" * (MAX_BYTES + 10)).decode())


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x", "/etc/passwd", "javascript:alert(1)"])
def test_other_schemes_are_forbidden(loader: ImageLoader, url: str) -> None:
    with pytest.raises(ImageURLForbidden, match="unsupported image URL"):
        loader.load(url)


# -- s3:// ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_bucket(s3_server: str) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="images")
    s3.put_object(Bucket="images", Key="cats/a.png", Body=PNG)
    s3.put_object(Bucket="images", Key="big.bin", Body=b"\0" * (MAX_BYTES + 1))
    return "images"


@pytest.fixture
def s3_loader(s3_server: str, s3_bucket: str):
    settings = ImageSettings(max_bytes=MAX_BYTES, fetch_timeout_s=5)
    with ImageLoader(settings, S3Settings(endpoint_url=s3_server, region="us-east-1")) as loader:
        yield loader


def test_an_s3_object_loads(s3_loader: ImageLoader) -> None:
    img = s3_loader.load("s3://images/cats/a.png")
    assert img.size == (64, 48) and img.sha256 == hashlib.sha256(PNG).hexdigest()


@pytest.mark.parametrize("url, hint", [("s3://images/cats/missing.png", "check the key"),
                                       ("s3://no-such-bucket/a.png", "check the bucket name")])
def test_a_missing_s3_object_is_a_fetch_error_saying_what_to_check(s3_loader: ImageLoader, url: str,
                                                                    hint: str) -> None:
    with pytest.raises(ImageFetchError, match="s3 refused") as err:
        s3_loader.load(url)
    assert hint in err.value.message


def test_no_s3_credentials_fail_at_once_saying_how_to_give_them(s3_server: str, s3_bucket: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the credentials it found before
    with ImageLoader(ImageSettings(fetch_timeout_s=5), S3Settings(endpoint_url=s3_server, region="us-east-1")) as loader:
        with pytest.raises(ImageFetchError) as err:
            loader.load("s3://images/cats/a.png")
    assert not isinstance(err.value, ImageFetchUnavailable)  # not retried: it would fail the same way
    assert err.value.code == "image_fetch_failed" and "AWS_ACCESS_KEY_ID" in err.value.message


def test_an_s3_object_over_max_bytes_is_too_large(s3_loader: ImageLoader) -> None:
    with pytest.raises(ImageTooLarge):
        s3_loader.load("s3://images/big.bin")


def test_an_unreachable_s3_endpoint_is_transient() -> None:
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    with ImageLoader(ImageSettings(fetch_timeout_s=1), settings) as loader:
        with pytest.raises(ImageFetchUnavailable):
            loader.load("s3://images/cats/a.png")


def test_s3_can_be_disabled() -> None:
    with ImageLoader(ImageSettings(allow_s3=False)) as loader:
        with pytest.raises(ImageURLForbidden, match="disabled"):
            loader.load("s3://images/cats/a.png")


# -- host policy: images.allowed_hosts, images.block_private_networks ----------------------------------


class _PolicyHandler(BaseHTTPRequestHandler):
    """/img.png: a PNG; /to?url=U: 302 to U. Every request's path is recorded in ``hits``."""

    hits: list[str]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        parts = urlsplit(self.path)
        if parts.path == "/img.png":
            status, headers, body = 200, {"Content-Type": "image/png"}, PNG
        elif parts.path == "/to":
            status, headers, body = 302, {"Location": parse_qs(parts.query)["url"][0]}, b""
        else:
            status, headers, body = 404, {}, b""
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def policy_server(host: str = "127.0.0.1"):
    """A loopback server on ``host`` (yields its base URL and the list of paths it was asked for)."""
    hits: list[str] = []
    handler = type("Handler", (_PolicyHandler,), {"hits": hits})
    try:
        server = ThreadingHTTPServer((host, 0), handler)
    except OSError as e:
        pytest.skip(f"cannot listen on {host}: {e}")
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def _to(base: str, target: str) -> str:
    return f"{base}/to?url={quote(target, safe='')}"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_host_is_refused_before_any_request_when_private_networks_are_blocked(host: str) -> None:
    with policy_server() as (base, hits), ImageLoader(ImageSettings(block_private_networks=True)) as loader:
        url = base.replace("127.0.0.1", host) + "/img.png"
        with pytest.raises(ImageURLForbidden) as err:
            loader.load(url)
    assert err.value.code == "image_url_forbidden" and not err.value.retryable
    assert "loopback" in err.value.message and "images.block_private_networks to false" in err.value.message
    assert err.value.to_dict()["url"] == url and err.value.to_dict()["address"] == "127.0.0.1"
    assert hits == []


def test_a_loopback_host_is_fetched_when_blocking_is_off() -> None:
    settings = ImageSettings(block_private_networks=False, allowed_hosts=[])
    with policy_server() as (base, hits), ImageLoader(settings) as loader:
        assert loader.load(base.replace("127.0.0.1", "localhost") + "/img.png").size == (64, 48)
    assert hits == ["/img.png"]


def test_the_cloud_metadata_address_is_refused_without_connecting() -> None:
    with ImageLoader(ImageSettings(block_private_networks=True, fetch_timeout_s=TIMEOUT_S)) as loader:
        with pytest.raises(ImageURLForbidden, match="169.254.169.254 is a link-local address"):
            loader.load("http://169.254.169.254/latest/meta-data/iam/security-credentials/")


def test_a_host_with_one_private_address_among_public_ones_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def resolve(host, port, *args, **kwargs):  # what a rebinding name might answer
        assert host == "mixed.example.com"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.216.34", "10.1.2.3")]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with ImageLoader(ImageSettings(block_private_networks=True)) as loader:
        with pytest.raises(ImageURLForbidden, match="resolves to 10.1.2.3, is a private address"):
            loader.load("http://mixed.example.com/img.png")


def test_a_host_outside_allowed_hosts_is_refused_before_any_request() -> None:
    with policy_server() as (base, hits), ImageLoader(ImageSettings(allowed_hosts=["*.example.com"])) as loader:
        with pytest.raises(ImageURLForbidden) as err:
            loader.load(f"{base}/img.png")
    assert "127.0.0.1 is not in images.allowed_hosts (*.example.com)" in err.value.message
    assert "VLQ_IMAGES_ALLOWED_HOSTS" in err.value.message and "redirect" not in err.value.message
    assert hits == []


@pytest.mark.parametrize("globs", [["127.0.0.*"], ["LOCALHOST."], ["*.example.com", "localhost"]])
def test_allowed_hosts_globs_match_names_and_addresses_case_insensitively(globs: list[str]) -> None:
    with policy_server() as (base, _), ImageLoader(ImageSettings(allowed_hosts=globs)) as loader:
        url = base if globs == ["127.0.0.*"] else base.replace("127.0.0.1", "localhost")
        assert loader.load(f"{url}/img.png").size == (64, 48)


def test_a_redirect_from_an_allowed_host_to_one_outside_allowed_hosts_is_refused() -> None:
    with policy_server() as (base, hits), ImageLoader(ImageSettings(allowed_hosts=["127.0.0.1"])) as loader:
        assert loader.load(_to(base, f"{base}/img.png")).size == (64, 48)  # same host: followed
        target = base.replace("127.0.0.1", "localhost") + "/img.png"
        with pytest.raises(ImageURLForbidden) as err:
            loader.load(_to(base, target))
    assert "localhost is not in images.allowed_hosts" in err.value.message
    assert "reached by a redirect" in err.value.message
    assert hits.count("/img.png") == 1  # the refused hop never reached the server


def test_a_redirect_to_a_private_address_is_refused_at_the_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.images

    # Only loopback servers exist here: let 127.0.0.1 stand for a public host and keep the real
    # judgement for every other address, so 127.0.0.2 is the private one the redirect leads to.
    real = worker.images.blocked_address
    monkeypatch.setattr(worker.images, "blocked_address", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    with policy_server("127.0.0.1") as (public, public_hits), policy_server("127.0.0.2") as (private, private_hits):
        with ImageLoader(ImageSettings(block_private_networks=True)) as loader:
            assert loader.load(f"{public}/img.png").size == (64, 48)
            with pytest.raises(ImageURLForbidden) as err:
                loader.load(_to(public, f"{private}/img.png"))
    assert "127.0.0.2 is a loopback address" in err.value.message
    assert "reached by a redirect" in err.value.message
    assert public_hits == ["/img.png", "/to?url=" + quote(f"{private}/img.png", safe="")]
    assert private_hits == []


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.7", "private"), ("192.168.1.1", "private"),
        ("172.16.0.1", "private"), ("fc00::1", "private"), ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "non-public"),
        ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"), ("2002:0a00:0001::1", "private"),
        ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None), ("64:ff9b::808:808", None),
    ],
)
def test_addresses_are_judged_by_where_they_lead(address: str, reason: str | None) -> None:
    assert blocked_address(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("bad", ["https://images.example.com", "images.example.com:443", "example.com/photos"])
def test_allowed_hosts_refuses_urls_and_ports_at_start_up(bad: str) -> None:
    with pytest.raises(ValidationError, match="not a host glob"):
        ImageSettings(allowed_hosts=[bad])


@pytest.mark.parametrize(("data", "says"), [
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "web page (HTML), not the picture"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "convert it to PNG"),
    (b"garbage\n", r"8 bytes starting b'garbage\n', none of JPEG, PNG"),
])
def test_a_decode_error_says_what_arrived_instead_of_an_image(data: bytes, says: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, url="https://example.com/photo.jpg")
    assert says in err.value.message and "BytesIO" not in err.value.message


def test_a_truncated_image_is_reported_as_damaged(root: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, "JPEG", quality=95)
    with pytest.raises(ImageDecodeError, match="truncated or damaged"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2], url="file:///photos/cut.jpg")
