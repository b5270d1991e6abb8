"""Ctrl-C, preemption and hang-ups: SIGINT, SIGTERM or SIGHUP asks a run to stop after its next optimizer step,
with a resume checkpoint, instead of dying in the middle of an epoch. A SLURM time limit or preemption sends
SIGTERM; a closed terminal or a dropped ssh connection sends SIGHUP (``nohup`` leaves it ignored, and then it
stays ignored). nerco's launcher (launcher.py, what launch/*.sh run) passes each on to the ranks of every
node. Ranks agree on the stop through the all-reduce every micro-batch already makes, so all of them save the
same step."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("nerco_dist")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# the one that decides the exit status when several arrive: a scheduler's SIGTERM, then a hang-up, then Ctrl-C
PRECEDENCE = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class StopRequested(Exception):
    """The run stopped on a signal after writing a resume checkpoint; the same command continues it."""

    def __init__(self, signum: int, where: str, checkpoint: str | None):
        self.signum, self.where, self.checkpoint = signum, where, checkpoint
        saved = f"resume checkpoint in {checkpoint}" if checkpoint else "no resume checkpoint (none configured)"
        super().__init__(f"stopped by {signal.Signals(signum).name} at {where}; {saved}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # 130 SIGINT, 143 SIGTERM, 129 SIGHUP, as a shell reports a process they end


class StopSignals:
    """While entered (in the main thread; elsewhere signals cannot be caught), records SIGINT, SIGTERM and
    SIGHUP instead of dying. A second SIGINT stops at once (KeyboardInterrupt), without a checkpoint. A signal
    ignored when the run starts stays ignored (a shell script's background job ignores SIGINT: the terminal's
    Ctrl-C is not for it)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _record(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            log.warning("%s: stopping after the next optimizer step, with a resume checkpoint (Ctrl-C again "
                        "stops at once, without one)", signal.Signals(signum).name)
        if self.received is None or PRECEDENCE.index(signum) < PRECEDENCE.index(self.received):
            self.received = signum

    def flags(self) -> list[float]:
        """This rank's requests for the all-reduce: 1.0 for the signal received, in ``STOP_SIGNALS`` order."""
        return [float(self.received == s) for s in STOP_SIGNALS]


def agreed_signal(summed_flags: list[float]) -> int | None:
    """The signal that stops every rank, from :meth:`StopSignals.flags` summed over ranks (by ``PRECEDENCE``)."""
    received = {s for s, flag in zip(STOP_SIGNALS, summed_flags) if flag}
    return next((s for s in PRECEDENCE if s in received), None)
