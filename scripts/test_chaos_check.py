"""Unit tests for chaos_check.py: tiny logs in temporary files, checker run in-process.

Run with `python3 -m unittest scripts/test_chaos_check.py` (or from scripts/,
`python3 -m unittest test_chaos_check`).
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos_check  # noqa: E402


def ack(sequence, subscriptions=("sub_a",), topic="t1", event_id=None, acked_ms=None,
        subscription_count=None):
    """One ACKS line (subscription_count only when given)."""
    line = {
        "topic": topic,
        "sequence": sequence,
        "event_id": event_id or f"evt_{topic}_{sequence}",
        "acked_ms": float(sequence * 10) if acked_ms is None else acked_ms,
        "subscriptions": list(subscriptions),
    }
    if subscription_count is not None:
        line["subscription_count"] = subscription_count
    return line


def req(sequence, previous, arrived, answered=None, status=200, subscription="sub_a",
        topic="t1", event_id=None, redelivery=None):
    """One RECEIVED line (redelivery only when given)."""
    line = {
        "subscription": subscription,
        "topic": topic,
        "sequence": sequence,
        "previous": previous,
        "event_id": event_id or f"evt_{topic}_{sequence}",
        "arrived_ms": float(arrived),
        "answered_ms": float(arrived + 1 if answered is None else answered),
        "status": status,
    }
    if redelivery is not None:
        line["redelivery"] = redelivery
    return line


def fault(at_ms, name="kill -9", instance=0):
    """One FAULTS line."""
    return {"at_ms": float(at_ms), "fault": name, "instance": instance}


def clean_received():
    """Sequences 1..3 of t1 delivered in order to sub_a, 2 ms after each ack."""
    return [req(1, 0, 12), req(2, 1, 22), req(3, 2, 32)]


class CheckerTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def write(self, name, lines):
        """Write JSON Lines (objects, or raw strings as-is) and return the path."""
        path = os.path.join(self.dir.name, name)
        with open(path, "w", encoding="utf-8") as file:
            for line in lines:
                file.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
        return path

    def run_checker(self, acks, received, faults=None, as_json=True, window_ms=None):
        """Run the checker; return (exit status, parsed JSON or report text, stderr)."""
        argv = ["--acks", self.write("acks.jsonl", acks),
                "--received", self.write("received.jsonl", received)]
        if faults is not None:
            argv += ["--faults", self.write("faults.jsonl", faults)]
        if window_ms is not None:
            argv += ["--redelivery-window-ms", str(window_ms)]
        if as_json:
            argv.append("--json")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = chaos_check.main(argv)
        text = out.getvalue()
        return status, (json.loads(text) if as_json and status != 2 else text), err.getvalue()

    def test_clean_run(self):
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], clean_received())
        self.assertEqual(status, 0)
        self.assertTrue(result["ok"])
        self.assertEqual(result["events"], 3)
        self.assertEqual(result["expected_deliveries"], 3)
        self.assertEqual(result["deliveries"], 3)
        self.assertEqual(result["attempts"], 3)
        for key in ("lost", "out_of_order", "chain_breaks", "duplicates", "overlapping",
                    "inconsistent_acks", "first_previous", "early_requests",
                    "backward_redeliveries", "backward_after_faults",
                    "subscription_count_mismatches", "redeliveries"):
            self.assertEqual(result[key], 0, key)
        self.assertEqual(result["latency_ms"]["max"], 2.0)

    def test_text_report(self):
        status, text, _ = self.run_checker([ack(1), ack(2), ack(3)], clean_received(),
                                           as_json=False)
        self.assertEqual(status, 0)
        lines = text.splitlines()
        for expected in ("events: 3", "expected deliveries: 3", "deliveries: 3",
                         "attempts: 3", "lost: 0", "out-of-order first deliveries: 0",
                         "chain breaks: 0", "duplicates: 0 (late: 0)",
                         "overlapping requests: 0", "latency ms: p50 2.0 p99 2.0 max 2.0",
                         "redelivered requests: 0", "first deliveries with a wrong previous: 0",
                         "early requests: 0", "subscription count mismatches: 0",
                         "backward redeliveries outside a fault window: 0"
                         " (within 9000.0 ms of a fault: 0)"):
            self.assertIn(expected, lines)
        self.assertEqual(lines[-1], "verdict: OK")
        self.assertNotRegex(text, r"\d+ passed, \d+ failed")

    def test_lost_pair(self):
        acks = [ack(1), ack(2, subscriptions=("sub_a", "sub_b")), ack(3)]
        received = clean_received() + [req(2, 0, 25, status=500, subscription="sub_b")]
        status, result, _ = self.run_checker(acks, received, as_json=False)
        self.assertEqual(status, 1)
        self.assertIn("lost: 1", result)
        self.assertIn("t1/sub_b sequence 2", result)
        self.assertIn("verdict: FAILED (lost)", result)

    def test_out_of_order_first_delivery(self):
        received = [req(1, 0, 12), req(3, 1, 22), req(2, 3, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual(result["out_of_order"], 1)
        self.assertEqual(result["lost"], 0)
        # 3 was sent before 2 succeeded, and 2 came back below 3 with no fault.
        self.assertEqual((result["early_requests"], result["backward_redeliveries"]), (1, 1))

    def test_chain_break(self):
        received = [req(1, 0, 12), req(2, 1, 22), req(3, 1, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual(result["chain_breaks"], 1)
        self.assertEqual(result["out_of_order"], 0)
        self.assertIn("previous 1, expected 2", result["examples"]["chain_breaks"][0])

    def test_failed_attempts_do_not_count_in_chain(self):
        received = [req(1, 0, 12), req(2, 1, 20, status=503), req(2, 1, 22), req(3, 2, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 0)
        self.assertEqual((result["attempts"], result["deliveries"]), (4, 3))

    def test_overlap(self):
        received = [req(1, 0, 12, answered=30), req(2, 1, 22), req(3, 2, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual(result["overlapping"], 1)
        self.assertEqual(result["failed_checks"], ["overlapping"])

    def test_touching_requests_do_not_overlap(self):
        received = [req(1, 0, 12, answered=22), req(2, 1, 22), req(3, 2, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual((status, result["overlapping"]), (0, 0))

    def test_other_partitions_may_overlap(self):
        received = clean_received() + [req(1, 0, 12.5, subscription="sub_b")]
        acks = [ack(1, subscriptions=("sub_a", "sub_b")), ack(2), ack(3)]
        status, result, _ = self.run_checker(acks, received)
        self.assertEqual((status, result["overlapping"]), (0, 0))

    def test_duplicates_are_allowed(self):
        received = clean_received() + [req(3, 2, 40), req(2, 1, 50)]
        received[1:1] = [req(1, 0, 15)]  # redelivered before sequence 2: not late
        # The late duplicate of 2 (after 3) needs a fault shortly before it.
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received, [fault(45)])
        self.assertEqual(status, 0)
        self.assertEqual(result["duplicates"], 3)
        self.assertEqual(result["late_duplicates"], 1)
        self.assertEqual(result["deliveries"], 6)
        self.assertEqual((result["backward_after_faults"], result["backward_redeliveries"]),
                         (1, 0))

    def test_backward_request_without_a_fault(self):
        received = clean_received() + [req(3, 2, 40), req(2, 1, 50)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual(result["failed_checks"], ["backward redeliveries"])
        self.assertEqual((result["late_duplicates"], result["backward_redeliveries"]), (1, 1))
        self.assertIn("sequence 2", result["examples"]["backward_redeliveries"][0])
        self.assertIn("no fault before it", result["examples"]["backward_redeliveries"][0])

    def test_backward_failed_attempt_counts(self):
        received = clean_received() + [req(2, 1, 40, status=500)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual((status, result["backward_redeliveries"]), (1, 1))
        self.assertEqual(result["late_duplicates"], 0)  # a failed attempt is no duplicate
        self.assertIn("status 500", result["examples"]["backward_redeliveries"][0])

    def test_backward_request_window_bounds(self):
        received = clean_received() + [req(2, 1, 50)]
        acks = [ack(1), ack(2), ack(3)]
        # Inclusive at both ends: at the fault and exactly window_ms after it.
        for faults, window in (([fault(50)], 0), ([fault(45)], 5), ([fault(45)], 5.0)):
            status, result, _ = self.run_checker(acks, received, faults, window_ms=window)
            self.assertEqual((status, result["backward_after_faults"]), (0, 1), (faults, window))
        # Too long after the fault, or the only fault comes after the request.
        for faults, window in (([fault(45)], 4.9), ([fault(51)], 9000), ([], None)):
            status, result, _ = self.run_checker(acks, received, faults, window_ms=window)
            self.assertEqual((status, result["backward_redeliveries"]), (1, 1), (faults, window))
        # The latest fault before the request decides: an older one does not hide a newer one.
        status, result, _ = self.run_checker(acks, received, [fault(1), fault(44), fault(60)],
                                             window_ms=6)
        self.assertEqual((status, result["backward_after_faults"]), (0, 1))

    def test_default_window_is_nine_seconds(self):
        received = [req(1, 0, 12), req(2, 1, 22), req(3, 2, 32), req(2, 1, 9045)]
        acks = [ack(1), ack(2), ack(3)]
        status, result, _ = self.run_checker(acks, received, [fault(45)])
        self.assertEqual((status, result["redelivery_window_ms"]), (0, 9000.0))
        received[-1] = req(2, 1, 9045.5)
        status, result, _ = self.run_checker(acks, received, [fault(45)])
        self.assertEqual((status, result["backward_redeliveries"]), (1, 1))

    def test_redelivery_is_exempt_from_backward_and_early(self):
        acks = [ack(1), ack(2), ack(3)]
        backward = clean_received() + [req(2, 1, 40, redelivery=True)]
        early = [req(1, 0, 12), req(2, 1, 20, status=503), req(3, 2, 24, status=500, redelivery=True),
                 req(2, 1, 26), req(3, 2, 32)]
        for received in (backward, early):
            status, result, _ = self.run_checker(acks, received)
            self.assertEqual(status, 0, received)
            self.assertEqual(result["redeliveries"], 1)
        # The same requests without the header violate the rules.
        for received, key in ((backward, "backward_redeliveries"), (early, "early_requests")):
            plain = [dict(line, redelivery=False) for line in received]
            status, result, _ = self.run_checker(acks, plain)
            self.assertEqual((status, result[key], result["redeliveries"]), (1, 1, 0), key)

    def test_early_request_before_the_lower_sequence_succeeded(self):
        # 3 is tried (and fails) while 2 has only failed so far: n+1 before n succeeded.
        received = [req(1, 0, 12), req(2, 1, 20, status=503), req(3, 2, 24, status=500),
                    req(2, 1, 26), req(3, 2, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual(result["failed_checks"], ["early requests"])
        self.assertEqual(result["early_requests"], 1)
        self.assertIn("before the first success of sequence 2 at 26.0 ms",
                      result["examples"]["early_requests"][0])
        # Tried after 2 succeeded, it is in order.
        received[2] = req(3, 2, 28, status=500)
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual((status, result["early_requests"]), (0, 0))

    def test_early_request_counts_every_lower_sequence(self):
        # 4 is tried before 2 and 3 succeeded: the latest of those first successes is named.
        received = [req(1, 0, 10), req(4, 3, 15, status=500), req(2, 1, 20), req(3, 2, 30),
                    req(4, 3, 40)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3), ack(4)], received)
        self.assertEqual((status, result["early_requests"]), (1, 1))
        self.assertIn("sequence 4", result["examples"]["early_requests"][0])
        self.assertIn("sequence 3 at 30.0 ms", result["examples"]["early_requests"][0])

    def test_early_requests_stay_within_a_partition(self):
        # sub_a's 2 arrives before sub_b's 1 succeeded, and t2's 1 before t1's 2: both fine.
        acks = [ack(1, subscriptions=("sub_a", "sub_b")), ack(2, subscriptions=("sub_a", "sub_b")),
                ack(1, topic="t2")]
        received = [req(1, 0, 10), req(2, 1, 15), req(1, 0, 12, topic="t2"),
                    req(1, 0, 30, subscription="sub_b"), req(2, 1, 40, subscription="sub_b")]
        status, result, _ = self.run_checker(acks, received)
        self.assertEqual((status, result["early_requests"]), (0, 0))

    def test_first_previous_must_be_zero(self):
        received = [req(1, 5, 12), req(2, 1, 22), req(3, 2, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual(result["failed_checks"], ["first previous"])
        self.assertIn("previous 5, expected 0", result["examples"]["first_previous"][0])

    def test_first_previous_explained_by_the_acks(self):
        # Sequence 1 was acked for sub_a but never arrived: lost, and 2's previous 1 is right.
        received = [req(2, 1, 22), req(3, 2, 32)]
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual(result["failed_checks"], ["lost"])
        # Acked for another subscription only, 1 does not explain sub_a's previous 1.
        acks = [ack(1, subscriptions=("sub_b",)), ack(2), ack(3)]
        received = [req(1, 0, 12, subscription="sub_b")] + received
        status, result, _ = self.run_checker(acks, received)
        self.assertEqual(status, 1)
        self.assertEqual(result["failed_checks"], ["first previous"])

    def test_subscription_count(self):
        acks = [ack(1, subscription_count=1), ack(2, subscription_count=1), ack(3)]
        status, result, _ = self.run_checker(acks, clean_received())
        self.assertEqual((status, result["subscription_count_mismatches"]), (0, 0))
        acks[1] = ack(2, subscription_count=2)
        status, result, _ = self.run_checker(acks, clean_received())
        self.assertEqual(status, 1)
        self.assertEqual(result["failed_checks"], ["subscription count mismatches"])
        self.assertIn("subscription_count 2, 1 subscriptions",
                      result["examples"]["subscription_count_mismatches"][0])

    def test_subscription_count_of_retried_acks(self):
        received = clean_received() + [req(2, 0, 25, subscription="sub_b")]
        # Each line agrees with its own subscriptions, but the retries disagree.
        acks = [ack(1), ack(2, subscription_count=1),
                ack(2, subscriptions=("sub_a", "sub_b"), subscription_count=2), ack(3)]
        status, result, _ = self.run_checker(acks, received)
        self.assertEqual((status, result["subscription_count_mismatches"]), (1, 1))
        self.assertIn("subscription_count 2, earlier with 1",
                      result["examples"]["subscription_count_mismatches"][0])
        # A retry without a count (or with null) is not a disagreement.
        acks = [ack(1), ack(2, subscription_count=2, subscriptions=("sub_a", "sub_b")),
                dict(ack(2, subscriptions=("sub_a", "sub_b")), subscription_count=None),
                ack(2, subscriptions=("sub_a", "sub_b")), ack(3)]
        status, result, _ = self.run_checker(acks, received)
        self.assertEqual((status, result["subscription_count_mismatches"]), (0, 0))

    def test_new_fields_are_type_checked(self):
        status, _, err = self.run_checker([ack(1)], [req(1, 0, 12, redelivery="yes")])
        self.assertEqual(status, 2)
        self.assertIn("received.jsonl:1: field 'redelivery' has the wrong type", err)
        status, _, err = self.run_checker([ack(1, subscription_count=True)], [req(1, 0, 12)])
        self.assertEqual(status, 2)
        self.assertIn("acks.jsonl:1: field 'subscription_count' has the wrong type", err)

    def test_bad_window_argument(self):
        argv = ["--acks", self.write("acks.jsonl", [ack(1)]),
                "--received", self.write("received.jsonl", [req(1, 0, 12)]),
                "--redelivery-window-ms", "-1"]
        with contextlib.redirect_stderr(io.StringIO()) as err, \
                self.assertRaises(SystemExit) as raised:
            chaos_check.main(argv)
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("--redelivery-window-ms", err.getvalue())

    def test_unacknowledged_event_takes_part_in_checks(self):
        # Sequence 2 was published but its ack never reached the publisher.
        status, result, _ = self.run_checker([ack(1), ack(3)], clean_received())
        self.assertEqual(status, 0)
        self.assertEqual(result["events"], 2)
        # Without sequence 2 in RECEIVED, 3's previous (2) breaks the chain.
        status, result, _ = self.run_checker([ack(1), ack(3)], [req(1, 0, 12), req(3, 2, 32)])
        self.assertEqual((status, result["chain_breaks"]), (1, 1))

    def test_retried_ack_is_one_event(self):
        acks = [ack(1), ack(2), ack(2, acked_ms=15.0), ack(3)]
        status, result, _ = self.run_checker(acks, clean_received())
        self.assertEqual(status, 0)
        self.assertEqual(result["events"], 3)
        self.assertEqual(result["latency_ms"]["max"], 7.0)  # 22 - 15

    def test_inconsistent_acks(self):
        acks = [ack(1), ack(2), ack(3), ack(4, event_id="evt_t1_2")]
        status, result, _ = self.run_checker(acks, clean_received())
        self.assertEqual(status, 1)
        self.assertEqual(result["inconsistent_acks"], 1)
        self.assertEqual(result["failed_checks"], ["inconsistent acks"])

    def test_event_id_mismatch(self):
        received = clean_received()
        received[1] = req(2, 1, 22, event_id="evt_other")
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 1)
        self.assertEqual((result["event_id_mismatches"], result["lost"]), (1, 1))

    def test_failover_window(self):
        acks = [ack(1, acked_ms=10.0), ack(2, acked_ms=3000.0), ack(3, acked_ms=3010.0)]
        received = [req(1, 0, 12), req(2, 1, 3500), req(3, 2, 3600)]
        faults = [{"at_ms": 2500.0, "fault": "kill -9", "instance": 0},
                  {"at_ms": 9000.0, "fault": "pause", "instance": 2}]
        status, text, _ = self.run_checker(acks, received, faults, as_json=False)
        self.assertEqual(status, 0)
        self.assertIn("failover after kill -9 on instance 0: max latency 590.0 ms", text)
        self.assertIn("failover after pause on instance 2: max latency n/a ms", text)
        self.assertIn("latency ms: p50 500.0 p99 590.0 max 590.0", text)

    def test_bad_json_line(self):
        path = self.write("received.jsonl", [req(1, 0, 12), "", "{not json"])
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = chaos_check.main(["--acks", self.write("acks.jsonl", [ack(1)]),
                                       "--received", path])
        self.assertEqual(status, 2)
        self.assertIn(f"{path}:3", err.getvalue())

    def test_missing_field_and_missing_file(self):
        bad = req(1, 0, 12)
        del bad["previous"]
        status, _, err = self.run_checker([ack(1)], [bad])
        self.assertEqual(status, 2)
        self.assertIn("received.jsonl:1: missing field 'previous'", err)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = chaos_check.main(["--acks", os.path.join(self.dir.name, "nope"),
                                       "--received", os.path.join(self.dir.name, "nope")])
        self.assertEqual(status, 2)
        self.assertIn("cannot read", err.getvalue())


if __name__ == "__main__":
    unittest.main()
