"""python -m bench._measure RESULT.json -- CMD...: run CMD, write its wall time, exit code and peak memory as JSON.

Peak memory two ways: getrusage(RUSAGE_CHILDREN)'s ru_maxrss, the largest resident set of CMD or
any one descendant it waited for (exact, but blind to processes alive at the same time), and the
highest sum of PSS over CMD's process tree, sampled every 20 ms from /proc (shared pages counted
once; a forked stage beside its parent counts both). A fresh process per measurement, so earlier
children never inflate the number."""
import json
import os
import resource
import subprocess
import sys
import threading
import time

INTERVAL_S = 0.02


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


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_kib(root: int) -> int:
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_kib(pid)
        todo += tree.get(pid, [])
    return total


class TreeSampler(threading.Thread):
    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak_kib, self.done = root, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(INTERVAL_S):
            self.peak_kib = max(self.peak_kib, tree_pss_kib(self.root))


def main() -> int:
    out, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    sampler = TreeSampler(proc.pid)
    if os.path.exists("/proc/self/smaps_rollup"):
        sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.done.set()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        json.dump({"rc": rc, "wall_s": round(wall, 2), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
                   "peak_tree_pss_mib": round(sampler.peak_kib / 1024, 1) if sampler.peak_kib else None,
                   "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
