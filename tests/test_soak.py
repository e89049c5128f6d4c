"""The 30-second version of `make soak` (loadtests/soak.py): good and bad uploads on both models at ~80% of the
capacity measured first; every answer the expected one, and no worker's RSS climbing from window to window."""

from __future__ import annotations

import pytest

from loadtests.soak import report, run

pytestmark = pytest.mark.serial  # a 30 s load with RSS and status bounds: `make test` runs it alone

RSS_SLACK_MIB = 64


@pytest.mark.slow
def test_thirty_second_soak_has_no_unexpected_status_and_flat_rss():
    capacity, rate, windows = run(duration=30, window=10, probe_seconds=5)
    assert capacity > 0 and len(windows) >= 3
    sent = sum(w["requests"] for w in windows)
    assert sent >= 0.5 * rate * 30, (rate, [(w["requests"], w["not_sent"]) for w in windows])  # the load was sent
    for w in windows:
        assert w["unexpected"] == 0, w
    statuses = {s for w in windows for s in w["statuses"]}
    assert {200, 400, 413, 415, 422} <= statuses, statuses  # the bad uploads were in the mix and refused as documented
    first, last = windows[0]["rss_mib"], windows[-1]["rss_mib"]
    for name in first:
        assert last[name] <= first[name] + RSS_SLACK_MIB, (name, [w["rss_mib"][name] for w in windows])
    # The last window holds the answers that came after the run: a few, perhaps only refusals, so no p99 of its own.
    print("\n" + report(capacity, rate, windows))
