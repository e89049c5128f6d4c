"""Service-level objectives checked against Locust's `<prefix>_stats.csv`.

Locust writes one row per request name plus an "Aggregated" row; the SLOs apply to the aggregate (all traffic a
client would see), and the per-endpoint rows are printed for diagnosis.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Slo:
    max_failure_ratio: float | None = None  # failures / requests, 0 means "no failure at all"
    p95_ms: float | None = None
    p99_ms: float | None = None
    min_rps: float | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in (self.max_failure_ratio, self.p95_ms, self.p99_ms, self.min_rps))


@dataclass(frozen=True)
class Stats:
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def failure_ratio(self) -> float:
        # No request at all is as bad as every request failing: nothing was served.
        return self.failures / self.requests if self.requests else 1.0


@dataclass(frozen=True)
class Miss:
    objective: str
    target: str
    measured: str


def _number(row: dict[str, str], key: str) -> float:
    value = (row.get(key) or "").strip()
    return float(value) if value not in ("", "N/A") else 0.0


def read_stats(stats_csv: Path) -> dict[str, Stats]:
    """Rows of a Locust stats CSV by name ("Aggregated" for the total)."""
    out = {}
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            name = row["Name"] if row["Name"] == "Aggregated" else f"{row['Type']} {row['Name']}".strip()
            out[name] = Stats(name, int(_number(row, "Request Count")), int(_number(row, "Failure Count")),
                              _number(row, "Requests/s"), _number(row, "50%"), _number(row, "95%"),
                              _number(row, "99%"), _number(row, "Max Response Time"))
    if "Aggregated" not in out:
        raise ValueError(f"{stats_csv} has no Aggregated row: not a Locust stats file?")
    return out


def check(total: Stats, slo: Slo) -> list[Miss]:
    """The objectives `total` misses (empty when all are met)."""
    misses = []
    if total.requests == 0:
        misses.append(Miss("requests", "> 0", "0 (nothing was served)"))
    if slo.max_failure_ratio is not None and total.failure_ratio > slo.max_failure_ratio:
        misses.append(Miss("failure ratio", f"<= {slo.max_failure_ratio:g}",
                           f"{total.failure_ratio:.4f} ({total.failures}/{total.requests})"))
    if slo.p95_ms is not None and total.p95_ms > slo.p95_ms:
        misses.append(Miss("p95 latency", f"<= {slo.p95_ms:g} ms", f"{total.p95_ms:g} ms"))
    if slo.p99_ms is not None and total.p99_ms > slo.p99_ms:
        misses.append(Miss("p99 latency", f"<= {slo.p99_ms:g} ms", f"{total.p99_ms:g} ms"))
    if slo.min_rps is not None and total.rps < slo.min_rps:
        misses.append(Miss("throughput", f">= {slo.min_rps:g} req/s", f"{total.rps:.2f} req/s"))
    return misses


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table that reads well in a terminal and in a CI log."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(out)


def misses_table(misses: list[Miss]) -> str:
    return table(["objective", "target", "measured"], [[m.objective, m.target, m.measured] for m in misses])


def stats_table(stats: dict[str, Stats]) -> str:
    rows = [[s.name, str(s.requests), str(s.failures), f"{s.rps:.2f}", f"{s.p50_ms:g}", f"{s.p95_ms:g}",
             f"{s.p99_ms:g}", f"{s.max_ms:.0f}"] for s in stats.values()]
    return table(["request", "count", "fails", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows)
