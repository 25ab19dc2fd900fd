"""Degraded-path detection: the console lines (third-party prints included) that announce a fallback path.

`degraded_matches` is the pure check (the aggregate runs it on committed consoles); `ConsoleTap` feeds a live
process's fds 1 and 2 through a `ConsoleMatcher` while passing everything on.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager


# ---- degraded paths: console lines that announce a fallback -------------------------------------------------
# moebench's own log records (logging's format here, or the `[name|LEVEL]` form Unsloth gives every logger) quote
# reasons such as a refusal's "no quant_state found": they are reports about a path, never the path itself.
OWN_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |\[)(bench|offload|validate|sweep)[ |][A-Z]+[ \]]")
RECOMPILE = re.compile(r"Recompiling function (\S+ in \S+)")  # TORCH_LOGS=recompiles, one line per recompile


class ConsoleMatcher:
    """Feeds console lines, one at a time, against an arm's fallback patterns; counts recompiles per function.
    Keeps the first `keep` matched lines (all when None) and how many matched in all."""

    def __init__(self, patterns: list[str], recompile_limit: int | None = None, keep: int | None = None):
        self.regexes = []
        for p in patterns:
            try:
                self.regexes.append(re.compile(p))
            except re.error as exc:
                raise ValueError(f"degraded_patterns: {p!r} is not a regular expression ({exc}); fix it in the "
                                 "config") from None
        self.limit, self.keep = recompile_limit, keep
        self.lines: list[str] = []
        self.count = 0
        self.recompiles: dict[str, int] = {}
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if not line or OWN_LINE.match(line):
            return
        with self._lock:
            m = RECOMPILE.search(line)
            if m:
                self.recompiles[m.group(1)] = self.recompiles.get(m.group(1), 0) + 1
            if any(r.search(line) for r in self.regexes):
                self.count += 1
                if self.keep is None or len(self.lines) < self.keep:
                    self.lines.append(line.strip()[:600])

    def matches(self) -> list[str]:
        """The matched lines, then one line per function recompiled more than the limit allows."""
        storms = [f"torch recompiled {fn} {n} times (recompile_limit {self.limit})"
                  for fn, n in self.recompiles.items() if self.limit is not None and n > self.limit]
        return self.lines + storms


def degraded_matches(text: str, patterns: list[str], recompile_limit: int | None = None) -> list[str]:
    """Every console line of `text` that announces a fallback path (and every recompile storm): [] if none."""
    m = ConsoleMatcher(patterns, recompile_limit)
    for line in text.splitlines():
        m.feed(line)
    return m.matches()


def arm_patterns(cfg: dict, arm: str) -> list[str]:
    """The fallback patterns an arm declares in config (`degraded_patterns`), with those for `all` arms."""
    pats = cfg.get("degraded_patterns") or {}
    return list(pats.get(arm, [])) + list(pats.get("all", []))


class ConsoleTap:
    """Sees everything this process prints, third-party prints and child processes included: file descriptors 1
    and 2 go through pipes whose reader threads write each chunk on to the original descriptor (the rule's
    `tee console.log` still gets all of it) and feed its lines to a ConsoleMatcher."""

    def __init__(self, matcher: ConsoleMatcher):
        self.matcher, self._streams = matcher, []

    def __enter__(self):
        for f in (sys.stdout, sys.stderr):
            f.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            t = threading.Thread(target=self._pump, args=(r, saved), name=f"console-tap-{fd}", daemon=True)
            t.start()
            self._streams.append((fd, saved, r, t))
        return self

    def _pump(self, r: int, out: int) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(r, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            except OSError:
                pass  # the reader of our output went away: keep draining, so the process never blocks
            *lines, buf = (buf + chunk).split(b"\n")
            if len(buf) > 1 << 20:  # a progress bar redrawn with \r for ever: look at it, drop it
                lines, buf = lines + [buf], b""
            for line in lines:
                try:
                    self.matcher.feed(line.decode(errors="replace"))
                except Exception:  # noqa: BLE001 - never let matching stop the pass-through
                    pass
        if buf:
            self.matcher.feed(buf.decode(errors="replace"))

    def __exit__(self, *exc):
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        for fd, saved, _, _ in self._streams:
            os.dup2(saved, fd)  # the pipe's last writer closes here, unless a child process still holds it
        for fd, saved, r, t in self._streams:
            t.join(timeout=2)  # torch's compile workers inherit the pipe and live on: never wait on them long
            if not t.is_alive():  # a lingering child keeps its pipe: leave it to the daemon thread
                os.close(r)
                os.close(saved)
        self._streams = []
        return False


def console_reason(matches: list[str]) -> str | None:
    """The reason a draw whose console matched is degraded: the first matched line and how many more."""
    if not matches:
        return None
    return f"console: {matches[0][:300]}" + (f" (+{len(matches) - 1} more)" if len(matches) > 1 else "")


def mark_degraded(ctx, reason: str | None, log=None) -> None:
    """A draw measured on a fallback path (or a shared GPU): its measured rows become `degraded` with `reason`;
    the values stay. With `log`, the reason is logged as a warning too."""
    if reason and log:
        log.warning("degraded: %s", reason)
    for r in ctx.rows if reason else ():
        if r.status == "measured":
            r.status, r.reason = "degraded", reason


@contextmanager
def console_watch(cfg: dict, arm: str):
    """Watch this process's console for the fallbacks `arm` declares in config (yields the matcher). Asks torch
    for one line per recompile (TORCH_LOGS, read when torch is imported) when a recompile limit is set."""
    if cfg.get("recompile_limit") is not None:
        os.environ.setdefault("TORCH_LOGS", "recompiles")
    matcher = ConsoleMatcher(arm_patterns(cfg, arm), cfg.get("recompile_limit"), keep=20)
    with ConsoleTap(matcher):
        yield matcher


JOB_LINE = re.compile(r"^(local)?(rule|checkpoint) \w+:", re.M)


def draw_console(draw_dir) -> str:
    """What a bench draw's process printed: its console.log, or, for draws committed before bench kept one, its
    job's part of the run's lent-GPU queue log (logs/queue*.log: from the job's `output: …/drawK/metrics.csv` line
    to the next job; draws ran one at a time there). Empty when neither exists."""
    from pathlib import Path

    draw_dir = Path(draw_dir)
    own = draw_dir / "console.log"
    if own.is_file():
        return own.read_text(errors="replace")
    run_dir = draw_dir.parents[2]
    marker = f"output: results/{run_dir.name}/arms/{draw_dir.parent.name}/{draw_dir.name}/metrics.csv"
    parts = []
    for log in sorted((run_dir / "logs").glob("queue*.log")):
        text = log.read_text(errors="replace")
        start = text.find(marker)
        if start >= 0:
            nxt = JOB_LINE.search(text, start)
            parts.append(text[start:nxt.start() if nxt else len(text)])
    return "\n".join(parts)
