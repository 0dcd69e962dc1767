"""Peak resident memory of a block of work, for the benchmarks and `finlora compare`."""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


class PeakMemory:
    """Peak resident memory of this process over a `with` block, in MiB.

    Linux resets the high-water mark (VmHWM) when "5" is written to clear_refs; where that is
    not possible a sampling thread watches RSS instead.
    """

    def __init__(self) -> None:
        self.peak_mib = 0.0

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            yield self
            self.peak_mib = max(self.peak_mib, self._status("VmHWM"))
            return
        except OSError:
            pass
        import psutil

        process, stop = psutil.Process(), threading.Event()

        def sample() -> None:
            while not stop.is_set():
                self.peak_mib = max(self.peak_mib, process.memory_info().rss / 2**20)
                stop.wait(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


def process_peak_mib() -> float:
    """This process's peak resident memory so far, in MiB (what `finlora train` reports)."""
    peak = PeakMemory._status("VmHWM")  # Linux; absent elsewhere
    if peak:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes there, else KiB
