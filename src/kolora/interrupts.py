"""Stopping a run without losing it: signals, and the fault points the crash tests use.

Ctrl-C or SIGTERM (laptop lid, `kill`, a cluster's pre-emption) only sets a flag; the loop
notices it after the current micro-batch, saves a checkpoint (inside the accumulation window
when it has to) and exits. A second Ctrl-C exits at once — the newest complete checkpoint is
still there, and the half-written one is ignored on resume.
"""

from __future__ import annotations

import os
import signal
import sys


class StopRequest:
    """Installs SIGINT/SIGTERM handlers for the lifetime of a `with` block."""

    def __init__(self, announce=lambda msg: print(msg, file=sys.stderr, flush=True)):
        self.signal: int | None = None
        self.armed = False  # only the training loop can stop at a clean point; before it, Ctrl-C is plain
        self._announce = announce
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):  # noqa: ARG002
        if not self.armed:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if self.signal is not None and signum == signal.SIGINT:
            self._announce("kolora: second Ctrl-C: exiting now without saving (the last complete checkpoint is kept)")
            os._exit(130)
        self.signal = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self._announce(f"kolora: {name} received: saving a checkpoint after this micro-batch "
                       "(press Ctrl-C again to quit at once)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers, no harm
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGINT)


class Faults:
    """Fault injection for the reliability tests, from $KOLORA_FAULTS, e.g.
    `kill-at-micro=5,kill-in-save=4,nan-at-step=3,term-at-micro=7,int2-at-micro=3,oom-at-step=2`,
    `kill-ckpt-between-renames=4` (re-saving step 4: old one moved aside, new one not yet renamed in).
    Unset (every user run) it does nothing."""

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("KOLORA_FAULTS", "") if spec is None else spec
        self.points: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, value = item.partition("=")
            self.points[name] = int(value)

    def __bool__(self) -> bool:
        return bool(self.points)

    def hit(self, name: str, value: int) -> bool:
        return self.points.get(name) == value

    def __call__(self, where: str, value: int) -> None:
        """Act at a fault point: `where` is micro | step | in-save | ckpt-between-renames."""
        if self.hit(f"kill-{'at-' if where in ('micro', 'step') else ''}{where}", value):
            os.kill(os.getpid(), signal.SIGKILL)  # like the OOM killer: no handler, no cleanup
        if self.hit(f"term-at-{where}", value):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.hit(f"int2-at-{where}", value):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
