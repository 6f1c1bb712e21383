"""Copy bandwidth by size (4 MiB to 256 MiB; the cache holds the small ones): python results/scan_bench/probes/bw.py"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch, time, statistics
for mib in (4, 16, 64, 256):
    src = torch.empty(mib * 2**18); dst = torch.empty_like(src); src.normal_()
    for _ in range(2): dst.copy_(src)
    ts=[]
    for _ in range(10):
        t=time.perf_counter(); dst.copy_(src); ts.append(time.perf_counter()-t)
    m=statistics.median(ts); print(f"{mib} MiB copy: {m*1000:.3f} ms, {2*src.numel()*4/m/1e9:.1f} GB/s")
