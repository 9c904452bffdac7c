"""Images from URLs: `data:` URLs decoded in place, http(s) URLs fetched under guard.

The fetch resolves the host itself and connects only to an address it checked (a public one: never private,
loopback, link-local, multicast or reserved), so a name that resolves differently on the second lookup cannot
slip through; every redirect is checked the same way. The body is read up to a size limit and the whole fetch
runs under one deadline. Each refusal is a ValueError whose words name the problem.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import time
from typing import Collection
from urllib.parse import urljoin, urlsplit

from PIL import Image

from ownllm.multimodal.image_io import MAX_IMAGE_BYTES, decode_image

FETCH_TIMEOUT_SECONDS = 10.0
MAX_REDIRECTS = 5


def decode_data_url(url: str, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """data:image/...;base64,... -> a PIL image."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError("an image data URL must look like data:image/png;base64,...")
    return decode_image(decode_base64(payload), max_bytes)


def decode_base64(payload: str) -> bytes:
    """Base64 text -> bytes (the request body's limit bounds its size; decode_image checks the image's)."""
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image is not valid base64") from None


def load_image_url(url: str, allowed_domains: Collection[str] | None, max_bytes: int = MAX_IMAGE_BYTES,
                   timeout: float = FETCH_TIMEOUT_SECONDS) -> Image.Image:
    """A data: URL, or an http(s) URL on one of allowed_domains (None: any domain) -> a PIL image."""
    if url.startswith("data:"):
        return decode_data_url(url, max_bytes)
    return decode_image(fetch(url, allowed_domains, max_bytes, timeout), max_bytes)


def public_address(host: str, port: int) -> str:
    """The first address `host` resolves to, refusing names that resolve to any non-public address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ValueError(f"the image URL's host {host!r} does not resolve") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ValueError(f"the image URL's host {host!r} resolves to a private address ({ip})")
    return addresses[0]


def fetch(url: str, allowed_domains: Collection[str] | None, max_bytes: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an image URL must be a data: URL or an http(s) URL, got {url[:64]!r}")
        host = parts.hostname.lower()
        if allowed_domains is not None and host not in allowed_domains:
            if not allowed_domains:
                raise ValueError("image URLs are not allowed on this server: send the image as a data: URL, or start "
                                 "the server with --allowed-media-domains")
            raise ValueError(f"the image URL's domain {host!r} is not in --allowed-media-domains")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        connection = _PinnedConnection(parts.scheme, host, port, public_address(host, port),
                                       max(deadline - time.monotonic(), 0.001))
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"Host": parts.netloc, "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ValueError(f"fetching the image at {url} failed: HTTP {response.status}")
            return _read_limited(response, max_bytes, deadline, url)
        except (TimeoutError, socket.timeout):
            raise ValueError(f"fetching the image at {url} took longer than {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise ValueError(f"fetching the image at {url} failed: {error}") from None
        finally:
            connection.close()
    raise ValueError(f"fetching the image at {url} was redirected more than {MAX_REDIRECTS} times")


def _read_limited(response: http.client.HTTPResponse, max_bytes: int, deadline: float, url: str) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ValueError(f"the image is {int(length)} bytes, over the limit of {max_bytes} bytes")
    chunks, total = [], 0
    while chunk := response.read(65536):
        total += len(chunk)
        if total > max_bytes:
            raise ValueError(f"the image is over the limit of {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError
        chunks.append(chunk)
    return b"".join(chunks)


class _PinnedConnection(http.client.HTTPSConnection):
    """An HTTP(S) connection to a checked address, speaking to (and for TLS, verifying) the URL's host name."""

    def __init__(self, scheme: str, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.is_tls, self.address = scheme == "https", address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host) if self.is_tls else sock
