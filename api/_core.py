"""The one client core: routing, sending, retries and decoding, written once for both clients.

Every procedure here is a generator that does no I/O itself: it *yields effects* (send this batch
to shard 2, wait this long, refresh the shard map) and gets their results back (or their errors,
thrown in). The sync client drives a procedure with blocking calls (:func:`run_sync`), the async
client with awaits (:func:`run_async`): the two fronts differ only in how they wait, so the retry
policy, redirects, deferrals and the decoding of results exist once.

Failures and what the core does with them:

- the shard went away mid-call (:class:`ShardGone`: killed, restarting, its connection broke):
  back off (bounded by the link's ``retry_timeout``), refresh the map, send the same batch again.
  Writes carry op_ids, so a write that did commit before the crash is answered, not applied again;
- a command answered "stale shard map": refresh the map and send it again on its own;
- a shard still loading, or a batch whose answer grew too large (:class:`Deferred`): wait a
  little, send what was deferred again, in order;
- anything else is that call's own error (``StateError``), or ``Unavailable`` (a timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from shardstate._errors import (
    Deferred,
    InvalidInput,
    NotPrimary,
    ShardLoading,
    StaleShardMap,
    StateError,
    Unavailable,
)
from shardstate._requests import (
    COUNTS_COMMAND,
    GROUPS_COMMAND,
    Page,
    Request,
    decode_payload,
    merge_groups,
    next_page,
)
from shardstate._retry import Backoff
from shardstate._transport import ShardGone
from shardstate._wireformat import fits, pack, request_sizes, unpack
from shardstate.cluster.slots import slot_of

if TYPE_CHECKING:
    from shardstate._link import ClusterLink, ShardView

#: How many times a call follows a "stale shard map" answer before giving up.
MAX_REDIRECTS = 5


# -- effects --------------------------------------------------------------------------------------
class Send(NamedTuple):
    """Send a packed batch to ``shard``; the result is its packed answer."""

    shard: int
    packed: bytes
    lane: str | None = None
    resume: bool = False


class Receive(NamedTuple):
    """The answer to a batch already sent (an awaitable from ``ClusterLink.submit``), or one
    already in hand (bytes, or the exception its call raised)."""

    pending: Any


class SendMany(NamedTuple):
    """Send batches to several shards at once; the result is each one's answer or exception."""

    calls: list[tuple[int, bytes]]


class Pause(NamedTuple):
    """Wait ``seconds``."""

    seconds: float


class Retry(NamedTuple):
    """Wait before the next try after ``error``, as ``backoff`` says (raises when it is no use)."""

    backoff: Backoff
    error: BaseException


class _Current:
    """The shard map in use (fetched on first use)."""


class _Refresh:
    """Fetch the shard map from the router again."""


CURRENT = _Current()
REFRESH = _Refresh()

Effect = Send | Receive | SendMany | Pause | Retry | _Current | _Refresh
Proc = Generator[Effect, Any, Any]


# -- drivers ----------------------------------------------------------------------------------------
def run_sync(link: ClusterLink, proc: Proc) -> Any:
    """Run ``proc`` to its end with blocking calls; return its value."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = proc.send(value) if error is None else proc.throw(error)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            value = _perform_sync(link, effect)
        except BaseException as exc:
            error = exc


def _perform_sync(link: ClusterLink, effect: Effect) -> Any:
    if type(effect) is Send:
        return link.send(effect.shard, effect.packed, effect.lane, effect.resume)
    if type(effect) is Receive:
        return _in_hand(effect.pending)
    if effect is CURRENT:
        return link.current()
    if effect is REFRESH:
        return link.refresh()
    if type(effect) is SendMany:
        return link.send_many(effect.calls)
    if type(effect) is Pause:
        time.sleep(effect.seconds)
        return None
    if type(effect) is Retry:
        time.sleep(effect.backoff.next_delay(effect.error))
        return None
    raise TypeError(f"not an effect: {effect!r}")


async def run_async(link: ClusterLink, proc: Proc) -> Any:
    """Run ``proc`` to its end with awaits; return its value."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = proc.send(value) if error is None else proc.throw(error)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            value = await _perform_async(link, effect)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                proc.close()
                raise
            error = exc


async def _perform_async(link: ClusterLink, effect: Effect) -> Any:
    if type(effect) is Send:
        return await link.receive(link.submit(effect.shard, effect.packed, effect.lane, effect.resume))
    if type(effect) is Receive:
        if isinstance(effect.pending, (bytes, BaseException)):
            return _in_hand(effect.pending)
        return await link.receive(effect.pending)
    if effect is CURRENT:
        return await link.current_async()
    if effect is REFRESH:
        return await link.refresh_async()
    if type(effect) is SendMany:
        pending = [link.submit(shard, packed) for shard, packed in effect.calls]
        return await asyncio.gather(*(link.receive(p) for p in pending), return_exceptions=True)
    if type(effect) is Pause:
        await asyncio.sleep(effect.seconds)
        return None
    if type(effect) is Retry:
        await asyncio.sleep(await asyncio.to_thread(effect.backoff.next_delay, effect.error))
        return None
    raise TypeError(f"not an effect: {effect!r}")


def _in_hand(answer: Any) -> bytes:
    if isinstance(answer, BaseException):
        raise answer
    return answer  # type: ignore[no-any-return]


# -- slots: one call's outcome ------------------------------------------------------------------------
class Slot:
    """One call in a batch: its request, and (once answered) its value or error."""

    __slots__ = ("req", "done", "ok", "value")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.done = False
        self.ok = False
        self.value: Any = None

    def result(self) -> Any:
        if self.ok:
            return self.value
        raise self.value

    def settle(self, ok: bool, value: Any) -> None:
        self.ok, self.value, self.done = ok, value, True


def fail(slots: Sequence[Slot], error: StateError) -> None:
    """Settle every slot with ``error``."""
    for slot in slots:
        slot.settle(False, error)


def answers(raw: bytes) -> list[Any]:
    """A shard's unpacked answer to a batch. A member that is not (or no longer) its shard's
    primary answers :class:`NotPrimary` without executing anything: that is :class:`ShardGone`
    (refresh the map, send the same batch again to the new primary)."""
    results = unpack(raw)
    if results and not results[0][0] and isinstance(results[0][1], NotPrimary):
        raise ShardGone(str(results[0][1]))
    return results  # type: ignore[no-any-return]


def _is_retry(payload: Any) -> bool:
    return isinstance(payload, (StaleShardMap, ShardLoading, Deferred))


# -- procedures -----------------------------------------------------------------------------------
def call(link: ClusterLink, req: Request) -> Proc:
    """Send ``req`` on its own (following redirects, waiting while its shard restarts or loads);
    return its decoded value (every page of a long ``list``/``items``)."""
    value = yield from _alone(link, req)
    if isinstance(value, Page):
        value = yield from rest(link, value)
    return value


def rest(link: ClusterLink, page: Page) -> Proc:
    """All rows of a paged ``list``/``items`` answer, from its first page on."""
    rows = list(page.rows)
    value: Any = page
    while isinstance(value, Page):
        value = yield from _alone(link, next_page(value))
        rows.extend(value.rows if isinstance(value, Page) else value)
    return rows


def _alone(link: ClusterLink, req: Request) -> Proc:
    backoff: Backoff | None = None
    redirects = 0
    packed = pack([req.cmd])
    while True:
        view: ShardView = yield CURRENT
        shard = view.owners[slot_of(req.group_id)]
        try:
            results = answers((yield Send(shard, packed)))
        except ShardGone as exc:  # the shard died mid-call: it restarts from storage
            backoff = backoff or Backoff(link)
            yield Retry(backoff, exc)
            yield REFRESH
            continue
        if len(results) != 1:
            raise StateError(f"shard returned a malformed answer: {results!r}")
        ok, payload = results[0]
        if ok:
            link.loading_since.pop(shard, None)
            return decode_payload(req, payload)
        if isinstance(payload, (ShardLoading, Deferred)):  # wait (within retry_timeout), then again
            backoff = backoff or Backoff(link)
            yield Retry(backoff, payload)
            continue
        if isinstance(payload, StaleShardMap):
            redirects += 1
            if redirects >= MAX_REDIRECTS:
                raise Unavailable(
                    f"shard map of {link.cluster!r} kept changing; gave up after {redirects} tries"
                )
            yield REFRESH
            continue
        if isinstance(payload, StateError):
            raise payload
        raise StateError(f"shard returned a malformed result: {payload!r}")


def exchange(
    link: ClusterLink,
    shard: int,
    slots: list[Slot],
    packed: bytes,
    lane: str | None = None,
    first: Any = None,
    on_retry: Callable[[], None] | None = None,
) -> Proc:
    """Send one batch (or take the answer ``first`` to it: sent earlier, or in hand), resending it
    whole while its shard restarts; settle its slots, each with its own outcome.

    Returns the tail of ``slots`` the shard deferred (not settled: send it again, in order).
    ``on_retry`` is called before a resend (a lane stops sending behind this batch meanwhile).
    """
    backoff: Backoff | None = None
    while True:
        try:
            resend = lane is not None and backoff is not None  # after a crash: the lane resumes
            raw = yield (Receive(first) if first is not None else Send(shard, packed, lane, resend))
            results = answers(raw)
            break
        except ShardGone as exc:  # the shard died (or the connection broke): send it all again
            first = None
            if on_retry is not None:
                on_retry()
            backoff = backoff or Backoff(link)
            try:
                yield Retry(backoff, exc)
                yield REFRESH
            except StateError as err:
                fail(slots, err)
                return []
        except StateError as exc:
            fail(slots, exc)
            return []
        except Exception as exc:  # a timeout, an unknown failure of the transport
            fail(slots, link.unavailable(exc))
            return []
    cut = deferred_from(results, len(slots))
    reason = results[cut][1] if cut < len(slots) else None
    deferred, slots, results = slots[cut:], slots[:cut], results[:cut]
    if isinstance(reason, ShardLoading):  # wait a little before the deferred calls go again
        try:
            yield Pause(link.wait_for_load(shard, reason))
        except StateError as err:
            fail(deferred, err)
            deferred = []
    elif not deferred:
        link.loading_since.pop(shard, None)
    whole = len(results) == len(slots)  # else: one error for the whole batch; each goes alone
    for i, slot in enumerate(slots):
        result = results[i] if whole else None
        try:
            if result is not None and result[0]:
                slot.settle(True, decode_payload(slot.req, result[1]))
            elif result is None or _is_retry(result[1]):  # re-route it after a map refresh
                slot.settle(True, (yield from call(link, slot.req)))
            elif isinstance(result[1], StateError):
                slot.settle(False, result[1])
            else:
                slot.settle(False, StateError(f"shard returned a malformed result: {result[1]!r}"))
        except StateError as exc:
            slot.settle(False, exc)
        except Exception as exc:  # a bug must not leave this call (or another caller's) without an answer
            slot.settle(False, StateError(f"internal error: {type(exc).__name__}: {exc}"))
    return deferred


def deliver(link: ClusterLink, shard: int, slots: list[Slot]) -> Proc:
    """Send queued calls to ``shard`` in order, in batches of a bounded size, until every one is
    settled (a call whose operand cannot be pickled fails alone)."""
    while slots:
        count = 1 if len(slots) == 1 else fits(request_sizes(s.req for s in slots))
        batch, slots = slots[:count], slots[count:]
        batch, packed = packed_batch(batch)
        while batch:
            batch = yield from exchange(link, shard, batch, packed)
            if batch:  # a deferred tail: send it again
                packed = pack([s.req.cmd for s in batch])
    return None


def packed_batch(slots: list[Slot]) -> tuple[list[Slot], bytes]:
    """``(the slots whose command can be pickled, their packed batch)``; the others fail with
    :class:`InvalidInput`."""
    try:
        return slots, pack([s.req.cmd for s in slots])
    except InvalidInput:
        pass
    kept = []
    for slot in slots:
        try:
            pack([slot.req.cmd])
            kept.append(slot)
        except InvalidInput as exc:
            slot.settle(False, exc)
    return kept, (pack([s.req.cmd for s in kept]) if kept else b"")


def call_many(link: ClusterLink, reqs: Sequence[Request]) -> Proc:
    """Send many requests, one batch per shard at once; ``(True, value)`` or ``(False, error)`` each,
    in order. Requests larger together than a batch's byte budget leave in several rounds, in order.
    A call that cannot be pickled fails the whole bulk call, sending nothing."""
    out: list[tuple[bool, Any]] = []
    sizes = request_sizes(reqs)
    while len(out) < len(reqs):
        count = fits(sizes[len(out) :])
        out.extend((yield from _round(link, reqs[len(out) : len(out) + count])))
    return out


def _round(link: ClusterLink, reqs: Sequence[Request]) -> Proc:
    view: ShardView = yield CURRENT
    by_shard: dict[int, list[Slot]] = {}
    slots = [Slot(req) for req in reqs]
    for slot in slots:
        by_shard.setdefault(view.owners[slot_of(slot.req.group_id)], []).append(slot)
    packed = {s: pack([slot.req.cmd for slot in batch]) for s, batch in by_shard.items()}  # before any send
    answers = yield SendMany([(s, packed[s]) for s in by_shard])
    for (shard, batch), answer in zip(by_shard.items(), answers, strict=True):
        deferred = yield from exchange(link, shard, batch, packed[shard], first=answer)
        while deferred:
            deferred = yield from exchange(link, shard, deferred, pack([s.req.cmd for s in deferred]))
    out: list[tuple[bool, Any]] = []
    for slot in slots:
        if slot.ok and isinstance(slot.value, Page):
            try:
                slot.value = yield from rest(link, slot.value)
            except StateError as exc:
                slot.settle(False, exc)
        out.append((slot.ok, slot.value))
    return out


def list_groups(link: ClusterLink) -> Proc:
    """Every non-empty user group of the cluster, sorted (asks every shard at once)."""
    per_shard = yield from _ask_every_shard(link, GROUPS_COMMAND)
    return merge_groups([(True, payload) for payload in per_shard])


def group_counts(link: ClusterLink) -> Proc:
    """Every non-empty user group of the cluster with its item count, sorted by group."""
    per_shard = yield from _ask_every_shard(link, COUNTS_COMMAND)
    return dict(sorted(pair for payload in per_shard for pair in payload))


def _ask_every_shard(link: ClusterLink, cmd: Any) -> Proc:
    """The payload of one command sent to every shard at once, in shard order."""
    view: ShardView = yield CURRENT
    packed = pack([cmd])
    answers = yield SendMany([(s, packed) for s in range(len(view.shards))])
    per_shard = []
    for shard, answer in enumerate(answers):
        per_shard.append((yield from _ask(link, shard, packed, answer)))
    return per_shard


def _ask(link: ClusterLink, shard: int, packed: bytes, answer: Any = None) -> Proc:
    """The payload of a one-command batch for ``shard`` itself (not routed by group), waiting
    while the shard restarts or loads."""
    backoff: Backoff | None = None
    while True:
        try:
            results = answers((yield Receive(answer) if answer is not None else Send(shard, packed)))
        except ShardGone as exc:
            answer = None
            backoff = backoff or Backoff(link)
            yield Retry(backoff, exc)
            yield REFRESH
            continue
        answer = None
        ok, payload = results[0]
        if ok:
            return payload
        if isinstance(payload, (ShardLoading, Deferred)):
            backoff = backoff or Backoff(link)
            yield Retry(backoff, payload)
            continue
        raise payload if isinstance(payload, StateError) else StateError(f"malformed result: {payload!r}")


def deferred_from(results: Sequence[tuple[bool, Any]], count: int) -> int:
    """Where the deferred tail of a batch's answer starts (``count``: nothing was deferred)."""
    if len(results) != count:
        return count  # one answer for the whole batch: each call is sent again on its own
    for index, (ok, payload) in enumerate(results):
        if not ok and isinstance(payload, Deferred):
            return index
    return count
