"""Where task callbacks may go: an egress policy against SSRF through X-Callback-Url.

A callback is refused when its host resolves to an address that is

- loopback, unspecified, link-local (169.254.169.254 included), multicast, reserved or otherwise
  not globally routable;
- private: RFC 1918 (10/8, 172.16/12, 192.168/16), unique-local fc00::/7, or the shared
  (CGNAT) 100.64.0.0/10;
- on a Docker network of this engine (its IPAM subnets, read every few seconds);

unless `daemon.callback_allow` lets it in:

- a listed host name (exact, case-insensitive) is allowed whatever it resolves to;
- a listed CIDR allows the addresses inside it; but an address on a Docker network of this
  engine is allowed only by a listed CIDR equal to or inside that network's subnet, so a broad
  "172.16.0.0/12" does not open berth's own bridges (and the replicas on them) to callbacks.

IPv4 addresses carried in IPv6 (::ffff:a.b.c.d mapped, 2002::/16 6to4) are judged as IPv4.

The policy is checked when a task is submitted (422) and again at each delivery, inside the HTTP
client's resolver (`PolicyResolver`), so the address checked is the address connected to even if
DNS answers differently by then.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

log = structlog.get_logger("berth.egress")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NetworkSource = Callable[[], Awaitable[Sequence[Network]]]

PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
SHARED = ipaddress.ip_network("100.64.0.0/10")
DOCKER = "an address on a Docker network of this engine"
KINDS: tuple[tuple[str, Callable[[Address], bool]], ...] = (
    ("a loopback address", lambda a: a.is_loopback),
    ("an unspecified address", lambda a: a.is_unspecified),
    ("a link-local address", lambda a: a.is_link_local),
    ("a multicast address", lambda a: a.is_multicast),
    ("a private address", lambda a: any(a in n for n in PRIVATE)),
    ("a shared (CGNAT) address", lambda a: a in SHARED),
    ("a reserved address", lambda a: a.is_reserved or not a.is_global),
)


def unwrap(address: Address) -> Address:
    """The IPv4 address an IPv6 one carries (mapped or 6to4), else the address itself."""
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address.sixtofour or address
    return address


def category(address: Address) -> str | None:
    """What makes `address` unfit for callbacks ("a loopback address", ...); None if public."""
    address = unwrap(address)
    return next((kind for kind, test in KINDS if test(address)), None)


def refusal(address: Address, allow: Sequence[Network],
            docker: Sequence[Network] = ()) -> str | None:
    """Why a callback may not connect to `address` (see the module's rules), None if it may.

    `allow` holds the CIDRs of daemon.callback_allow, `docker` the engine's network subnets.
    """
    address = unwrap(address)
    inside = [n for n in allow if n.version == address.version and address in n]
    for net in docker:
        if net.version == address.version and address in net and not any(
                n.subnet_of(net) for n in inside):  # type: ignore[arg-type]
            return DOCKER
    return None if inside else category(address)


class CallbackRefused(OSError):
    """The policy refuses this host: what it resolves to, or that it does not resolve."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host} {reason}")
        self.host, self.reason = host, reason


class PolicyUnavailable(OSError):
    """The engine's Docker networks cannot be read (and never were): nothing can be checked."""


class CallbackPolicy:
    """daemon.callback_allow and the engine's networks: which hosts callbacks may reach.

    `networks` returns the engine's network subnets (cached `cache_s`; when it fails the last
    answer stands). `resolver` makes the DNS resolver that names are looked up with.
    """

    def __init__(self, allow: Iterable[str], networks: NetworkSource | None = None,
                 cache_s: float = 5.0, resolver: Callable[[], AbstractResolver] = DefaultResolver,
                 resolve_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cidrs: list[Network] = []
        self.hosts: set[str] = set()
        for item in allow:
            try:
                self.cidrs.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(normal_host(item))
        self.networks, self.cache_s, self.clock = networks, cache_s, clock
        self.make_resolver, self.resolve_timeout_s = resolver, resolve_timeout_s
        self._subnets: list[Network] | None = None
        self._read_at = 0.0

    def allows_name(self, host: str) -> bool:
        """True when callback_allow lists this host name (allowed whatever it resolves to)."""
        return normal_host(host) in self.hosts

    async def docker_subnets(self) -> list[Network]:
        """The engine's network subnets, read again when older than cache_s."""
        if self.networks is None:
            return []
        if self._subnets is None or self.clock() - self._read_at >= self.cache_s:
            try:
                self._subnets = list(await self.networks())
                self._read_at = self.clock()
            except Exception as exc:
                log.warning("callback.networks_unknown", error=str(exc),
                            message="cannot list the engine's networks for the policy")
                if self._subnets is None:
                    raise PolicyUnavailable("the engine's networks are unknown") from exc
        return self._subnets

    async def judge(self, host: str,
                    found: list[ResolveResult]) -> tuple[list[ResolveResult], list[str]]:
        """The results callbacks may connect to, and why each of the others is refused."""
        if self.allows_name(host):
            return found, []
        docker, kept, reasons = await self.docker_subnets(), [], []
        for result in found:
            reason = self._refusal(result["host"], docker)
            if reason is None:
                kept.append(result)
            else:
                reasons.append(reason)
        return kept, reasons

    def _refusal(self, text: str, docker: Sequence[Network]) -> str | None:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return "an address that is not an IP address"
        return refusal(address, self.cidrs, docker)

    async def screen(self, host: str, found: list[ResolveResult]) -> list[ResolveResult]:
        """At delivery: the results callbacks may connect to; CallbackRefused if none is left."""
        kept, reasons = await self.judge(host, found)
        if not kept:
            raise CallbackRefused(host, f"resolves to {reasons[0]}" if reasons
                                  else "does not resolve")
        return kept

    async def check(self, host: str) -> None:
        """At submit: CallbackRefused unless `host` resolves, within resolve_timeout_s, to
        addresses that are all allowed; PolicyUnavailable if the networks cannot be read."""
        if self.allows_name(host):
            return
        kept, reasons = await self.judge(host, await self._lookup(host))
        if reasons:
            raise CallbackRefused(host, f"resolves to {reasons[0]}")
        if not kept:
            raise CallbackRefused(host, "does not resolve")

    async def check_literal(self, host: str) -> None:
        """At delivery, before connecting: CallbackRefused if `host` is an IP address the
        policy refuses (aiohttp connects to IP literals without asking the resolver)."""
        if literal(host, 0) is not None:
            await self.check(host)

    async def _lookup(self, host: str) -> list[ResolveResult]:
        found = literal(host, 0)
        if found is not None:
            return [found]
        resolver = self.make_resolver()
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                return await resolver.resolve(host, 0, socket.AF_UNSPEC)
        except (OSError, TimeoutError):
            return []
        finally:
            await resolver.close()

    def resolver(self) -> PolicyResolver:
        """A resolver for aiohttp.TCPConnector that only yields addresses the policy allows."""
        return PolicyResolver(self, self.make_resolver())


def normal_host(host: str) -> str:
    """A host name as compared with callback_allow: lower case, no brackets, no final dot."""
    return host.strip("[]").rstrip(".").lower()


def literal(host: str, port: int) -> ResolveResult | None:
    """The resolver's answer for an IP address written as the host; None for a name."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return ResolveResult(hostname=host, host=str(address), port=port, family=family, proto=0,
                         flags=0)


class PolicyResolver(AbstractResolver):
    """Resolves with `inner` and drops the addresses `policy` refuses; CallbackRefused when no
    address is left. IP literals are judged as they are, without a lookup."""

    def __init__(self, policy: CallbackPolicy, inner: AbstractResolver) -> None:
        self.policy, self.inner = policy, inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = literal(host, port)
        return await self.policy.screen(
            host, [found] if found else await self.inner.resolve(host, port, family))

    async def close(self) -> None:
        await self.inner.close()

