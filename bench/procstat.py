"""What a process has cost so far, read from /proc (Linux): CPU seconds and peak memory.

Read from outside the process, so a benchmark can measure the bridge, the simulator and
mosquitto each on its own, children excluded.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of process pid so far, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        text = stat.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of process pid, in MiB."""
    peak = _status_mb(pid, "VmHWM")
    if peak is None:
        raise RuntimeError(f"no VmHWM for process {pid}")
    return peak


def rss_mb(pid: int) -> float:
    """Current resident set size (VmRSS) of process pid, in MiB; NaN if it has none."""
    rss = _status_mb(pid, "VmRSS")
    return float("nan") if rss is None else rss


def _status_mb(pid: int, field: str) -> float | None:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None
