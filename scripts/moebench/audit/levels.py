"""The levels an audit reaches, their exit codes, and the findings of one run (each FAIL, WARN or OK with its
message). Below FAILED a level says only how far the proofs go.
"""
from __future__ import annotations

# Levels, best first, and the exit code of each (FAILED is 1 so that any plain `&&` chain stops on it).
LEVELS = ("PROVEN", "ATTESTED", "PENDING", "UNSTAMPED", "FAILED")
EXIT = {"PROVEN": 0, "ATTESTED": 3, "PENDING": 4, "UNSTAMPED": 5, "FAILED": 1}


class Findings:
    def __init__(self):
        self.items: list[tuple[str, str]] = []
        self.checked = {"numbers": 0, "derived": 0, "steps": 0, "logs": 0, "inputs": 0, "revisions": 0}
        self.stamps: list[str] = []  # the level of each required revision's proof

    def fail(self, msg):
        self.items.append(("FAIL", msg))

    def warn(self, msg):
        self.items.append(("WARN", msg))

    def ok(self, msg):
        self.items.append(("OK", msg))

    @property
    def failed(self):
        return [m for lvl, m in self.items if lvl == "FAIL"]

    @property
    def level(self) -> str:
        if self.failed:
            return "FAILED"
        return worst(self.stamps) if self.stamps else "UNSTAMPED"


def worst(levels) -> str:
    return max(levels, key=LEVELS.index)
