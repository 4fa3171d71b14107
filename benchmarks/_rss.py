"""Run a command; after it, print one JSON line with its wall time and peak RSS.

The figures are the child's own (os.wait4), not this wrapper's.
"""

import json
import os
import sys
import time

t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
sys.stdout.flush()
print(json.dumps({"wall": wall, "peak_rss_kib": usage.ru_maxrss, "exit": code}))
sys.exit(code)
