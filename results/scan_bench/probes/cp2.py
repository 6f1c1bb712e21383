"""x * 2.0 on fresh outputs of 64 KiB, 8 MiB and 64 MiB, eager and compiled (page faults of fresh memory):
python results/scan_bench/probes/cp2.py"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch, time, statistics
f = torch.compile(lambda x: x * 2.0, dynamic=False)
for n in (2**14, 2**21, 2**24):
    b = torch.randn(n)
    fo = {"eager": lambda: b * 2.0, "compiled": lambda: f(b)}
    for fn in fo.values(): fn(); fn()
    ts = {k: [] for k in fo}
    for _ in range(40):
        for k, fn in fo.items():
            t = time.perf_counter(); fn(); ts[k].append(time.perf_counter() - t)
    print(n*4/2**20, "MiB", {k: round(1000*statistics.median(v), 3) for k, v in ts.items()})
