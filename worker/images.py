"""Image intake: a job's image URLs to decoded, validated RGB images.

Accepted URLs:

- ``http://`` / ``https://`` (``images.allow_http``): fetched with httpx, redirects followed.
  ``fetch_timeout_s`` bounds the connection and every read; the whole transfer is also bounded
  by ``3 x fetch_timeout_s``, so a server that stalls or drips bytes cannot hold a worker.
  The body is streamed and refused as soon as it passes ``max_bytes``. The host policy
  (:class:`HostPolicy`) applies to the URL and to every redirect hop: ``images.allowed_hosts``
  (host globs; empty allows any host) and ``images.block_private_networks`` (refuse hosts with
  any loopback, private, link-local, multicast, reserved or otherwise non-public address).
- ``file://`` only under ``images.allowed_roots`` (symlinks and ``..`` resolved before the
  check). ``file:///abs/path`` is absolute; ``file://./x.jpg`` and ``file://x.jpg`` are relative
  to the current directory and checked against the roots all the same.
- ``data:image/...;base64,...``.
- ``s3://bucket/key`` (``images.allow_s3``) through boto3 with the store's endpoint and region.

Decoding follows the official Qwen-VL code: ``PIL.Image.open`` and ``convert("RGB")``, first
frame of an animation, alpha dropped, and *no* EXIF rotation (the reference model sees the
stored pixel grid, so vlq does too). Images above ``max_pixels`` are refused from their header,
before any pixel is decoded.

Errors (all coded, from :mod:`producer.errors`): a 4xx answer, a missing file/object or a host
name that DNS says does not exist is :class:`ImageFetchError`; timeouts and stalls
:class:`ImageFetchTimeout`; 5xx, 429, refused or cut-off connections (and a DNS server that could
not answer) :class:`ImageFetchUnavailable` (both transient: the job is retried);
:class:`ImageTooLarge` for bytes or pixels; :class:`ImageDecodeError` for anything PIL cannot
read; :class:`ImageURLForbidden` for a scheme, path or host that is not allowed. This module
imports no torch.

How private networks are blocked: the HTTP client's connections go through
:class:`_GuardedNetwork`, which resolves the host itself, refuses it when *any* of its addresses
is not public, and then connects to exactly the addresses it checked. So a name that answers a
public address to the check and a private one to the connection (DNS rebinding) gains nothing,
every redirect hop opens its own checked connection, and a kept-alive connection stays with its
checked address. What the guard does not cover: with ``block_private_networks`` on, the
``HTTP(S)_PROXY`` variables are ignored (through a proxy the worker could not see where the
connection goes); ``s3://`` URLs go to the configured S3 endpoint, which is the operator's
choice; and a public address of your own (a NAT hairpin, a public load balancer) is public to the
guard: list the hosts images may come from in ``allowed_hosts`` for a positive rule.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import io
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpcore
import httpx
from PIL import Image, UnidentifiedImageError

from producer.config import ImageSettings, S3Settings
from producer.errors import (
    ConfigError,
    ImageDecodeError,
    ImageFetchError,
    ImageFetchTimeout,
    ImageFetchUnavailable,
    ImageTooLarge,
    ImageURLForbidden,
    VlqError,
)

# Formats PIL may parse: the common photo formats, nothing exotic from untrusted bytes
# (camera MPO files open as JPEG where Pillow has no MPO entry of its own).
Image.init()
IMAGE_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)
_TOTAL_TIMEOUT_FACTOR = 3
_MAX_PARALLEL_FETCHES = 8


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: RGB ``image`` of ``width`` x ``height``, the sha256 of its source bytes."""

    image: Image.Image
    width: int
    height: int
    sha256: str
    url: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


class ImageLoader:
    """Fetches and decodes images by URL within the limits of :class:`ImageSettings`.

    Thread-safe; holds one HTTP connection pool (and one S3 client once needed). Close it with
    :meth:`close` or use it as a context manager.
    """

    def __init__(self, settings: ImageSettings, s3: S3Settings | None = None) -> None:
        self.settings = settings
        self._s3_settings = s3 or S3Settings()
        self._roots = [Path(r).expanduser().resolve() for r in settings.allowed_roots]
        self.policy = HostPolicy.from_settings(settings)
        guarded: dict[str, Any] = {}
        if self.policy.allowed_hosts:  # request hooks run for the first request and every redirect hop
            guarded["event_hooks"] = {"request": [self.policy.check_request]}
        if self.policy.block_private_networks:
            guarded.update(transport=_GuardedTransport(self.policy), trust_env=False)
        self._http = httpx.Client(
            timeout=httpx.Timeout(settings.fetch_timeout_s),
            follow_redirects=True,
            max_redirects=5,
            headers={"User-Agent": "vlq-image-intake/1"},
            **guarded,
        )
        self._s3_client: Any = None

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- public API -----------------------------------------------------------------------------

    def load(self, url: str) -> LoadedImage:
        """Fetch and decode one image; raises a coded :mod:`producer.errors` error."""
        data = self.fetch_bytes(url)
        return decode_image(data, url=url, max_pixels=self.settings.max_pixels)

    def load_all(self, urls: list[str]) -> list[LoadedImage]:
        """Load ``urls`` concurrently, results in the same order.

        The first failure in URL order is raised, its context naming the ``picture`` (1-based).
        """
        if not urls:
            return []
        with ThreadPoolExecutor(max_workers=min(_MAX_PARALLEL_FETCHES, len(urls))) as pool:
            futures = [pool.submit(self.load, url) for url in urls]
            out = []
            for picture, future in enumerate(futures, 1):
                try:
                    out.append(future.result())
                except VlqError as e:
                    for rest in futures:
                        rest.cancel()
                    e.context.setdefault("picture", picture)
                    raise
            return out

    def fetch_bytes(self, url: str) -> bytes:
        """The raw bytes behind ``url`` (at most ``max_bytes``)."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            if not self.settings.allow_http:
                raise ImageURLForbidden(f"http(s) image URLs are disabled on this worker: {_short(url)}", url=_short(url))
            return self._fetch_http(url)
        if scheme == "file":
            return self._read_file(url)
        if scheme == "data":
            return self._decode_data_uri(url)
        if scheme == "s3":
            if not self.settings.allow_s3:
                raise ImageURLForbidden(f"s3 image URLs are disabled on this worker: {_short(url)}", url=_short(url))
            return self._fetch_s3(url)
        raise ImageURLForbidden(
            f"unsupported image URL {_short(url)!r}: use http(s)://, file://, data:image/...;base64, or s3://",
            url=_short(url),
        )

    # -- http(s) ---------------------------------------------------------------------------------

    def _fetch_http(self, url: str) -> bytes:
        limit = self.settings.max_bytes
        timeout = self.settings.fetch_timeout_s
        deadline = time.monotonic() + _TOTAL_TIMEOUT_FACTOR * timeout
        try:
            with self._http.stream("GET", url) as response:
                _check_http_status(response, url)
                length = response.headers.get("content-length")
                if length and length.isdigit() and int(length) > limit:
                    raise _too_many_bytes(url, limit, int(length))
                body = bytearray()
                for chunk in response.iter_bytes():  # as the bytes arrive, so the deadline is checked
                    body += chunk
                    if len(body) > limit:
                        raise _too_many_bytes(url, limit)
                    if time.monotonic() > deadline:
                        raise _timed_out(url, f"the transfer took over {_TOTAL_TIMEOUT_FACTOR * timeout:g}s")
                return bytes(body)
        except ImageURLForbidden as e:  # the host policy refused the URL or a redirect hop
            host = e.context.get("host")
            hop = "" if host is None or host in _hosts_of(url) else " (reached by a redirect)"
            raise ImageURLForbidden(
                f"cannot fetch {_short(url)}: {e.message}{hop}", **{**e.context, "url": _short(url)}
            ) from None
        except httpx.TimeoutException as e:
            raise _timed_out(url, f"no answer within {timeout:g}s ({type(e).__name__})") from e
        except httpx.InvalidURL as e:
            raise ImageURLForbidden(f"invalid image URL {_short(url)!r}: {e}", url=_short(url)) from e
        except httpx.TooManyRedirects as e:
            raise ImageFetchError(f"too many redirects fetching {_short(url)}", url=_short(url)) from e
        except httpx.TransportError as e:  # refused, reset, DNS, cut off mid-body
            host = _unknown_host(e)
            if host is not None:  # asking again will not make the name exist
                raise ImageFetchError(
                    f"cannot fetch {_short(url)}: the host name {host!r} does not exist (DNS has no such"
                    " name): check the URL", url=_short(url), host=host) from e
            raise ImageFetchUnavailable(
                f"could not fetch {_short(url)}: {type(e).__name__}: {e}",
                url=_short(url),
            ) from e

    # -- file:// ---------------------------------------------------------------------------------

    def _read_file(self, url: str) -> bytes:
        if not self._roots:
            raise ImageURLForbidden(
                "file:// image URLs are not allowed on this worker: list the folders that may be "
                "read in images.allowed_roots (VLQ_IMAGES_ALLOWED_ROOTS)",
                url=_short(url),
            )
        path = file_url_path(url)
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in self._roots):
            raise ImageURLForbidden(
                f"{path} is outside the folders images may be read from "
                f"({', '.join(map(str, self._roots))}): add its folder to the workers'"
                " images.allowed_roots (VLQ_IMAGES_ALLOWED_ROOTS), or send the image inline (data: URL,"
                " vlq annotate --inline)",
                url=_short(url),
            )
        try:
            size = resolved.stat().st_size
            if not resolved.is_file():
                raise ImageFetchError(f"{path} is not a file", url=_short(url))
            if size > self.settings.max_bytes:
                raise _too_many_bytes(url, self.settings.max_bytes, size)
            with resolved.open("rb") as f:
                data = f.read(self.settings.max_bytes + 1)
        except FileNotFoundError as e:
            raise ImageFetchError(f"image file {path} not found", url=_short(url)) from e
        except OSError as e:
            raise ImageFetchError(f"cannot read image file {path}: {e.strerror or e}", url=_short(url)) from e
        if len(data) > self.settings.max_bytes:
            raise _too_many_bytes(url, self.settings.max_bytes)
        return data

    # -- data: -----------------------------------------------------------------------------------

    def _decode_data_uri(self, url: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        params = [p.strip().lower() for p in header.split(";")]
        if not sep or "base64" not in params[1:]:
            raise ImageDecodeError("a data: image URL must be data:image/<type>;base64,<data>", url=_short(url))
        if params[0] and not params[0].startswith("image/"):
            raise ImageDecodeError(f"the data: URL holds {params[0]}, not an image", url=_short(url))
        payload = re.sub(r"\s+", "", unquote(payload) if "%" in payload else payload)
        limit = self.settings.max_bytes
        if len(payload) * 3 // 4 > limit + 2:
            raise _too_many_bytes(url, limit, len(payload) * 3 // 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageDecodeError(f"the data: URL is not valid base64: {e}", url=_short(url)) from e
        if len(data) > limit:
            raise _too_many_bytes(url, limit, len(data))
        return data

    # -- s3:// -----------------------------------------------------------------------------------

    def _s3(self) -> Any:
        if self._s3_client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as e:
                raise ConfigError("s3:// image URLs need boto3: pip install 'vlq[s3]'") from e
            t = self.settings.fetch_timeout_s
            self._s3_client = boto3.client(
                "s3",
                endpoint_url=self._s3_settings.endpoint_url,
                region_name=self._s3_settings.region,
                config=Config(connect_timeout=t, read_timeout=t, retries={"max_attempts": 2}),
            )
        return self._s3_client

    def _fetch_s3(self, url: str) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        parts = urlsplit(url)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if not bucket or not key:
            raise ImageURLForbidden(f"an s3 image URL is s3://bucket/key, not {_short(url)!r}", url=_short(url))
        limit = self.settings.max_bytes
        try:
            obj = self._s3().get_object(Bucket=bucket, Key=key)
            if obj.get("ContentLength", 0) > limit:
                obj["Body"].close()
                raise _too_many_bytes(url, limit, obj["ContentLength"])
            data = obj["Body"].read(limit + 1)
            obj["Body"].close()
        except ClientError as e:
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.get("Code", status)
            message = f"s3 refused {url}: {code} {err.get('Message', '')}".strip()
            if status >= 500 or status == 429 or code in ("SlowDown", "ServiceUnavailable"):
                raise ImageFetchUnavailable(message, url=url) from e
            hint = _S3_HINTS.get(str(code)) or _S3_HINTS.get(str(status))
            raise ImageFetchError(f"{message}: {hint}" if hint else message, url=url, s3_code=str(code)) from e
        except (NoCredentialsError, PartialCredentialsError) as e:  # the same on every retry: not transient
            raise ImageFetchError(
                f"the workers have no S3 credentials to read {url} ({e}): give them AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or an AWS profile or instance role), or send the image inline as a "
                "data: URL", url=url) from e
        except (ConnectTimeoutError, ReadTimeoutError) as e:
            raise _timed_out(url, str(e)) from e
        except BotoCoreError as e:  # endpoint unreachable, connection closed
            raise ImageFetchUnavailable(f"could not fetch {url}: {e}", url=url) from e
        if len(data) > limit:
            raise _too_many_bytes(url, limit)
        return data


# What to check when S3 refuses an image for good, by its error code (or HTTP status).
_S3_HINTS = {
    "NoSuchKey": "check the key (S3 keys are case-sensitive)",
    "NoSuchBucket": "check the bucket name, and that store.s3.endpoint_url points at the S3 that holds it",
    "AccessDenied": "check that the workers' credentials may read it (s3:GetObject)",
    "InvalidAccessKeyId": "check the workers' AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "check the workers' AWS_SECRET_ACCESS_KEY",
    "403": "check that the workers' credentials may read it (s3:GetObject)",
    "404": "check the bucket and key",
}


# -- host policy (http(s) only) ------------------------------------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def blocked_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a fetch must not connect to ``ip`` with private networks blocked (None: it is public).

    IPv4 addresses carried inside IPv6 ones (``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
    ``2002::/16``) are judged by the IPv4 address they reach.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return blocked_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return blocked_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and blocked_address(ip.sixtofour):
            return blocked_address(ip.sixtofour)
    for reason, hit in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-public", not ip.is_global),  # e.g. 100.64.0.0/10 (carrier-grade NAT)
    ):
        if hit:
            return reason
    return None


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts http(s) images may come from: ``images.allowed_hosts`` and ``block_private_networks``."""

    allowed_hosts: tuple[str, ...] = ()
    block_private_networks: bool = False

    @classmethod
    def from_settings(cls, settings: ImageSettings) -> HostPolicy:
        globs = tuple(_normal_host(h) for h in settings.allowed_hosts if h.strip())
        return cls(globs, settings.block_private_networks)

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a name or IP literal) matches ``allowed_hosts`` (always, when empty)."""
        if not self.allowed_hosts:
            return True
        host = _normal_host(host)
        return any(fnmatch.fnmatchcase(host, glob) for glob in self.allowed_hosts)

    def check_request(self, request: httpx.Request) -> None:
        """httpx request hook: refuse a URL (or redirect hop) whose host is not allowed."""
        url = request.url
        if self.host_allowed(url.host) or self.host_allowed(url.raw_host.decode("ascii", "replace")):
            return
        raise ImageURLForbidden(
            f"the image host {url.host} is not in images.allowed_hosts ({', '.join(self.allowed_hosts)}):"
            " add it (or a glob such as *.example.com) to images.allowed_hosts"
            " (VLQ_IMAGES_ALLOWED_HOSTS), or send the image as a data: URI",
            host=url.host,
        )

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``, each checked; refuses the host if any is blocked.

        A name that does not resolve raises :class:`httpcore.ConnectError` (a transient fetch error,
        as without the policy).
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from e
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            reason = blocked_address(ipaddress.ip_address(address.split("%", 1)[0]))
            if reason is not None:
                shown = host if host == address else f"{host!r}, which resolves to {address},"
                raise ImageURLForbidden(
                    f"the image host {shown} is a {reason} address and images.block_private_networks"
                    " refuses those: serve the image from a public address, or set"
                    " images.block_private_networks to false (VLQ_IMAGES_BLOCK_PRIVATE_NETWORKS=false)"
                    " on workers that may read internal hosts",
                    host=host, address=address,
                )
        return addresses


class _GuardedNetwork(httpcore.NetworkBackend):
    """Opens TCP connections only to the addresses :meth:`HostPolicy.resolve` checked."""

    def __init__(self, policy: HostPolicy) -> None:
        self._policy = policy
        self._socket = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        error: Exception | None = None
        for address in self._policy.resolve(host, port):
            try:  # TLS still verifies the certificate against the host name, not the address
                return self._socket.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as e:  # unreachable address: try the next one, like create_connection
                error = e
        raise error or httpcore.ConnectError(f"no address for {host}")

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not image hosts")

    def sleep(self, seconds: float) -> None:
        self._socket.sleep(seconds)


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport (request/response mapping, error types) over :class:`_GuardedNetwork`."""

    def __init__(self, policy: HostPolicy) -> None:
        super().__init__(trust_env=False)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise ConfigError(
                "images.block_private_networks needs httpx's HTTPTransport over an httpcore connection"
                f" pool; httpx {httpx.__version__} differs: install httpx 0.28"
            )
        limits = httpx.Limits()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedNetwork(policy),
        )


def _normal_host(host: str) -> str:
    """Lower case, without a trailing dot or IPv6 brackets."""
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def _hosts_of(url: str) -> set[str]:
    """The host of ``url`` as written and as sent (IDNA), for messages."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return set()
    return {parsed.host, parsed.raw_host.decode("ascii", "replace")}


def file_url_path(url: str) -> Path:
    """The path of a ``file://`` URL (percent-decoded; relative forms against the cwd, unresolved)."""
    rest = url[len("file://"):] if url.lower().startswith("file://") else url[len("file:"):]
    if rest.lower().startswith("localhost/"):
        rest = rest[len("localhost"):]
    path = Path(unquote(rest))
    return path if path.is_absolute() else Path(os.getcwd()) / path


def decode_image(data: bytes, *, url: str = "", max_pixels: int = ImageSettings().max_pixels) -> LoadedImage:
    """Decode image bytes like the official code (PIL, RGB, no EXIF rotation), within ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(url, f"{width}x{height} = {width * height:,}", width * height, max_pixels)
        image.load()
        rgb = image.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL refuses past twice its own limit, before the size check
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else None
        raise _too_large(url, f"{pixels:,}" if pixels else "too many", pixels, max_pixels) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"the data at {_short(url)} is not an image: {_not_an_image(data)}",
                               url=_short(url)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(
            f"the image at {_short(url)} could not be decoded ({e}): it may be truncated or damaged; "
            "check that it opens in an image viewer", url=_short(url)
        ) from e
    return LoadedImage(rgb, width, height, hashlib.sha256(data).hexdigest(), url)


def _too_large(url: str, size: str, pixels: int | None, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"the image at {_short(url)} is {size} pixels; at most {max_pixels:,} are accepted "
        "(images.max_pixels): send a smaller image (the model sees every image at 448x448)",
        url=_short(url), pixels=pixels, max_pixels=max_pixels)


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _unknown_host(error: BaseException) -> str | None:
    """The host of a fetch that failed because DNS says its name does not exist (not for a
    resolver that could not answer, ``EAI_AGAIN``, which may pass), else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, socket.gaierror) and seen.errno in _NO_SUCH_NAME:
            try:
                return error.request.url.host  # the hop that failed: a redirect may lead elsewhere
            except (AttributeError, RuntimeError):  # an error raised without its request
                return "?"
        seen = seen.__cause__ or seen.__context__
    return None


def _check_http_status(response: httpx.Response, url: str) -> None:
    status = response.status_code
    if status < 400:
        return
    where = _short(url)
    if status == 408:
        raise _timed_out(url, "the server answered 408 Request Timeout")
    if status == 429 or status >= 500:
        raise ImageFetchUnavailable(
            f"the image server answered {status} for {where}", url=where, status=status
        )
    raise ImageFetchError(
        f"the image server answered {status} for {where}: check the URL and its access rights",
        url=where, status=status,
    )


def _not_an_image(data: bytes) -> str:
    """What the bytes look like instead, and what to do about it."""
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "it is a web page (HTML), not the picture: use the image's own URL"
    if head.startswith((b"<svg", b"<?xml")):
        return "it is an SVG or XML document, not a raster picture: convert it to PNG"
    readable = ", ".join(f for f in IMAGE_FORMATS if f != "MPO")
    return f"{len(data)} bytes starting {data[:12]!r}, none of {readable}: convert it to one of these"


def _too_many_bytes(url: str, limit: int, size: int | None = None) -> ImageTooLarge:
    got = f"{size} bytes" if size is not None else f"over {limit} bytes"
    return ImageTooLarge(
        f"the image at {_short(url)} is {got}; at most {limit} are accepted (images.max_bytes): send it"
        " smaller (the model sees every image at 448x448, so a re-encoded JPEG of about 1000 pixels a side"
        " loses nothing), or raise images.max_bytes on the workers",
        url=_short(url), max_bytes=limit,
    )


def _timed_out(url: str, why: str) -> ImageFetchTimeout:
    return ImageFetchTimeout(f"fetching {_short(url)} timed out: {why}", url=_short(url))


def _short(url: str, limit: int = 200) -> str:
    """A URL for messages: data: URIs and long URLs are cut."""
    return url if len(url) <= limit else url[: limit - 3] + "..."
