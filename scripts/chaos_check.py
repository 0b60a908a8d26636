#!/usr/bin/env python3
"""Check the delivery guarantees of a Herald chaos run from its logs.

Usage:
    chaos_check.py --acks ACKS.jsonl --received RECEIVED.jsonl [--faults FAULTS.jsonl]
                   [--redelivery-window-ms MS] [--json]

Inputs (JSON Lines, one object per line, blank lines ignored; times are milliseconds
from a common origin; an optional field may be absent or null):

  ACKS      one line per publish the broker acknowledged to a publisher:
            {"topic": "t1", "sequence": 123, "event_id": "evt_...", "acked_ms": 10.5,
             "subscriptions": ["sub_a", "sub_b"], "subscription_count": 2}
            `subscriptions` is the test's own matching of the topic; the optional integer
            `subscription_count` is Herald's (the publish response's count of the
            subscriptions it fanned the event out to); absent, it is unchecked.
            Lines repeating an event_id (a publisher retry answered with the original)
            are merged, keeping the earliest acked_ms. The same event_id with another
            (topic, sequence), or the same (topic, sequence) with another event_id, is
            an "inconsistent ack".
  RECEIVED  one line per HTTP request a receiver got (every attempt):
            {"subscription": "sub_a", "topic": "t1", "sequence": 123, "previous": 100,
             "event_id": "evt_...", "arrived_ms": 12.3, "answered_ms": 12.8, "status": 200,
             "redelivery": false}
            A 2xx status is a successful delivery; anything else a failed attempt.
            The optional boolean `redelivery` (false when absent) is true when the request
            carried Herald's `herald-redelivery` header: an operator's redrive or replay,
            deliberately out of the partition's order.
  FAULTS    (optional) {"at_ms": 5000.0, "fault": "kill -9", "instance": 0}

A partition is the pair (topic, subscription). "Before" and "after" follow arrival order,
ties broken by line order. Checks, per partition:

  lost             acknowledged (event, subscription) pairs with no 2xx request carrying
                   that event (same topic, sequence and event_id).
  out-of-order     first successful deliveries (one per sequence, in arrival order) whose
                   sequence is lower than an earlier first delivery's.
  chain breaks     first deliveries whose `previous` differs from the sequence of the
                   preceding first delivery.
  first previous   the partition's first successful delivery must have `previous` 0, unless
                   the ACKS say an earlier event went to the partition: its `previous` is
                   then the sequence (lower than its own) of an acknowledged event of the
                   topic listing the subscription, whose absence is reported as lost.
  early requests   requests (any status, any attempt) for a sequence that arrived before
                   the first success of a lower sequence of the partition: Herald sent n+1
                   before n succeeded. Every lower sequence successfully delivered anywhere
                   in the log counts (a run without dead letters delivers all of them).
  backward         requests (any status) for a sequence lower than the highest one already
  redeliveries     first-delivered in the partition are allowed only within the window after
                   a fault: at_ms <= arrived_ms <= at_ms + --redelivery-window-ms (default
                   9000: a pause of lease + 3 s, then a lease and a rescan). Those outside
                   every window (all of them without FAULTS) fail the run.
  duplicates       2xx requests beyond the first for a sequence (allowed); "late" ones
                   arrived after the first delivery of a higher sequence (counted; as
                   backward requests they must also fall within a fault's window).
  overlapping      requests that arrived (strictly) before an earlier request of the same
                   partition was answered: one sender per partition means none overlap.
  event id         2xx requests whose (topic, sequence) was acknowledged for another
  mismatches       event_id (the broker delivered the wrong event under that sequence).

And per acknowledgement:

  subscription     ack lines whose `subscription_count` differs from the length of their
  count mismatches `subscriptions`, and retried acks (same event_id) whose counts differ.

Requests with `redelivery` true are exempt from the early-request and backward checks and
are left out of the first successes and highest sequences those two checks compare with;
they take part in every other check.

Received events that were never acknowledged (the ack was lost on its way to the
publisher) are legitimate and take part in the order, chain and overlap checks.

Latency is first-success arrival minus acknowledgement, per delivered acknowledged pair.
With FAULTS, each fault also gets the max latency of pairs whose event was acknowledged
within 1 s of it, which bounds the failover time after that fault.

Output: a human-readable report, one figure per line, ending with `verdict: OK` or
`verdict: FAILED (...)`; with --json one JSON object with the same figures.

Exit status: 0 when nothing is lost, out of order, chained wrongly (including the first
previous), early, backward outside a fault window, overlapping, inconsistently
acknowledged, mismatched or miscounted; 1 otherwise; 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import defaultdict
from dataclasses import dataclass

MAX_EXAMPLES = 10
FAILOVER_WINDOW_MS = 1000.0
REDELIVERY_WINDOW_MS = 9000.0

NUMBER = (int, float)
ACK_FIELDS = {
    "topic": str,
    "sequence": int,
    "event_id": str,
    "acked_ms": NUMBER,
    "subscriptions": list,
}
ACK_OPTIONAL = {"subscription_count": int}
RECEIVED_FIELDS = {
    "subscription": str,
    "topic": str,
    "sequence": int,
    "previous": int,
    "event_id": str,
    "arrived_ms": NUMBER,
    "answered_ms": NUMBER,
    "status": int,
}
RECEIVED_OPTIONAL = {"redelivery": bool}
FAULT_FIELDS = {"at_ms": NUMBER, "fault": str}

# (result key, name in the verdict) of every check that fails the run.
FAILING_CHECKS = [
    ("lost", "lost"),
    ("out_of_order", "out-of-order"),
    ("chain_breaks", "chain breaks"),
    ("first_previous", "first previous"),
    ("early_requests", "early requests"),
    ("backward_redeliveries", "backward redeliveries"),
    ("overlapping", "overlapping"),
    ("inconsistent_acks", "inconsistent acks"),
    ("event_id_mismatches", "event id mismatches"),
    ("subscription_count_mismatches", "subscription count mismatches"),
]


class InputError(Exception):
    """Unreadable input: a missing file, a bad JSON line or a missing field."""


@dataclass(frozen=True)
class Event:
    """One acknowledged event (retries merged)."""

    event_id: str
    topic: str
    sequence: int
    acked_ms: float
    subscriptions: tuple[str, ...]
    subscription_count: int | None = None


@dataclass(frozen=True)
class Request:
    """One HTTP request a receiver got; `index` is its line number (a tie-breaker).

    `redelivery` is whether it carried the `herald-redelivery` header.
    """

    index: int
    subscription: str
    topic: str
    sequence: int
    previous: int
    event_id: str
    arrived_ms: float
    answered_ms: float
    status: int
    redelivery: bool = False

    @property
    def partition(self) -> tuple[str, str]:
        return (self.topic, self.subscription)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def key(self) -> tuple[float, int]:
        """Its place in arrival order (line order breaks ties)."""
        return (self.arrived_ms, self.index)

    def describe(self) -> str:
        return (
            f"{self.topic}/{self.subscription} sequence {self.sequence} "
            f"({self.event_id}) at {self.arrived_ms:.1f} ms"
        )


@dataclass(frozen=True)
class Fault:
    """One injected fault, for the failover figures."""

    at_ms: float
    fault: str
    instance: object


# ---------------------------------------------------------------------------
# Reading


def type_ok(value, expected) -> bool:
    """Whether `value` has the expected JSON type (booleans are not numbers)."""
    if isinstance(value, bool):
        return expected is bool
    return isinstance(value, expected)


def read_jsonl(path: str, fields: dict, optional: dict | None = None) -> list[tuple[int, dict]]:
    """Read a JSON Lines file into (line number, object) pairs, checking `fields`.

    `optional` fields may be absent or null (both read as absent: the key is dropped).
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from error
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: bad JSON: {error}") from error
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object")
        for name, expected in fields.items():
            if name not in record:
                raise InputError(f"{path}:{number}: missing field {name!r}")
            if not type_ok(record[name], expected):
                raise InputError(f"{path}:{number}: field {name!r} has the wrong type")
        for name, expected in (optional or {}).items():
            if record.get(name) is None:
                record.pop(name, None)
            elif not type_ok(record[name], expected):
                raise InputError(f"{path}:{number}: field {name!r} has the wrong type")
        records.append((number, record))
    return records


def load_acks(path: str) -> tuple[dict[str, Event], list[str], list[str]]:
    """Read ACKS and merge retried publishes.

    Return (events by id, inconsistencies, subscription-count mismatches).
    """
    events: dict[str, Event] = {}
    by_key: dict[tuple[str, int], str] = {}
    inconsistent: list[str] = []
    miscounted: list[str] = []
    for number, record in read_jsonl(path, ACK_FIELDS, ACK_OPTIONAL):
        subscriptions = record["subscriptions"]
        if not all(isinstance(s, str) for s in subscriptions):
            raise InputError(f"{path}:{number}: subscriptions must be strings")
        event = Event(
            record["event_id"],
            record["topic"],
            record["sequence"],
            float(record["acked_ms"]),
            tuple(subscriptions),
            record.get("subscription_count"),
        )
        miscounted += count_mismatch(number, event)
        key = (event.topic, event.sequence)
        known = events.get(event.event_id)
        if known is not None:
            if (known.topic, known.sequence) != key:
                inconsistent.append(
                    f"line {number}: {event.event_id} acked as {event.topic}/{event.sequence},"
                    f" earlier as {known.topic}/{known.sequence}"
                )
                continue
            miscounted += retry_count_mismatch(number, known, event)
            events[event.event_id] = merge_events(known, event)
            continue
        if key in by_key:
            inconsistent.append(
                f"line {number}: {event.topic}/{event.sequence} acked for {event.event_id},"
                f" earlier for {by_key[key]}"
            )
        else:
            by_key[key] = event.event_id
        events[event.event_id] = event
    return events, inconsistent, miscounted


def count_mismatch(number: int, event: Event) -> list[str]:
    """Describe an ack line whose subscription_count is not its number of subscriptions."""
    if event.subscription_count is None or event.subscription_count == len(event.subscriptions):
        return []
    return [
        f"line {number}: {event.topic}/{event.sequence} ({event.event_id}) subscription_count"
        f" {event.subscription_count}, {len(event.subscriptions)} subscriptions"
    ]


def retry_count_mismatch(number: int, known: Event, retry: Event) -> list[str]:
    """Describe a retried ack whose subscription_count differs from the earlier one's."""
    counts = (known.subscription_count, retry.subscription_count)
    if None in counts or counts[0] == counts[1]:
        return []
    return [
        f"line {number}: {retry.event_id} acked with subscription_count {counts[1]},"
        f" earlier with {counts[0]}"
    ]


def merge_events(known: Event, retry: Event) -> Event:
    """Merge a retried ack into the known one: earliest ack, union of subscriptions.

    The known subscription_count is kept (the retry's when the known one has none).
    """
    subscriptions = known.subscriptions + tuple(
        s for s in retry.subscriptions if s not in known.subscriptions
    )
    return Event(
        known.event_id,
        known.topic,
        known.sequence,
        min(known.acked_ms, retry.acked_ms),
        subscriptions,
        retry.subscription_count if known.subscription_count is None
        else known.subscription_count,
    )


def load_received(path: str) -> list[Request]:
    """Read RECEIVED into requests."""
    return [
        Request(
            index=number,
            subscription=r["subscription"],
            topic=r["topic"],
            sequence=r["sequence"],
            previous=r["previous"],
            event_id=r["event_id"],
            arrived_ms=float(r["arrived_ms"]),
            answered_ms=float(r["answered_ms"]),
            status=r["status"],
            redelivery=r.get("redelivery", False),
        )
        for number, r in read_jsonl(path, RECEIVED_FIELDS, RECEIVED_OPTIONAL)
    ]


def load_faults(path: str | None) -> list[Fault]:
    """Read FAULTS (none without a path)."""
    if path is None:
        return []
    return [
        Fault(float(r["at_ms"]), r["fault"], r.get("instance"))
        for _, r in read_jsonl(path, FAULT_FIELDS)
    ]


# ---------------------------------------------------------------------------
# Per-partition checks


def by_partition(requests: list[Request]) -> dict[tuple[str, str], list[Request]]:
    """Group requests by partition, each group in arrival order (then line order)."""
    groups: dict[tuple[str, str], list[Request]] = defaultdict(list)
    for request in sorted(requests, key=lambda r: (r.arrived_ms, r.index)):
        groups[request.partition].append(request)
    return groups


def split_successes(requests: list[Request]) -> tuple[list[Request], list[Request]]:
    """Split a partition's 2xx requests (arrival order) into (first per sequence, duplicates)."""
    firsts, duplicates, seen = [], [], set()
    for request in requests:
        if not request.ok:
            continue
        if request.sequence in seen:
            duplicates.append(request)
        else:
            seen.add(request.sequence)
            firsts.append(request)
    return firsts, duplicates


def check_order(firsts: list[Request]) -> tuple[list[str], list[str]]:
    """Return (out-of-order, chain-break) descriptions for a partition's first deliveries."""
    out_of_order, chain_breaks = [], []
    highest = None
    for before, request in zip([None] + firsts, firsts):
        if highest is not None and request.sequence < highest:
            out_of_order.append(f"{request.describe()} after sequence {highest}")
        highest = request.sequence if highest is None else max(highest, request.sequence)
        if before is not None and request.previous != before.sequence:
            chain_breaks.append(
                f"{request.describe()}: previous {request.previous}, expected {before.sequence}"
            )
    return out_of_order, chain_breaks


def first_previous(firsts: list[Request], acked: dict[tuple[str, int], set[str]]) -> list[str]:
    """Describe the partition's first delivery if its `previous` is neither 0 nor explained.

    `acked` maps (topic, sequence) to the subscriptions the ACKS list for it: a nonzero
    `previous` is explained by an acknowledged lower sequence listing the subscription.
    """
    if not firsts or firsts[0].previous == 0:
        return []
    first = firsts[0]
    if (
        first.previous < first.sequence
        and first.subscription in acked.get((first.topic, first.previous), ())
    ):
        return []
    return [
        f"{first.describe()}: the partition's first delivery has previous {first.previous},"
        f" expected 0"
    ]


def early_requests(requests: list[Request]) -> list[str]:
    """Describe requests that arrived before the first success of a lower sequence.

    `requests` are a partition's in arrival order, redeliveries left out.
    """
    firsts, _ = split_successes(requests)
    firsts.sort(key=lambda r: r.sequence)
    sequences = [r.sequence for r in firsts]
    latest_so_far, latest = [], None
    for first in firsts:
        latest = first if latest is None or first.key > latest.key else latest
        latest_so_far.append(latest)
    found = []
    for request in requests:
        count = bisect.bisect_left(sequences, request.sequence)
        if count and request.key < latest_so_far[count - 1].key:
            blocker = latest_so_far[count - 1]
            found.append(
                f"{request.describe()}, status {request.status}: before the first success"
                f" of sequence {blocker.sequence} at {blocker.arrived_ms:.1f} ms"
            )
    return found


def latest_fault(fault_times: list[float], at_ms: float) -> float | None:
    """The latest of the sorted `fault_times` at or before `at_ms`, or None."""
    count = bisect.bisect_right(fault_times, at_ms)
    return fault_times[count - 1] if count else None


def backward_requests(requests: list[Request], fault_times: list[float], window_ms: float):
    """Sort backward requests (below the highest sequence delivered so far) by fault window.

    `requests` are a partition's in arrival order, redeliveries left out; `fault_times`
    are sorted. Return (count within a window, descriptions of those outside every one).
    """
    within, outside, highest = 0, [], None
    for request in requests:
        if highest is not None and request.sequence < highest:
            fault = latest_fault(fault_times, request.arrived_ms)
            if fault is not None and request.arrived_ms <= fault + window_ms:
                within += 1
            else:
                since = "no fault before it" if fault is None else (
                    f"{request.arrived_ms - fault:.1f} ms after the fault at {fault:.1f} ms"
                )
                outside.append(
                    f"{request.describe()}, status {request.status}: after sequence"
                    f" {highest}, {since}"
                )
        if request.ok:
            highest = request.sequence if highest is None else max(highest, request.sequence)
    return within, outside


def late_duplicates(firsts: list[Request], duplicates: list[Request]) -> list[str]:
    """Describe duplicates that arrived after the first delivery of a higher sequence."""
    times = [r.arrived_ms for r in firsts]
    highest_so_far, highest = [], None
    for request in firsts:
        highest = request.sequence if highest is None else max(highest, request.sequence)
        highest_so_far.append(highest)
    late = []
    for duplicate in duplicates:
        count = bisect.bisect_left(times, duplicate.arrived_ms)
        if count and highest_so_far[count - 1] > duplicate.sequence:
            late.append(f"{duplicate.describe()} after sequence {highest_so_far[count - 1]}")
    return late


def overlapping(requests: list[Request]) -> list[str]:
    """Describe requests that arrived before an earlier request of the partition was answered."""
    found, busy_until, busy_with = [], None, None
    for request in requests:
        if busy_until is not None and request.arrived_ms < busy_until:
            found.append(
                f"{request.describe()} while sequence {busy_with.sequence}"
                f" was unanswered until {busy_until:.1f} ms"
            )
        if busy_until is None or request.answered_ms > busy_until:
            busy_until, busy_with = request.answered_ms, request
    return found


# ---------------------------------------------------------------------------
# Acknowledged pairs


def first_success_times(requests: list[Request]) -> dict[tuple, float]:
    """Earliest 2xx arrival per (topic, subscription, sequence, event_id)."""
    times: dict[tuple, float] = {}
    for request in requests:
        if request.ok:
            key = (request.topic, request.subscription, request.sequence, request.event_id)
            times[key] = min(times.get(key, request.arrived_ms), request.arrived_ms)
    return times


def check_pairs(events: dict[str, Event], requests: list[Request]):
    """Return (lost descriptions, latencies) of the acknowledged (event, subscription) pairs.

    Each latency is (ms, event, subscription).
    """
    arrivals = first_success_times(requests)
    lost, latencies = [], []
    for event in sorted(events.values(), key=lambda e: (e.topic, e.sequence)):
        for subscription in event.subscriptions:
            key = (event.topic, subscription, event.sequence, event.event_id)
            if key in arrivals:
                latencies.append((arrivals[key] - event.acked_ms, event, subscription))
            else:
                lost.append(
                    f"{event.topic}/{subscription} sequence {event.sequence} ({event.event_id})"
                    f" acked at {event.acked_ms:.1f} ms"
                )
    return lost, latencies


def event_id_mismatches(events: dict[str, Event], requests: list[Request]) -> list[str]:
    """Describe 2xx requests carrying another event than the one acked under their sequence."""
    acked = {}
    for event in events.values():
        acked.setdefault((event.topic, event.sequence), event.event_id)
    found = []
    for request in requests:
        expected = acked.get((request.topic, request.sequence))
        if request.ok and expected is not None and request.event_id != expected:
            found.append(f"{request.describe()}: acked as {expected}")
    return found


def percentile(values: list[float], percent: int) -> float:
    """Nearest-rank percentile of sorted, non-empty `values` (integer arithmetic)."""
    rank = max(1, -(-len(values) * percent // 100))
    return values[rank - 1]


def latency_summary(latencies) -> dict | None:
    """p50, p99 and max latency (ms) and the slowest pair, or None without deliveries."""
    if not latencies:
        return None
    values = sorted(ms for ms, _, _ in latencies)
    slowest_ms, event, subscription = max(latencies, key=lambda item: item[0])
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": slowest_ms,
        "slowest": {
            "topic": event.topic,
            "subscription": subscription,
            "sequence": event.sequence,
            "event_id": event.event_id,
        },
    }


def failover(faults: list[Fault], latencies) -> list[dict]:
    """Max latency of the pairs acked within FAILOVER_WINDOW_MS of each fault."""
    report = []
    for fault in faults:
        window = [
            ms
            for ms, event, _ in latencies
            if abs(event.acked_ms - fault.at_ms) <= FAILOVER_WINDOW_MS
        ]
        report.append(
            {
                "fault": fault.fault,
                "instance": fault.instance,
                "at_ms": fault.at_ms,
                "max_latency_ms": max(window) if window else None,
            }
        )
    return report


# ---------------------------------------------------------------------------
# Putting it together


def acked_subscriptions(events: dict[str, Event]) -> dict[tuple[str, int], set[str]]:
    """The subscriptions the ACKS list per (topic, sequence)."""
    acked: dict[tuple[str, int], set[str]] = defaultdict(set)
    for event in events.values():
        acked[(event.topic, event.sequence)].update(event.subscriptions)
    return acked


def analyse(events, inconsistent, requests, faults, miscounted=(),
            redelivery_window_ms=REDELIVERY_WINDOW_MS) -> dict:
    """Run every check and return the figures (the --json object)."""
    found = defaultdict(list)
    duplicate_count = backward_within = 0
    acked = acked_subscriptions(events)
    fault_times = sorted(fault.at_ms for fault in faults)
    for partition_requests in by_partition(requests).values():
        firsts, duplicates = split_successes(partition_requests)
        out_of_order, chain_breaks = check_order(firsts)
        found["out_of_order"] += out_of_order
        found["chain_breaks"] += chain_breaks
        found["first_previous"] += first_previous(firsts, acked)
        in_order = [r for r in partition_requests if not r.redelivery]
        found["early_requests"] += early_requests(in_order)
        within, outside = backward_requests(in_order, fault_times, redelivery_window_ms)
        backward_within += within
        found["backward_redeliveries"] += outside
        found["late_duplicates"] += late_duplicates(firsts, duplicates)
        found["overlapping"] += overlapping(partition_requests)
        duplicate_count += len(duplicates)
    lost, latencies = check_pairs(events, requests)
    found["lost"] = lost
    found["inconsistent_acks"] = inconsistent
    found["event_id_mismatches"] = event_id_mismatches(events, requests)
    found["subscription_count_mismatches"] = list(miscounted)

    result = {
        "events": len(events),
        "expected_deliveries": sum(len(e.subscriptions) for e in events.values()),
        "deliveries": sum(1 for r in requests if r.ok),
        "attempts": len(requests),
        "redeliveries": sum(1 for r in requests if r.redelivery),
        "lost": len(found["lost"]),
        "out_of_order": len(found["out_of_order"]),
        "chain_breaks": len(found["chain_breaks"]),
        "first_previous": len(found["first_previous"]),
        "early_requests": len(found["early_requests"]),
        "backward_redeliveries": len(found["backward_redeliveries"]),
        "backward_after_faults": backward_within,
        "redelivery_window_ms": redelivery_window_ms,
        "duplicates": duplicate_count,
        "late_duplicates": len(found["late_duplicates"]),
        "overlapping": len(found["overlapping"]),
        "inconsistent_acks": len(found["inconsistent_acks"]),
        "event_id_mismatches": len(found["event_id_mismatches"]),
        "subscription_count_mismatches": len(found["subscription_count_mismatches"]),
        "latency_ms": latency_summary(latencies),
        "failover": failover(faults, latencies),
    }
    result["failed_checks"] = [name for key, name in FAILING_CHECKS if result[key]]
    result["ok"] = not result["failed_checks"]
    result["examples"] = {key: found[key][:MAX_EXAMPLES] for key in sorted(found) if found[key]}
    return result


def ms(value) -> str:
    """Format milliseconds with one decimal, or n/a."""
    return "n/a" if value is None else f"{value:.1f}"


def format_report(result: dict) -> str:
    """The human-readable report: one figure per line, examples indented below."""
    examples = result["examples"]

    def figure(label, key, text=None):
        lines = [f"{label}: {result[key] if text is None else text}"]
        lines += [f"  {example}" for example in examples.get(key, [])]
        return lines

    lines = [
        f"events: {result['events']}",
        f"expected deliveries: {result['expected_deliveries']}",
        f"deliveries: {result['deliveries']}",
        f"attempts: {result['attempts']}",
        f"redelivered requests: {result['redeliveries']}",
        *figure("lost", "lost"),
        *figure("out-of-order first deliveries", "out_of_order"),
        *figure("chain breaks", "chain_breaks"),
        *figure("first deliveries with a wrong previous", "first_previous"),
        *figure("early requests", "early_requests"),
        *figure("backward redeliveries outside a fault window", "backward_redeliveries",
                f"{result['backward_redeliveries']} (within"
                f" {ms(result['redelivery_window_ms'])} ms of a fault:"
                f" {result['backward_after_faults']})"),
        *figure("duplicates", "late_duplicates",
                f"{result['duplicates']} (late: {result['late_duplicates']})"),
        *figure("overlapping requests", "overlapping"),
        *figure("inconsistent acks", "inconsistent_acks"),
        *figure("event id mismatches", "event_id_mismatches"),
        *figure("subscription count mismatches", "subscription_count_mismatches"),
    ]
    latency = result["latency_ms"]
    if latency is None:
        lines.append("latency ms: n/a")
    else:
        slowest = latency["slowest"]
        lines.append(
            f"latency ms: p50 {ms(latency['p50'])} p99 {ms(latency['p99'])}"
            f" max {ms(latency['max'])}"
        )
        lines.append(
            f"slowest delivery: {slowest['topic']}/{slowest['subscription']}"
            f" sequence {slowest['sequence']} ({slowest['event_id']})"
        )
    for item in result["failover"]:
        where = "" if item["instance"] is None else f" on instance {item['instance']}"
        lines.append(
            f"failover after {item['fault']}{where}: max latency {ms(item['max_latency_ms'])} ms"
        )
    if result["ok"]:
        lines.append("verdict: OK")
    else:
        lines.append(f"verdict: FAILED ({', '.join(result['failed_checks'])})")
    return "\n".join(lines)


def parse_args(argv):
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Check the logs of a Herald chaos run.")
    parser.add_argument("--acks", required=True, help="acknowledged publishes (JSON Lines)")
    parser.add_argument("--received", required=True, help="receiver requests (JSON Lines)")
    parser.add_argument("--faults", help="injected faults (JSON Lines)")
    parser.add_argument(
        "--redelivery-window-ms", type=float, default=REDELIVERY_WINDOW_MS, metavar="MS",
        help="how long after a fault a backward request is allowed"
             f" (default {REDELIVERY_WINDOW_MS:g})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not args.redelivery_window_ms >= 0:
        parser.error("--redelivery-window-ms must be a number >= 0")
    return args


def main(argv=None) -> int:
    """Run the checker; return the exit status."""
    args = parse_args(argv)
    try:
        events, inconsistent, miscounted = load_acks(args.acks)
        requests = load_received(args.received)
        faults = load_faults(args.faults)
    except InputError as error:
        print(f"chaos_check: {error}", file=sys.stderr)
        return 2
    result = analyse(events, inconsistent, requests, faults, miscounted,
                     args.redelivery_window_ms)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
