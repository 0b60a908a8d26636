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


def ack(sequence, subscriptions=("sub_a",), topic="t1", event_id=None, acked_ms=None):
    """One ACKS line."""
    return {
        "topic": topic,
        "sequence": sequence,
        "event_id": event_id or f"evt_{topic}_{sequence}",
        "acked_ms": float(sequence * 10) if acked_ms is None else acked_ms,
        "subscriptions": list(subscriptions),
    }


def req(sequence, previous, arrived, answered=None, status=200, subscription="sub_a",
        topic="t1", event_id=None):
    """One RECEIVED line."""
    return {
        "subscription": subscription,
        "topic": topic,
        "sequence": sequence,
        "previous": previous,
        "event_id": event_id or f"evt_{topic}_{sequence}",
        "arrived_ms": float(arrived),
        "answered_ms": float(arrived + 1 if answered is None else answered),
        "status": status,
    }


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

    def run_checker(self, acks, received, faults=None, as_json=True):
        """Run the checker; return (exit status, parsed JSON or report text, stderr)."""
        argv = ["--acks", self.write("acks.jsonl", acks),
                "--received", self.write("received.jsonl", received)]
        if faults is not None:
            argv += ["--faults", self.write("faults.jsonl", faults)]
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
                    "inconsistent_acks"):
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
                         "overlapping requests: 0", "latency ms: p50 2.0 p99 2.0 max 2.0"):
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
        status, result, _ = self.run_checker([ack(1), ack(2), ack(3)], received)
        self.assertEqual(status, 0)
        self.assertEqual(result["duplicates"], 3)
        self.assertEqual(result["late_duplicates"], 1)
        self.assertEqual(result["deliveries"], 6)

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
