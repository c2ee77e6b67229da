"""A named lock held in the store, so that two nightly runs never overlap.

The lock is one row of the ``locks`` table. Taking it is a plain INSERT: the primary key
makes a second insert fail on every backend, so two processes racing for the lock cannot
both win. A lock left behind by a process killed with ``kill -9`` is recognised as stale and
taken over:

- holder on this host: stale when its pid is gone, or now belongs to a process started
  after the lock was taken (the pid was reused);
- holder on another host: stale when it has shown no activity for ``stale_after`` (activity
  is the lock's heartbeat, which the holder refreshes every ``HEARTBEAT_EVERY`` while it
  lives, the time the lock was taken, or the latest shard its run wrote).

A holder whose lock was taken over anyway (a host frozen or cut off from the store for longer
than ``stale_after``) must not go on writing: ``StoreLock.check`` raises ``LockLostError``
when the store no longer names it, and the nightly job checks before each step that changes
shared state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psutil
from sqlalchemy import Engine, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from recsys.clock import utc_now
from recsys.errors import RunLockedError
from recsys.interrupts import signals_deferred
from recsys.store import schema as s
from recsys.store.database import STORE_FAILURES, write_transaction

log = logging.getLogger(__name__)

NIGHTLY_LOCK = "nightly"
# A live holder refreshes its heartbeat every minute, so a quarter of an hour without one
# means the holder is gone (or cut off, and it will find out before it writes again).
HEARTBEAT_EVERY = timedelta(minutes=1)
DEFAULT_STALE_AFTER = timedelta(minutes=15)
# A few attempts cover the case where another process takes over the same stale lock.
_MAX_ATTEMPTS = 5
# Process start times and lock times come from different clocks; allow for rounding.
_CLOCK_SLACK = timedelta(seconds=2)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:  # not Linux: the host name alone
        return ""


def this_host() -> str:
    """Where this process's pids mean something: ``hostname#key``. The key hashes the machine's
    id and this process's pid namespace, so that two machines of one name, or containers
    sharing the host's name (``--network host``) but not its pids, are told apart: each would
    otherwise read the other's live holder as a dead pid of its own and take its lock. Both
    stay the same across a reboot of a machine (the root pid namespace has one fixed id), so
    its runs killed by the reboot are still recognised as its own, and dead; the boot id
    stands in where there is no machine id (containers often have none, and a new pid
    namespace each start anyway)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name and what follows
        pid_ns = ""
    machine = _read("/etc/machine-id") or _read("/proc/sys/kernel/random/boot_id")
    key = hashlib.sha1(f"{machine}|{pid_ns}".encode()).hexdigest()[:8]
    return f"{socket.gethostname()}#{key}"


def current_holder() -> str:
    """This process's identity as a lock holder: ``host:pid``, the host being ``this_host()``."""
    return f"{this_host()}:{os.getpid()}"


class LockLostError(RunLockedError):
    """The store no longer records this process as the lock's holder: another job took it
    over as stale. The job must stop before it changes anything else."""


@dataclass(frozen=True)
class LockState:
    """The lock row as stored.

    Attributes:
        name: lock name.
        holder: ``host:pid`` of the process holding it.
        run_id: the run the holder is working on, if it said so.
        acquired_at: naive UTC time the lock was taken.
        heartbeat_at: naive UTC time the holder last said it was alive (None before its first
            heartbeat).
    """

    name: str
    holder: str
    run_id: int | None
    acquired_at: datetime
    heartbeat_at: datetime | None = None

    @property
    def host(self) -> str:
        return self.holder.rpartition(":")[0]

    @property
    def pid(self) -> int | None:
        tail = self.holder.rpartition(":")[2]
        return int(tail) if tail.isdigit() else None

    @property
    def on_this_host(self) -> bool:
        """Held by a process of this host: alive or gone is known from its pid, no timeout applies."""
        return self.host == this_host() and self.pid is not None


def check_holder(engine: Engine, state: LockState, *, released: bool = False) -> None:
    """Raises LockLostError unless the store still records ``state``'s holder as holding the lock.

    Shared by ``StoreLock.check`` and ``LockView``, which a helper process of the holder uses.
    """
    current = None if released else read_lock(engine, state.name)
    if current is not None and (current.holder, current.acquired_at) == (state.holder, state.acquired_at):
        return
    if released:
        why = "it was released"
    elif current is None:
        why = "its row was deleted (cleared by hand?)"
    else:
        why = f"{current.holder} took it over at {current.acquired_at:%Y-%m-%d %H:%M:%S} UTC"
    raise LockLostError(
        f"lock '{state.name}' is no longer held by {state.holder}: {why}; this job stops without writing "
        "anything more"
    )


class LockView:
    """The lock of a job seen from a helper process it started (the index refresh): ``check``
    asks the store whether the job still holds it; the job itself keeps the heartbeat."""

    def __init__(self, engine: Engine, state: LockState):
        self._engine, self.state = engine, state

    def check(self) -> None:
        check_holder(self._engine, self.state)


class StoreLock:
    """A lock this process holds; a context manager that releases it on exit.

    Use ``with acquire_lock(engine, run_id=...) as lock:``. While held, a daemon thread
    refreshes the row's ``heartbeat_at`` every ``heartbeat_every``. A release that fails on exit
    (the store failing) is logged, not raised: the lock is then taken over as stale.
    """

    def __init__(self, engine: Engine, state: LockState, *, heartbeat_every: timedelta = HEARTBEAT_EVERY):
        self._engine = engine
        self.state = state
        self._held = True
        self._lost = False
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(heartbeat_every.total_seconds(),), name=f"recsys-lock-{state.name}", daemon=True
        )
        self._heartbeat.start()

    def _mine(self):
        lk = s.locks.c
        return and_(lk.name == self.name, lk.holder == self.holder, lk.acquired_at == self.state.acquired_at)

    def _beat(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                with write_transaction(self._engine) as conn:
                    touched = conn.execute(update(s.locks).where(self._mine()).values(heartbeat_at=utc_now())).rowcount
            except Exception as exc:  # noqa: BLE001 - the store may be unreachable for a moment; try again
                log.warning("lock '%s': heartbeat not recorded (%s)", self.name, exc)
                continue
            if touched != 1:
                # Log before raising the flag: whoever watches ``lost`` then also finds the reason logged.
                log.error(
                    "lock '%s' is no longer held by %s: another job took it over or it was cleared by hand",
                    self.name,
                    self.holder,
                )
                self._lost = True
                return

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def holder(self) -> str:
        return self.state.holder

    @property
    def held(self) -> bool:
        """Taken and not released by this process (``lost`` says whether another took it)."""
        return self._held

    @property
    def lost(self) -> bool:
        """The heartbeat or ``check`` found the lock taken over or cleared."""
        return self._lost

    def check(self) -> None:
        """Make sure the store still records this process as the holder.

        Raises:
            LockLostError: the lock was released, cleared by hand or taken over.
        """
        try:
            check_holder(self._engine, self.state, released=not self._held)
        except LockLostError:
            self._lost = True
            raise

    def attach_run(self, run_id: int) -> None:
        """Record the run this lock protects, so that others can name it and see its progress.

        Raises:
            LockLostError: the lock is no longer this process's.
        """
        with write_transaction(self._engine) as conn:
            touched = conn.execute(update(s.locks).where(self._mine()).values(run_id=run_id, heartbeat_at=utc_now()))
        if touched.rowcount != 1:
            self.check()
            raise LockLostError(f"lock '{self.name}' is no longer held by {self.holder}")  # changed in between
        self.state = LockState(self.name, self.holder, run_id, self.state.acquired_at)

    def release(self) -> bool:
        """Release the lock; False when it was no longer ours (taken over as stale)."""
        self._stop.set()
        with signals_deferred():  # a SIGTERM here raises once the row is gone, not with it still held
            if not self._held:
                return False
            self._held = False
            if self._heartbeat is not threading.current_thread():
                self._heartbeat.join(timeout=5)
            with write_transaction(self._engine) as conn:
                return conn.execute(delete(s.locks).where(self._mine())).rowcount > 0

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except STORE_FAILURES if exc_type is None else Exception as unreleased:  # noqa: BLE001
            # After an error, whatever the release raises must not hide the cause; after the work
            # is done (committed, served), a store failing (a full disk, a lost connection) must
            # not turn it into a failure. Either way the next run takes the lock over.
            if exc_type is not None:
                log.error("could not release lock '%s' after an error (%s: %s); the next run takes it over as stale",
                          self.name, type(unreleased).__name__, unreleased)
            else:
                log.warning("could not release lock '%s' after the work was done (%s: %s); the next run takes it "
                            "over as stale", self.name, type(unreleased).__name__, unreleased)


def read_lock(engine: Engine, name: str = NIGHTLY_LOCK) -> LockState | None:
    """The lock row, or None when nobody holds the lock."""
    lk = s.locks.c
    with engine.connect() as conn:
        row = conn.execute(
            select(lk.name, lk.holder, lk.run_id, lk.acquired_at, lk.heartbeat_at).where(lk.name == name)
        ).first()
    return None if row is None else LockState(row.name, row.holder, row.run_id, row.acquired_at, row.heartbeat_at)


def acquire_lock(
    engine: Engine,
    name: str = NIGHTLY_LOCK,
    *,
    run_id: int | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    holder: str | None = None,
    heartbeat_every: timedelta = HEARTBEAT_EVERY,
) -> StoreLock:
    """Take the named lock or refuse.

    Args:
        engine: the store.
        name: lock name (one per kind of job).
        run_id: the run the lock protects, if already known (see ``StoreLock.attach_run``).
        stale_after: a lock held from another host with no activity for this long is stale.
        holder: identity to record; defaults to ``host:pid`` of this process (tests pass
            other hosts here).
        heartbeat_every: how often the held lock's heartbeat is refreshed; keep it well
            under every ``stale_after`` in use.

    Returns:
        The held lock, a context manager.

    Raises:
        RunLockedError: another live process holds the lock; the message names it and since when.
    """
    holder = holder or current_holder()
    for _ in range(_MAX_ATTEMPTS):
        now = utc_now()
        row = {"name": name, "holder": holder, "run_id": run_id, "acquired_at": now}
        try:
            with write_transaction(engine) as conn:
                conn.execute(insert(s.locks).values(**row))
            return StoreLock(engine, LockState(name, holder, run_id, now), heartbeat_every=heartbeat_every)
        except IntegrityError:
            pass  # someone holds it: look at who
        current = read_lock(engine, name)
        if current is None:
            continue  # released in between: try again
        reason = _stale_reason(engine, current, stale_after=stale_after, now=now)
        if reason is None:
            raise RunLockedError(
                f"lock '{name}' is held by {current.holder}"
                + (f" ({_run_named(engine, current.run_id)})" if current.run_id is not None else "")
                + f" since {current.acquired_at:%Y-%m-%d %H:%M:%S} UTC: another run is in progress;"
                f" wait for it to finish ({_when_stale(engine, current, stale_after)})"
            )
        if _take_over(engine, current, row):
            log.warning(
                "took over stale lock '%s' from %s (held since %s UTC%s): %s", name, current.holder,
                current.acquired_at, "" if current.run_id is None else f", {_run_named(engine, current.run_id)}", reason,
            )
            return StoreLock(engine, LockState(name, holder, run_id, now), heartbeat_every=heartbeat_every)
    raise RunLockedError(f"lock '{name}' changed hands {_MAX_ATTEMPTS} times while being taken; try again")


def release_lock(engine: Engine, name: str = NIGHTLY_LOCK, *, holder: str | None = None) -> bool:
    """Release the named lock if ``holder`` (default: this process) holds it.

    Returns:
        True when a lock row was deleted.
    """
    lk = s.locks.c
    holder = holder or current_holder()
    with write_transaction(engine) as conn:
        result = conn.execute(delete(s.locks).where(and_(lk.name == name, lk.holder == holder)))
    return result.rowcount > 0


def _take_over(engine: Engine, stale: LockState, row: dict) -> bool:
    """Replace the stale row by ours in one transaction, only if it is still the same row."""
    lk = s.locks.c
    try:
        with write_transaction(engine) as conn:
            # Only the row judged stale: not one whose holder beat its heartbeat since.
            beat = lk.heartbeat_at.is_(None) if stale.heartbeat_at is None else lk.heartbeat_at == stale.heartbeat_at
            gone = conn.execute(
                delete(s.locks).where(
                    and_(lk.name == stale.name, lk.holder == stale.holder, lk.acquired_at == stale.acquired_at, beat)
                )
            )
            if gone.rowcount != 1:
                return False
            conn.execute(insert(s.locks).values(**row))
    except IntegrityError:
        return False
    return True


def _when_stale(engine: Engine, lock: LockState, stale_after: timedelta) -> str:
    """When a live holder's lock may be taken over, for the refusal's message: staleness runs
    from the last heartbeat or finished shard, not from when the lock was taken."""
    if lock.on_this_host:
        return f"process {lock.pid} is running on this host; the lock is freed when it exits"
    last = _last_activity(engine, lock)
    said = (f"last activity {last:%Y-%m-%d %H:%M:%S} UTC; a holder on another host counts as gone after {stale_after} "
            f"without activity, so from {last + stale_after:%Y-%m-%d %H:%M:%S} UTC")
    if lock.host == socket.gethostname():
        # hostname:pid, as releases before the host key wrote it: on an upgrade night this is
        # most likely this machine's killed job, which no pid check can confirm.
        said += ("; its holder names this host's name without a host key, as a recsys release before the key "
                 "wrote it: if no recsys job runs on this machine, the lock is a killed old job's, and "
                 f"`DELETE FROM locks WHERE name = '{lock.name}'` frees it now (docs/operations.md, Locks)")
    return said


def _run_named(engine: Engine, run_id: int) -> str:
    """``"ingest run 11"``: the lock is taken by nightly jobs, ingests and index saves alike,
    and the operator waiting for it needs to know which; ``"run 11"`` when the row is not
    there (or cannot be read: the message is the point, not this detail)."""
    try:
        with engine.connect() as conn:
            kind = conn.execute(select(s.runs.c.kind).where(s.runs.c.run_id == run_id)).scalar()
    except STORE_FAILURES:
        kind = None
    return f"{kind} run {run_id}" if kind else f"run {run_id}"


def stale_reason(engine: Engine, lock: LockState) -> str | None:
    """Why ``lock`` is stale by the rule ``acquire_lock`` takes a lock over by, or None when its
    holder may still be working (read by a migration, which must not run under a live job)."""
    return _stale_reason(engine, lock, stale_after=DEFAULT_STALE_AFTER, now=utc_now())


def _stale_reason(engine: Engine, lock: LockState, *, stale_after: timedelta, now: datetime) -> str | None:
    """Why the lock is stale, or None when its holder may still be working."""
    if lock.on_this_host:
        return local_process_gone(lock.holder, lock.acquired_at, since_what="the lock was taken")
    last = _last_activity(engine, lock)
    if now - last > stale_after:
        return f"holder on another host, no activity since {last:%Y-%m-%d %H:%M:%S} UTC (> {stale_after})"
    return None


def local_process_gone(holder: str, since: datetime, *, since_what: str) -> str | None:
    """Why the process ``holder`` (``host:pid``), working since ``since`` (naive UTC), is gone:
    exited, or its pid now names a process started later (``since_what`` says what happened
    at ``since``, for the message). None when it may still be working, or when it ran on
    another host (this host cannot tell)."""
    host, _, tail = holder.rpartition(":")
    if host != this_host() or not tail.isdigit():
        return None
    pid = int(tail)
    try:
        proc = psutil.Process(pid)
        started = datetime.fromtimestamp(proc.create_time(), timezone.utc).replace(tzinfo=None)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"process {pid} has exited"
    except psutil.NoSuchProcess:
        return f"process {pid} no longer exists"
    if started > since + _CLOCK_SLACK:
        return f"pid {pid} now belongs to a process started after {since_what}"
    return None


def _last_activity(engine: Engine, lock: LockState) -> datetime:
    times = [lock.acquired_at, lock.heartbeat_at]
    if lock.run_id is not None:
        rs = s.run_shards.c
        with engine.connect() as conn:
            times.append(conn.execute(select(func.max(rs.finished_at)).where(rs.run_id == lock.run_id)).scalar())
    return max(t for t in times if t is not None)
