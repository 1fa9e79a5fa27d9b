"""A failing multi-node job's log, kept readable. When one rank fails, the torchrun agents of the other nodes lose
their rendezvous store and print hundreds of lines of C++ stack frames and Python tracebacks about it, burying the
one line that says what went wrong. The node task passes its command's stderr through LogFilter: those consequences
are cut (counted, and named in one line), everything else passes, and the first error a process of this node
reported is kept for the end of the log."""

from __future__ import annotations

import re

# Lines of a C++ exception dump that torch's TCPStore prints when its peer has gone.
NATIVE = re.compile(
    r"^(\[[WE]\d{4} [\d:.]+ (\d+ )?\S*TCPStore\.cpp:\d+\]|Exception raised from |frame #\d+: |"
    r"<omitting python frames>$)"
)
# torch.distributed's own errors when the rendezvous store or its peers are gone: a consequence on every node
# once one process has failed (and the cause only when nothing else failed, e.g. a node that cannot reach the head).
RENDEZVOUS = re.compile(
    r"(Rendezvous\w*Error|DistNetworkError|DistStoreError)\b|"
    r"elastic/rendezvous/\S+\] .*(failed to shutdown|has closed)"
)
# What a medlava process prints before it exits non-zero (cli.py), and the last line of a Python traceback.
MEDLAVA_ERROR = re.compile(r"^medlava [\w-]+( \(rank \d+\))?: ")
CHAIN = (
    "The above exception was the direct cause of the following exception:",
    "During handling of the above exception, another exception occurred:",
)


class LogFilter:
    """Feed it stderr lines (without their newline); it returns the lines to write, now or once a traceback ends."""

    def __init__(self) -> None:
        self.cut = 0
        self.first_error: str | None = None
        self.rendezvous_error: str | None = None
        self._traceback: list[str] = []
        self._state = ""  # in a traceback: "frames", "exception" (its line seen) or "chain"
        self._native = False

    def feed(self, line: str) -> list[str]:
        if NATIVE.match(line) or (self._native and not line.strip()):
            self._native = True
            self.cut += 1
            return []
        self._native = False
        if self._state:
            return self._in_traceback(line)
        if line.startswith("Traceback (most recent call last):"):
            self._traceback, self._state = [line], "frames"
            return []
        if RENDEZVOUS.search(line):
            self.cut += 1
            return []
        if MEDLAVA_ERROR.match(line) and self.first_error is None:
            self.first_error = line
        return [line]

    def _in_traceback(self, line: str) -> list[str]:
        """A traceback is held until it ends (its exception line, and any exception chained after it): a
        rendezvous error's is cut whole."""
        state = self._state
        if state == "frames":
            self._state = "frames" if line.startswith((" ", "\t")) or not line.strip() else "exception"
        elif line in CHAIN:
            self._state = "chain"
        elif state == "chain" and line.startswith("Traceback (most recent call last):"):
            self._state = "frames"
        elif line.strip():  # the traceback has ended: this line is the next thing in the log
            return self.flush() + self.feed(line)
        self._traceback.append(line)
        return []

    def flush(self) -> list[str]:
        """The held traceback, unless it is a rendezvous error's (call it at the end of the stream too)."""
        tb, self._traceback, self._state = self._traceback, [], ""
        exceptions = [x for x in tb if x.strip() and not x.startswith((" ", "\t", "Traceback")) and x not in CHAIN]
        if exceptions and RENDEZVOUS.search(exceptions[-1]):
            self.cut += len(tb)
            self.rendezvous_error = self.rendezvous_error or exceptions[-1]
            return []
        if exceptions and self.first_error is None and "ChildFailedError" not in exceptions[-1]:
            self.first_error = exceptions[-1]
        return tb

    def summary(self) -> str | None:
        """What failed on this node, in one line; None when nothing did."""
        if self.first_error:
            return self.first_error
        if self.rendezvous_error:
            return (
                f"the rendezvous with the other nodes failed ({self.rendezvous_error}); if another node's log "
                "ends with an error, that one came first"
            )
        return None
