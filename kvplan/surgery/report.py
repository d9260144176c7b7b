"""What surgery did, as plain dataclasses that serialise to the report dict of the public API."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class NearMiss:
    """A pattern that matched far enough to look like a fusion target, then failed a check."""
    nodes: list[str]
    reason: str


@dataclass
class PassReport:
    fused: int = 0
    near_misses: list[NearMiss] = field(default_factory=list)


@dataclass
class SurgeryReport:
    passes: dict[str, PassReport]
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def summary_lines(report: dict) -> list[str]:
    """A short human summary of a report dict (the CLI and the default log use it)."""
    lines = []
    for name, p in report["passes"].items():
        lines.append(f"{name}: fused {p['fused']}, near misses {len(p['near_misses'])}")
        for miss in p["near_misses"]:
            lines.append(f"  near miss at {', '.join(miss['nodes'])}: {miss['reason']}")
    lines.append(f"nodes: {report['nodes_before']} -> {report['nodes_after']} ({report['seconds']:.2f} s)")
    return lines
