"""python -m bench._measure RESULT.json -- CMD...: run CMD, write its wall time, exit code and peak memory as JSON.

Peak memory two ways: getrusage(RUSAGE_CHILDREN)'s ru_maxrss, the largest resident set of CMD or
any one descendant it waited for (exact, but blind to processes alive at the same time), and the
highest sum of RSS over CMD's process tree, sampled every 20 ms from /proc (a forked stage beside
its parent counts both; pages they share count twice, so it is an upper bound). A fresh process
per measurement, so earlier children never inflate the number."""
import json
import os
import resource
import subprocess
import sys
import threading
import time

INTERVAL_S = 0.02
TREE_INTERVAL_S = 0.2
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (OSError, ValueError, IndexError):
        return 0


def descendants(root: int) -> list[int]:
    tree, todo, out = _children(), [root], []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


class TreeSampler(threading.Thread):
    """The highest sum of RSS over the process tree: statm every 20 ms (a counter, cheap), the
    tree itself every 200 ms (a scan of /proc). smaps_rollup's PSS would count shared pages once
    but walks every page table: it took a third of a core beside a 1.6 GB build."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak_kib, self.done = root, 0, threading.Event()

    def run(self) -> None:
        pids, scanned = [self.root], 0.0
        while not self.done.wait(INTERVAL_S):
            if time.monotonic() - scanned > TREE_INTERVAL_S:
                pids, scanned = descendants(self.root), time.monotonic()
            self.peak_kib = max(self.peak_kib, sum(_rss_kib(pid) for pid in pids))


def main() -> int:
    out, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    sampler = TreeSampler(proc.pid)
    if os.path.exists("/proc/self/statm"):
        sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.done.set()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        json.dump({"rc": rc, "wall_s": round(wall, 2), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
                   "peak_tree_rss_mib": round(sampler.peak_kib / 1024, 1) if sampler.peak_kib else None,
                   "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
