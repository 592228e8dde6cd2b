"""Check results as `p11kms check` and `p11kms doctor` print them: one line each, PASS, WARN or FAIL."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    fix: str = ""
    advisory: bool = False  # a failed advisory check warns but does not fail the run

    def line(self) -> str:
        verdict = "PASS" if self.passed else ("WARN" if self.advisory else "FAIL")
        fix = f" -> fix: {self.fix}" if self.fix and not self.passed else ""
        return f"{verdict} {self.name}: {self.detail}{fix}"


def verdict(name: str, problems: list[str], ok_detail: str, fix: str = "") -> Check:
    """A check that passes when ``problems`` is empty; otherwise its detail lists them."""
    return Check(name, not problems, "; ".join(problems) if problems else ok_detail, fix)


def render(checks: Iterable[Check]) -> tuple[list[str], bool]:
    """The lines to print, and whether every non-advisory check passed."""
    results = list(checks)
    failed = [c for c in results if not c.passed and not c.advisory]
    lines = [c.line() for c in results]
    lines.append(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return lines, not failed
