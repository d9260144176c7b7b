"""python -m bench._measure RESULT.json -- CMD...: run CMD, write its wall time, exit code and peak RSS
(getrusage(RUSAGE_CHILDREN): the largest resident set of CMD or any descendant it waited for) as JSON.
A fresh process per measurement, so earlier children never inflate the number."""
import json
import resource
import subprocess
import sys
import time


def main() -> int:
    out, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        json.dump({"rc": rc, "wall_s": round(wall, 2), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
                   "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
