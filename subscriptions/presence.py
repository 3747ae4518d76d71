"""Who is viewing or editing a record: an in-process registry, or Redis hashes shared by every process.

A *session* is one live ``presence`` subscription (a browser tab): ``join`` adds it, ``leave``
removes it, and every change publishes ``PresenceChanged`` on the record's presence channel so
that subscribers re-read ``members``. A user's state (VIEWING or EDITING) is per user and record,
whatever the number of their sessions, and disappears with their last session.

Redis layout, one hash per record (key ``<prefix>t:<tenant>:presence:<record>``)::

    s:<session>  ->  "<user uuid> <expires epoch> <since epoch>"
    u:<user>     ->  "VIEWING" | "EDITING"

Each process refreshes the expiry of its own sessions every ``ttl / 3`` seconds (one heartbeat
task per process), so the sessions of a process that crashed expire after ``ttl``: the next reader
(every process's heartbeat reads the records it has sessions on) prunes them and publishes the
change. The whole key also carries a Redis EXPIRE of ``3 * ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.clock import SYSTEM_CLOCK, Clock
from subscriptions.events import Event, PresenceChanged, presence_channel

log = logging.getLogger("atrium.presence")

Publish = Callable[[Event], Awaitable[None]]


class PresenceState(enum.StrEnum):
    VIEWING = "VIEWING"
    EDITING = "EDITING"


@dataclass(frozen=True)
class PresenceEntry:
    """One user on one record: their state and since when (epoch seconds) they have been there."""

    user_id: uuid.UUID
    state: PresenceState
    since: float


class Presence(Protocol):
    async def join(self, tenant_id: uuid.UUID, record_id: uuid.UUID, user_id: uuid.UUID) -> str:
        """Add a session of ``user_id`` on the record (VIEWING unless the user is already EDITING)."""
        ...

    async def leave(self, tenant_id: uuid.UUID, record_id: uuid.UUID, session: str) -> None:
        """Remove a session (idempotent)."""
        ...

    async def set_state(self, tenant_id: uuid.UUID, record_id: uuid.UUID, user_id: uuid.UUID,
                        state: PresenceState) -> bool:
        """Set the user's state on the record; False when the user has no live session there."""
        ...

    async def members(self, tenant_id: uuid.UUID, record_id: uuid.UUID) -> list[PresenceEntry]:
        """The users with a live session on the record, longest present first."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def entries(sessions: Iterable[tuple[uuid.UUID, float]], states: Mapping[uuid.UUID, str]) -> list[PresenceEntry]:
    """One entry per user: the earliest ``since`` of their sessions and their state."""
    since: dict[uuid.UUID, float] = {}
    for user, started in sessions:
        since[user] = min(started, since.get(user, started))
    out = [PresenceEntry(user, PresenceState(states.get(user, PresenceState.VIEWING)), started)
           for user, started in since.items()]
    return sorted(out, key=lambda e: (e.since, str(e.user_id)))


class MemoryPresence:
    """Presence for a single process (used with ``MemoryBroker``)."""

    def __init__(self, publish: Publish, clock: Clock = SYSTEM_CLOCK) -> None:
        self._publish = publish
        self._clock = clock
        self._sessions: dict[tuple[uuid.UUID, uuid.UUID], dict[str, tuple[uuid.UUID, float]]] = {}
        self._states: dict[tuple[uuid.UUID, uuid.UUID], dict[uuid.UUID, str]] = {}

    async def join(self, tenant_id: uuid.UUID, record_id: uuid.UUID, user_id: uuid.UUID) -> str:
        session = uuid.uuid4().hex
        self._sessions.setdefault((tenant_id, record_id), {})[session] = (user_id, self._clock.time())
        await self._publish(PresenceChanged(tenant_id, record_id))
        return session

    async def leave(self, tenant_id: uuid.UUID, record_id: uuid.UUID, session: str) -> None:
        key = (tenant_id, record_id)
        sessions = self._sessions.get(key, {})
        gone = sessions.pop(session, None)
        if gone is None:
            return
        if all(user != gone[0] for user, _ in sessions.values()):
            self._states.get(key, {}).pop(gone[0], None)
        if not sessions:
            self._sessions.pop(key, None)
            self._states.pop(key, None)
        await self._publish(PresenceChanged(tenant_id, record_id))

    async def set_state(self, tenant_id: uuid.UUID, record_id: uuid.UUID, user_id: uuid.UUID,
                        state: PresenceState) -> bool:
        key = (tenant_id, record_id)
        if all(user != user_id for user, _ in self._sessions.get(key, {}).values()):
            return False
        self._states.setdefault(key, {})[user_id] = state.value
        await self._publish(PresenceChanged(tenant_id, record_id))
        return True

    async def members(self, tenant_id: uuid.UUID, record_id: uuid.UUID) -> list[PresenceEntry]:
        key = (tenant_id, record_id)
        return entries(self._sessions.get(key, {}).values(), self._states.get(key, {}))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class _Session:
    key: str
    tenant_id: uuid.UUID
    record_id: uuid.UUID
    user_id: uuid.UUID
    since: float


class RedisPresence:
    """Presence shared by every process through one Redis hash per record (see module docstring)."""

    def __init__(self, client: Redis, publish: Publish, ttl: float = 30.0, *, prefix: str = "",
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._client = client
        self._clock = clock
        self._prefix = prefix
        self._publish = publish
        self._ttl = ttl
        self._local: dict[str, _Session] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    def _key(self, tenant_id: uuid.UUID, record_id: uuid.UUID) -> str:
        return self._prefix + presence_channel(tenant_id, record_id)

    def _value(self, session: _Session) -> str:
        return f"{session.user_id} {self._clock.time() + self._ttl} {session.since}"

    async def join(self, tenant_id: uuid.UUID, record_id: uuid.UUID, user_id: uuid.UUID) -> str:
        name = uuid.uuid4().hex
        session = _Session(self._key(tenant_id, record_id), tenant_id, record_id, user_id,
                           self._clock.time())
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(session.key, f"s:{name}", self._value(session))
            pipe.hsetnx(session.key, f"u:{user_id}", PresenceState.VIEWING.value)
            pipe.expire(session.key, int(self._ttl * 3))
            await pipe.execute()
        self._local[name] = session
        await self._publish(PresenceChanged(tenant_id, record_id))
        return name

    async def leave(self, tenant_id: uuid.UUID, record_id: uuid.UUID, session: str) -> None:
        """Remove the session; if Redis is unreachable it is only logged (the entry expires by itself)."""
        self._local.pop(session, None)
        key = self._key(tenant_id, record_id)
        try:
            sessions, _ = self._parse(await self._client.hgetall(key))
            mine = sessions.pop(f"s:{session}", None)
            if mine is None:
                return
            fields = [f"s:{session}"]
            if all(user != mine[0] for user, _, _ in sessions.values()):
                fields.append(f"u:{mine[0]}")
            await self._client.hdel(key, *fields)
        except (RedisError, OSError) as exc:
            log.warning("presence leave failed (the entry will expire): %s", exc)
            return
        await self._publish(PresenceChanged(tenant_id, record_id))

    async def set_state(self, tenant_id: uuid.UUID, record_id: uuid.UUID, user_id: uuid.UUID,
                        state: PresenceState) -> bool:
        key = self._key(tenant_id, record_id)
        sessions, _ = self._parse(await self._client.hgetall(key))
        now = self._clock.time()
        if all(user != user_id or expires < now for user, expires, _ in sessions.values()):
            return False
        await self._client.hset(key, f"u:{user_id}", state.value)
        await self._publish(PresenceChanged(tenant_id, record_id))
        return True

    async def members(self, tenant_id: uuid.UUID, record_id: uuid.UUID) -> list[PresenceEntry]:
        """Live users; expired sessions (and states of users without a session) are pruned and announced."""
        key = self._key(tenant_id, record_id)
        sessions, states = self._parse(await self._client.hgetall(key))
        now = self._clock.time()
        live = [(user, since) for user, expires, since in sessions.values() if expires >= now]
        live_users = {user for user, _ in live}
        stale = [f for f, (_, expires, _) in sessions.items() if expires < now]
        stale += [f"u:{user}" for user in states if user not in live_users]
        if stale:
            await self._client.hdel(key, *stale)
            await self._publish(PresenceChanged(tenant_id, record_id))
        return entries(live, states)

    @staticmethod
    def _parse(raw: Mapping[Any, Any]) -> tuple[dict[str, tuple[uuid.UUID, float, float]], dict[uuid.UUID, str]]:
        sessions: dict[str, tuple[uuid.UUID, float, float]] = {}
        states: dict[uuid.UUID, str] = {}
        for field, value in ((str(f), str(v)) for f, v in raw.items()):
            try:
                if field.startswith("s:"):
                    user, expires, since = value.split(" ")
                    sessions[field] = (uuid.UUID(user), float(expires), float(since))
                elif field.startswith("u:"):
                    states[uuid.UUID(field[2:])] = PresenceState(value).value
            except ValueError:
                log.warning("ignoring malformed presence field %s", field)
        return sessions, states

    async def refresh(self) -> None:
        """Extend this process's sessions and prune expired ones on the records they are on."""
        if not self._local:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for name, session in self._local.items():
                pipe.hset(session.key, f"s:{name}", self._value(session))
                pipe.expire(session.key, int(self._ttl * 3))
            await pipe.execute()
        for tenant_id, record_id in {(s.tenant_id, s.record_id) for s in self._local.values()}:
            await self.members(tenant_id, record_id)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                log.warning("presence heartbeat failed: %s", exc)

    async def start(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="atrium-presence-heartbeat")

    async def close(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
