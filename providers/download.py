"""Fetching a provider's result file: bounded in size and time, and only from where it may.

A result URL is provider output, so it is untrusted: a provider (or whoever controls its
answer) could point it at the bot's own network, e.g. 127.0.0.1 or the cloud metadata
address 169.254.169.254 (blind SSRF). A download therefore goes only to

- the provider's own configured origins (`trusted`: its API base URL, or the operator's
  ACE-Step servers, which may well be on a LAN: the operator chose them), with the
  provider's client as it is; or
- an http(s) URL whose host resolves to public addresses only (`AddressPolicy`). The name
  is resolved once and the connection made to the address that was checked (the Host
  header and TLS name stay the original host), so a DNS answer that changes between the
  check and the connection (rebinding) cannot switch it to a private one.

Redirects are followed by hand, at most MAX_REDIRECTS, each hop checked the same way.
The whole download, redirects included, has one deadline (the job's, and at most
MAX_DOWNLOAD_S), on top of the client's per-read timeout, so a server that drips a byte
every few seconds cannot hold a job past it. Cancelling the awaiting task stops it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import httpx

from providers.base import (
    ProviderFailedDownload,
    Unavailable,
    origin,
)

# A finished song is at most 240 s of 48 kHz stereo WAV (~46 MB); allow some slack.
MAX_AUDIO_BYTES = 80 * 1024 * 1024
READ_TIMEOUT_S = 120.0  # between two reads of the body
MAX_DOWNLOAD_S = 600.0  # the whole download, whatever time the job has left
MAX_REDIRECTS = 5
CHUNK_BYTES = 256 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses to try, in order
Resolver = Callable[[str, int], Awaitable[list[str]]]


class DownloadTimedOut(ProviderFailedDownload):
    """The download did not finish before its deadline."""


class DownloadRefused(ProviderFailedDownload):
    """The result URL points somewhere the bot does not download from."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, in its order of preference."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a download outside the provider's own origins may connect to:
    public (globally routable, unicast) ones, plus any `allowed` networks. Tests that
    serve a "CDN" from another loopback origin allow 127.0.0.0/8 explicitly; production
    allows nothing extra."""

    allowed: tuple[IPNetwork, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def allowing(cls, *networks: str, resolver: Resolver = system_resolver) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(n) for n in networks), resolver)

    def permits(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if any(address in network for network in self.allowed):
            return True
        return address.is_global and not address.is_multicast


PUBLIC_ONLY = AddressPolicy()


@dataclass(frozen=True)
class _Hop:
    """One request to make: where to connect and what to send."""

    url: httpx.URL  # the URL as requested (its host may be the pinned address)
    headers: dict[str, str]
    extensions: dict[str, Any]
    trusted: bool = False  # the provider's own origin: its client's auth applies


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def _hops(
    provider: str, url: httpx.URL, trusted: set[tuple[str, str, int]], policy: AddressPolicy
) -> list[_Hop]:
    """The requests that may fetch `url`: as it is on a trusted origin; else one per
    permitted address of its host (tried in order). Raises DownloadRefused."""
    if url.scheme not in ("http", "https") or not url.host:
        raise DownloadRefused(provider, f"result URL is not http(s): {url.scheme or '?'}")
    if origin(url) in trusted:
        return [_Hop(url, {}, {}, trusted=True)]
    port = url.port or (443 if url.scheme == "https" else 80)
    literal = _literal_address(url.host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            found = await policy.resolver(url.host, port)
        except OSError as exc:
            raise ProviderFailedDownload(
                provider, f"result host {url.host} cannot be resolved ({exc})"
            ) from None
        addresses = [a for a in (_literal_address(x) for x in found) if a is not None]
        if not addresses:
            raise ProviderFailedDownload(provider, f"result host {url.host} has no address")
    refused = [str(a) for a in addresses if not policy.permits(a)]
    if refused:
        # One private answer is enough to refuse: a public host has no business there.
        raise DownloadRefused(
            provider,
            f"result URL host {url.host} is a private or local address ({refused[0]}); "
            "the bot downloads only from the provider or from public addresses",
        )
    if literal is not None:
        return [_Hop(url, {}, {})]
    host_header = url.netloc.decode("ascii").rpartition("@")[2]
    return [
        _Hop(
            url.copy_with(host=str(address)),
            # The checked address is what we connect to; the server still sees its name,
            # and TLS still verifies the certificate against that name. No keep-alive: a
            # pooled connection to this address must not serve another host's request.
            {"Host": host_header, "Connection": "close"},
            {"sni_hostname": url.host} if url.scheme == "https" else {},
        )
        for address in addresses
    ]


async def download(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    out: IO[bytes],
    *,
    trusted: Iterable[tuple[str, str, int]] = (),
    deadline: float | None = None,
    policy: AddressPolicy = PUBLIC_ONLY,
    max_bytes: int = MAX_AUDIO_BYTES,
) -> int:
    """GET a result file into `out`; returns the bytes written.

    `deadline` is a `time.time()` instant (the job's); the download ends by then and
    within MAX_DOWNLOAD_S. Raises DownloadTimedOut, DownloadRefused, ProviderFailedDownload
    (gone, too large) or Unavailable (a server error or network failure: worth a retry).
    OSError from `out` (a full disk) passes through unchanged.
    """
    budget = MAX_DOWNLOAD_S if deadline is None else min(MAX_DOWNLOAD_S, deadline - time.time())
    if budget <= 0:
        raise DownloadTimedOut(provider, "no time was left to download the result")
    try:
        async with asyncio.timeout(budget):
            return await _follow(
                client, provider, httpx.URL(url), out, set(trusted), policy, max_bytes
            )
    except TimeoutError:
        raise DownloadTimedOut(
            provider, f"the result download did not finish within {budget:.0f} s"
        ) from None


async def _follow(
    client: httpx.AsyncClient,
    provider: str,
    url: httpx.URL,
    out: IO[bytes],
    trusted: set[tuple[str, str, int]],
    policy: AddressPolicy,
    max_bytes: int,
) -> int:
    for _ in range(MAX_REDIRECTS + 1):
        hops = await _hops(provider, url, trusted, policy)
        for number, hop in enumerate(hops):
            try:
                async with client.stream(
                    "GET",
                    hop.url,
                    headers=hop.headers,
                    extensions=hop.extensions,
                    timeout=READ_TIMEOUT_S,
                    follow_redirects=False,
                    # No credentials beyond the provider's own origins, even when a pinned
                    # address happens to equal one of them.
                    **({} if hop.trusted else {"auth": None}),
                ) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location", "")
                        url = url.join(location)
                        break
                    return await _save(provider, resp, out, max_bytes)
            except httpx.ConnectError:
                if number == len(hops) - 1:
                    raise Unavailable(provider, "result download failed: ConnectError") from None
            except httpx.TimeoutException:
                raise Unavailable(provider, "result download timed out") from None
            except httpx.TransportError as exc:
                raise Unavailable(
                    provider, f"result download failed: {type(exc).__name__}"
                ) from None
    raise ProviderFailedDownload(provider, f"result URL redirects more than {MAX_REDIRECTS} times")


async def _save(provider: str, resp: httpx.Response, out: IO[bytes], max_bytes: int) -> int:
    if resp.status_code in (403, 404, 410):
        raise ProviderFailedDownload(
            provider, f"result file is gone ({resp.status_code})", status_code=resp.status_code
        )
    if resp.status_code >= 400:
        raise Unavailable(
            provider, f"result download failed ({resp.status_code})", status_code=resp.status_code
        )
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ProviderFailedDownload(provider, f"result file too large ({declared} bytes)")
    total = 0
    async for chunk in resp.aiter_bytes(CHUNK_BYTES):
        total += len(chunk)
        if total > max_bytes:
            raise ProviderFailedDownload(provider, "result file too large")
        # A thread hop per chunk: a slow or full disk must not stall the event loop.
        await asyncio.to_thread(out.write, chunk)
    return total
