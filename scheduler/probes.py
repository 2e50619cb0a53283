"""HTTP probes of replicas: readiness (2xx = ready) and liveness, and the sleep tier's calls."""

from __future__ import annotations

import aiohttp


class Prober:
    """GETs a path on a replica; one pooled client session for all probes."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No keep-alive: a probe must see a fresh accept, as a new call would.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0))
        return self._session

    async def check(self, address: str, path: str, timeout_s: float) -> bool:
        """True if GET http://address/path answers 2xx within timeout_s."""
        try:
            async with self._client().get(
                    f"http://{address}{path}",
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def call(self, method: str, address: str, path: str, timeout_s: float) -> int:
        """The status of METHOD http://address/path (an empty body); OSError or TimeoutError
        when the replica does not answer in time."""
        try:
            async with self._client().request(
                    method, f"http://{address}{path}", data=b"",
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError as exc:
            raise OSError(str(exc)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
