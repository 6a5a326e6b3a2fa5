"""The failover controller of a replicated cluster: it runs in the router, on a thread of its own.

Per shard the cluster metadata (GCS KV, ``shard/<i>/replicas``) holds a :class:`ReplicaSet`: the
shard's **term** (its epoch), which member is primary, which backups are *in sync* (they have every
write the primary acknowledged), and every member's node. The router is its only writer, so each
change is checked against the term it was asked for (a compare-and-set by serialization).

Every :data:`HEARTBEAT_EVERY` seconds the controller heartbeats every member over its own
connection (Ray calls where that is unreachable) and then, per shard:

- a primary silent for :data:`SUSPECT_AFTER` seconds (or restarted, or fenced) is replaced: the
  in-sync backup with the highest log position is chosen, the term is bumped and recorded, and only
  then is the backup told to take over (it waits out the old primary's lease first, see
  :mod:`shardstate.shards.replication`);
- a member that is alive but not in sync is handed to the primary to catch up;
- a member silent for :data:`REPLACE_AFTER` seconds, or a deposed primary that answers again, is
  killed and forgotten; a shard with fewer than ``replicas + 1`` members gets a new one on an alive
  node that holds none of its members (fewer nodes than that: the shard runs degraded and says so).

The decisions are plain functions of the shard's state (:func:`successor`, :func:`node_for`), so
they are tested without Ray.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from shardstate.cluster import metadata
from shardstate.shards import replication as rep
from shardstate.shards.member import MemberChannel

#: Seconds between heartbeat rounds
HEARTBEAT_EVERY = 0.2
#: Seconds a heartbeat may take
HEARTBEAT_TIMEOUT = 0.5
#: Seconds without an answer after which a primary is replaced
SUSPECT_AFTER = 1.5
#: Seconds without an answer after which a member is killed and replaced by a new one
REPLACE_AFTER = 4.0
#: Seconds a new member may take to answer its first heartbeat (a worker process starting)
START_GRACE = 60.0
#: Seconds a promotion may take (the wait for the old lease, then loading the storage)
PROMOTE_TIMEOUT = 30.0


@dataclass
class ReplicaSet:
    """A replicated shard's membership, as the cluster metadata records it."""

    term: int = 0
    primary: int = 0
    in_sync: list[int] = field(default_factory=list)
    #: member -> the node id it was placed on
    members: dict[int, str] = field(default_factory=dict)
    next_member: int = 0
    #: a primary served this shard (from then on a member of term 0 is never promoted)
    served: bool = False

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data (member numbers as strings)."""
        out = asdict(self)
        out["members"] = {str(m): node for m, node in self.members.items()}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReplicaSet:
        """From :meth:`to_dict`'s form."""
        return cls(
            int(raw["term"]),
            int(raw["primary"]),
            [int(m) for m in raw.get("in_sync", [])],
            {int(m): str(node) for m, node in raw.get("members", {}).items()},
            int(raw.get("next_member", 0)),
            bool(raw.get("served", False)),
        )


def read_set(cluster: str, shard: int) -> ReplicaSet | None:
    """Shard ``shard``'s recorded :class:`ReplicaSet`, or None (none recorded yet)."""
    raw = metadata.read(cluster, f"shard/{shard}/replicas")
    return ReplicaSet.from_dict(raw) if isinstance(raw, dict) else None


def write_set(cluster: str, shard: int, replica_set: ReplicaSet) -> None:
    """Record shard ``shard``'s :class:`ReplicaSet`."""
    metadata.write(cluster, f"shard/{shard}/replicas", replica_set.to_dict())


def successor(replica_set: ReplicaSet, statuses: dict[int, dict[str, Any] | None]) -> int | None:
    """The member to promote when the primary is lost: an in-sync backup that answers as a backup
    of the current (or, mid-failover, the previous) term, with the highest log position; None if
    there is none (the shard then waits for its primary: promoting another would lose writes)."""
    best: tuple[int, int] | None = None
    for member in replica_set.in_sync:
        status = statuses.get(member)
        if member == replica_set.primary or status is None:
            continue
        if status.get("phase") != "ready" or status.get("role") != rep.BACKUP:
            continue
        term = status.get("term")
        if not isinstance(term, int) or term < 1 or term not in (replica_set.term, replica_set.term - 1):
            continue
        rank = (int(status.get("lsn", 0)), -member)
        if best is None or rank > best:
            best = rank
    return None if best is None else -best[1]


def node_for(taken: Sequence[str], alive: Sequence[str], load: dict[str, int]) -> str | None:
    """An alive node that holds none of this shard's members (``taken``), the least loaded first
    (``load``: members per node over all shards); None if every alive node holds one."""
    free = [node for node in alive if node not in taken]
    if not free:
        return None
    return min(free, key=lambda node: (load.get(node, 0), node))


def primary_valid(replica_set: ReplicaSet, status: dict[str, Any] | None) -> bool | None:
    """Whether the recorded primary serves its term (True); may still do so (None: no answer
    this round, still loading, or a backup of this term or the one before that was not promoted
    yet); or cannot (False: restarted, fenced, or another term). Terms start at 1: a member of
    term 0 never held anything, so after the shard served it is no successor."""
    if status is None:
        return None
    role, term = status.get("role"), status.get("term")
    if role == rep.PRIMARY and term == replica_set.term:
        return True
    if status.get("phase") != "ready":
        return None
    if role == rep.BACKUP and isinstance(term, int):
        if term == replica_set.term or (
            term == replica_set.term - 1 and (term >= 1 or not replica_set.served)
        ):
            return None
    return False


def restarted_from_its_file(replica_set: ReplicaSet, status: dict[str, Any] | None) -> bool:
    """Whether the recorded primary came back as a fresh process (term 0) that loaded its own file:
    in a durable cluster it holds every write it acknowledged (it committed each before answering),
    so when no in-sync backup exists it may serve again, in a new term."""
    if status is None or status.get("phase") != "ready":
        return False
    return status.get("role") == rep.BACKUP and status.get("term") == 0 and replica_set.served


@dataclass
class Member:
    """What the controller knows of one member right now."""

    handle: Any
    created: float
    channel: MemberChannel | None = None
    status: dict[str, Any] | None = None
    last_ok: float = 0.0
    pid: int | None = None


class ShardWatch:
    """The controller's state for one shard."""

    def __init__(self, index: int, replica_set: ReplicaSet) -> None:
        self.index = index
        self.set = replica_set
        self.members: dict[int, Member] = {}
        self.promoting: threading.Thread | None = None
        self.warned: str | None = None
        #: its primary is lost and no backup may take over (``warned`` says so until it is back)
        self.waiting = False
        #: fewer alive nodes than it needs members
        self.short_of_nodes = False
        self.failovers = 0
        self.last_failover: dict[str, Any] | None = None


class Controller:
    """Watches every replicated shard's members and fails over (see the module docstring).

    ``spawn(shard, member, node)`` creates a member actor; ``find(shard, member)`` returns a
    running one's handle or None; ``kill(handle)`` kills one for good; ``alive_nodes()`` lists the
    alive node ids.
    """

    def __init__(
        self,
        cluster: str,
        shards: int,
        replicas: int,
        spawn: Callable[[int, int, str], Any],
        find: Callable[[int, int], Any],
        kill: Callable[[Any], None],
        alive_nodes: Callable[[], list[str]],
        secret: bytes | None,
        my_ip: str | None,
        durable: bool = False,
    ) -> None:
        self.cluster = cluster
        #: members keep their data in files (a restarted primary still has its writes)
        self.durable = durable
        self.replicas = replicas
        self.spawn, self.find, self.kill = spawn, find, kill
        self.alive_nodes = alive_nodes
        self.secret, self.my_ip = secret, my_ip
        self.lock = threading.RLock()
        self._nodes: list[str] = []
        self._nodes_at = 0.0
        self.watches: list[ShardWatch] = []
        for i in range(shards):
            self.watches.append(self._watch(i))
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="shardstate-heartbeat")
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="shardstate-failover")

    def _watch(self, index: int) -> ShardWatch:
        """A shard's watch: its recorded set with its running members, or a new set."""
        recorded = read_set(self.cluster, index)
        now = time.monotonic()
        if recorded is None:
            recorded = ReplicaSet()
            watch = ShardWatch(index, recorded)
            self._fill(watch, now)
            recorded.term = 1  # recorded before the first primary hears of it
            recorded.primary = min(recorded.members) if recorded.members else 0
            write_set(self.cluster, index, recorded)
            return watch
        watch = ShardWatch(index, recorded)
        alive: list[str] | None = None
        for member, node in list(recorded.members.items()):
            handle = self.find(index, member)
            if handle is None and self.durable:  # the cluster was shut down: back from its file
                alive = self.alive_nodes() if alive is None else alive
                if node in alive:
                    handle = self.spawn(index, member, node)
            if handle is None:
                continue  # gone with its node: replaced by the ticks (a primary is waited for)
            watch.members[member] = Member(handle, now)
        return watch

    def start(self) -> None:
        """Start watching (the thread)."""
        self.thread.start()

    def stop(self) -> None:
        """Stop watching (the router shuts the cluster down)."""
        self._stop.set()

    # -- what the router asks -------------------------------------------------------------------
    def primary_handle(self, shard: int) -> Any:
        """The handle of shard ``shard``'s recorded primary (None if it has no running actor)."""
        watch = self.watches[shard]
        member = watch.members.get(watch.set.primary)
        return None if member is None else member.handle

    def primary_endpoint(self, shard: int) -> Any:
        """Where shard ``shard``'s primary listens (from its last heartbeat), or None."""
        watch = self.watches[shard]
        member = watch.members.get(watch.set.primary)
        if member is None or member.status is None or member.status.get("role") != rep.PRIMARY:
            return None
        return member.status.get("endpoint")

    def mark_in_sync(self, shard: int, term: int, member: int) -> bool:
        """The primary of ``term`` brought ``member`` up to date: count it in sync (False: the
        term is over, or the member is no longer one)."""
        with self.lock:
            replica_set = self.watches[shard].set
            if term != replica_set.term or member not in replica_set.members or member == replica_set.primary:
                return False
            if member not in replica_set.in_sync:
                replica_set.in_sync = sorted([*replica_set.in_sync, member])
                write_set(self.cluster, shard, replica_set)
            return True

    def drop_backup(self, shard: int, term: int, member: int) -> bool:
        """The primary of ``term`` could not reach backup ``member``: it is no longer in sync (so it
        is never promoted). False: the term is over (the primary must stop)."""
        with self.lock:
            replica_set = self.watches[shard].set
            if term != replica_set.term:
                return False
            if member in replica_set.in_sync:
                replica_set.in_sync = [m for m in replica_set.in_sync if m != member]
                write_set(self.cluster, shard, replica_set)
            return True

    def status(self) -> list[dict[str, Any]]:
        """Per shard: term, primary, in-sync backups, members and what their heartbeats said."""
        with self.lock:
            return [
                {
                    "shard": w.index,
                    **w.set.to_dict(),
                    "degraded": len(w.set.members) < self.replicas + 1 or len(w.set.in_sync) < self.replicas,
                    "warning": w.warned,
                    "failovers": w.failovers,
                    "last_failover": w.last_failover,
                    "heartbeats": {
                        str(m): None
                        if s.status is None
                        else {k: s.status.get(k) for k in ("role", "term", "lsn", "phase", "pid")}
                        for m, s in w.members.items()
                    },
                }
                for w in self.watches
            ]

    def wait_in_sync(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s until every shard's primary serves with all its backups in sync;
        return what is still missing (the cluster runs degraded meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            missing: list[str] = []
            primaryless = False
            with self.lock:
                for w in self.watches:
                    st = w.members.get(w.set.primary)
                    if st is None or st.status is None or st.status.get("role") != rep.PRIMARY:
                        missing.append(f"shard {w.index} has no serving primary yet")
                        primaryless = True
                    elif len(w.set.in_sync) < self.replicas:
                        missing.append(
                            f"shard {w.index} has {len(w.set.in_sync)} of {self.replicas} backups in sync"
                            + (f" ({w.warned})" if w.warned else "")
                        )
            short = all(w.short_of_nodes for w in self.watches if len(w.set.in_sync) < self.replicas)
            if not missing or time.monotonic() > deadline or (short and not primaryless):
                return missing  # (too few nodes for the backups: waiting does not help)
            time.sleep(0.05)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._tick()
            except Exception as exc:  # never let the controller die: log, and go on
                print(f"shardstate failover: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop.wait(max(0.0, HEARTBEAT_EVERY - (time.monotonic() - started)))

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._nodes_at > 1.0:
            try:
                self._nodes = self.alive_nodes()
                self._nodes_at = now
            except Exception:
                pass
        beats = [(w, m, s) for w in self.watches for m, s in list(w.members.items())]
        answers = list(self._pool.map(lambda b: self._heartbeat(b[2]), beats))
        now = time.monotonic()
        for (_w, _m, member), status in zip(beats, answers, strict=True):
            member.status = status
            if status is not None:
                member.last_ok = now
        for watch in self.watches:
            with self.lock:
                self._tend(watch, now)

    def _heartbeat(self, member: Member) -> dict[str, Any] | None:
        try:
            if member.channel is None:
                endpoint = member.status.get("endpoint") if member.status else None
                if endpoint is None:
                    endpoint = _endpoint_of(member.handle)
                member.channel = MemberChannel(member.handle, endpoint, self.secret, self.my_ip)
            answer = rep.unpack(member.channel.call(rep.pack((rep.HEARTBEAT,)), HEARTBEAT_TIMEOUT))
            if answer[0] != rep.OK:
                return None
            status: dict[str, Any] = answer[1]
            if member.pid is not None and status.get("pid") != member.pid:
                member.channel.close()  # a restarted process: a new connection next time
                member.channel = None
            member.pid = status.get("pid")
            return status
        except Exception:
            if member.channel is not None:
                member.channel.close()
                member.channel = None
            return None

    def _tend(self, watch: ShardWatch, now: float) -> None:
        """One shard's decisions for this round (under the lock)."""
        rs = watch.set
        statuses = {m: s.status for m, s in watch.members.items()}
        primary = watch.members.get(rs.primary)
        valid = primary_valid(rs, primary.status if primary else None)
        if watch.promoting is not None and not watch.promoting.is_alive():
            watch.promoting = None
        if valid is True:
            if watch.waiting:
                watch.waiting, watch.warned = False, None
            if not rs.served:
                rs.served = True
                write_set(self.cluster, watch.index, rs)
        elif valid is None and primary is not None and primary.status is not None:
            if primary.status.get("phase") == "ready" and watch.promoting is None:
                self._promote(watch, rs.primary, rs.term)
        else:
            node_gone = self._nodes_at > 0 and rs.members.get(rs.primary) not in self._nodes
            if primary is None or node_gone:
                silent = True
            elif primary.last_ok:
                silent = now - primary.last_ok > SUSPECT_AFTER
            else:  # never answered yet: a worker process may take a while to start
                silent = now - primary.created > START_GRACE
            if valid is False or silent:
                self._fail_over(watch, statuses, now)
        self._depose_old(watch)
        self._replace_dead(watch, now)
        self._fill(watch, now)
        self._sync_backups(watch)

    def _fail_over(self, watch: ShardWatch, statuses: dict[int, dict[str, Any] | None], now: float) -> None:
        rs = watch.set
        if watch.promoting is not None:
            return
        chosen = successor(rs, statuses)
        if chosen is None and self.durable and restarted_from_its_file(rs, statuses.get(rs.primary)):
            chosen = rs.primary  # its file has every write it acknowledged: it serves again
        if chosen is None:
            watch.waiting = True
            _warn(watch, f"shard {watch.index}: primary {rs.primary} lost and no in-sync backup to promote")
            return
        old = rs.primary
        rs.term += 1
        rs.primary = chosen
        rs.in_sync = [m for m in rs.in_sync if m != chosen]
        if chosen == old:  # nobody else has its writes: the others start over from it
            rs.in_sync = []
        write_set(self.cluster, watch.index, rs)  # recorded before the backup hears of its term
        watch.failovers += 1
        watch.last_failover = {"from": old, "to": chosen, "term": rs.term, "at": time.time()}
        watch.warned = None
        print(
            f"shardstate failover: shard {watch.index}: member {old} -> {chosen} (term {rs.term})",
            file=sys.stderr,
        )
        self._promote(watch, chosen, rs.term)

    def _promote(self, watch: ShardWatch, member: int, term: int) -> None:
        target = watch.members[member]

        def run() -> None:
            try:
                channel = MemberChannel(target.handle, _status_endpoint(target), self.secret, self.my_ip)
                try:
                    answer = rep.unpack(channel.call(rep.pack((rep.PROMOTE, term)), PROMOTE_TIMEOUT))
                finally:
                    channel.close()
            except Exception as exc:
                print(
                    f"shardstate failover: promoting shard {watch.index} member {member}: {exc!r}",
                    file=sys.stderr,
                )
                return
            if answer[0] == rep.OK:
                with self.lock:
                    if watch.set.term == term and watch.set.primary == member:
                        watch.set.in_sync = []  # the others catch up with the new primary
                        write_set(self.cluster, watch.index, watch.set)

        watch.promoting = threading.Thread(target=run, daemon=True, name=f"shardstate-promote-{watch.index}")
        watch.promoting.start()

    def _depose_old(self, watch: ShardWatch) -> None:
        """Members that are not the primary but think they are (or were fenced): tell them, kill them."""
        rs = watch.set
        for m, member in list(watch.members.items()):
            status = member.status
            if m == rs.primary or status is None:
                continue
            if status.get("role") == rep.PRIMARY or status.get("role") == rep.FENCED:
                if member.channel is not None:
                    try:
                        member.channel.call(rep.pack((rep.DEPOSE, rs.term)), HEARTBEAT_TIMEOUT)
                    except Exception:
                        pass
                self._forget(watch, m)

    def _replace_dead(self, watch: ShardWatch, now: float) -> None:
        rs = watch.set
        for m in list(rs.members):
            if m == rs.primary:
                continue
            member = watch.members.get(m)
            node_gone = self._nodes_at > 0 and rs.members[m] not in self._nodes
            silent = now - member.last_ok > REPLACE_AFTER if member and member.last_ok else False
            never = member is not None and not member.last_ok and now - member.created > START_GRACE
            if member is None or node_gone or silent or never:
                self._forget(watch, m)

    def _forget(self, watch: ShardWatch, m: int) -> None:
        rs = watch.set
        member = watch.members.pop(m, None)
        if member is not None:
            if member.channel is not None:
                member.channel.close()
            try:
                self.kill(member.handle)
            except Exception:
                pass
        rs.members.pop(m, None)
        rs.in_sync = [x for x in rs.in_sync if x != m]
        write_set(self.cluster, watch.index, rs)

    def _fill(self, watch: ShardWatch, now: float) -> None:
        """Start new members until the shard has ``replicas + 1`` on distinct alive nodes."""
        rs = watch.set
        alive = self._nodes or self.alive_nodes()
        load: dict[str, int] = {}
        for w in self.watches:
            for node in w.set.members.values():
                load[node] = load.get(node, 0) + 1
        watch.short_of_nodes = False
        while len(rs.members) < self.replicas + 1:
            found = node_for(list(rs.members.values()), alive, load)
            if found is None:
                watch.short_of_nodes = True
                want = self.replicas + 1
                have = len(rs.members)
                _warn(watch, f"shard {watch.index}: {have} members on {len(alive)} alive nodes, want {want}")
                return
            member = rs.next_member
            rs.next_member += 1
            handle = self.spawn(watch.index, member, found)
            rs.members[member] = found
            load[found] = load.get(found, 0) + 1
            watch.members[member] = Member(handle, now)
            write_set(self.cluster, watch.index, rs)

    def _sync_backups(self, watch: ShardWatch) -> None:
        """Hand every live member that is not in sync to the serving primary to catch up."""
        rs = watch.set
        primary = watch.members.get(rs.primary)
        if primary is None or primary.status is None or primary.status.get("role") != rep.PRIMARY:
            return
        if primary.status.get("term") != rs.term or primary.channel is None:
            return
        busy = set(primary.status.get("in_sync", [])) | set(primary.status.get("joining", []))
        for m, member in watch.members.items():
            status = member.status
            if (
                m == rs.primary
                or m in rs.in_sync
                or m in busy
                or status is None
                or status.get("phase") != "ready"
            ):
                continue
            if status.get("role") != rep.BACKUP:
                continue
            try:
                message = rep.pack((rep.SYNC, rs.term, m, status.get("endpoint")))
                primary.channel.call(message, HEARTBEAT_TIMEOUT)
            except Exception:
                pass


def _warn(watch: ShardWatch, reason: str) -> None:
    """Say once (per change) why a shard is degraded or waiting; ``status()`` shows it too."""
    if watch.warned != reason:
        print(f"shardstate failover: {reason}", file=sys.stderr)
        watch.warned = reason


def _endpoint_of(handle: Any) -> Any:
    import ray

    return ray.get(handle.endpoint.remote(), timeout=HEARTBEAT_TIMEOUT)


def _status_endpoint(member: Member) -> Any:
    return None if member.status is None else member.status.get("endpoint")
