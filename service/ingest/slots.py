"""Bounds on concurrent uploads: per tenant (429 `quota_exceeded`) and per gateway process (503 `busy`).

An upload holds a staging file, a socket and, until it is checked, a probe process: one tenant opening many
(or stalling them) must not use up what every other tenant needs. Slots are taken before the body is read and
given back when the request ends. All bookkeeping happens on the event loop, so plain counters suffice."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.errors import QuotaExceededError, ServiceBusyError

RETRY_AFTER_S = 5


class UploadSlots:
    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant, self.total = per_tenant, total
        self._by_tenant: Counter[str] = Counter()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    @asynccontextmanager
    async def hold(self, tenant_id: str) -> AsyncIterator[None]:
        if self._by_tenant[tenant_id] >= self.per_tenant:
            err = QuotaExceededError(
                f"this tenant already has {self.per_tenant} uploads in progress (the limit); retry when one ends"
            )
            err.retry_after = RETRY_AFTER_S
            raise err
        if self._in_use >= self.total:
            err = ServiceBusyError(f"the service is receiving {self.total} uploads already; retry shortly")
            err.retry_after = RETRY_AFTER_S
            raise err
        self._by_tenant[tenant_id] += 1
        self._in_use += 1
        try:
            yield
        finally:
            self._in_use -= 1
            self._by_tenant[tenant_id] -= 1
            if self._by_tenant[tenant_id] <= 0:
                del self._by_tenant[tenant_id]
