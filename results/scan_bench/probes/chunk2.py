"""Forward of the compiled scan against chunked variants (batch rows, oscillators) and a compiled b * 2.0
(8 MiB read, 8 written), 60 alternating rounds: python results/scan_bench/probes/chunk2.py"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import sys, math, time, statistics, torch
import torch.nn.functional as F
sys.path.insert(0, ROOT); import train_gpt as tg
B,T,K=4,1024,256
torch.manual_seed(0)
tau = torch.logspace(math.log10(2), math.log10(T), K)
a = torch.sigmoid(torch.log(tau - 1) + 0.5 * torch.randn(B, T, K)).unsqueeze(2)
b = torch.randn(B, T, 2, K)
def bchunk(a, b, n):
    return torch.cat([tg._blocked_scan(a[i:i+n], b[i:i+n], False) for i in range(0, b.size(0), n)])
def kchunk(a, b, n):
    return torch.cat([tg._blocked_scan(a[..., i:i+n], b[..., i:i+n], False) for i in range(0, b.size(-1), n)], -1)
fs = {"fwd scan": torch.compile(lambda a, b: tg._blocked_scan(a, b, False)),
      "B chunks of 1": torch.compile(lambda a, b: bchunk(a, b, 1)),
      "B chunks of 2": torch.compile(lambda a, b: bchunk(a, b, 2)),
      "K chunks of 64": torch.compile(lambda a, b: kchunk(a, b, 64)),
      "K chunks of 128": torch.compile(lambda a, b: kchunk(a, b, 128)),
      "copy b": torch.compile(lambda a, b: b * 2.0)}
ref = fs["fwd scan"](a, b)
for k, f in fs.items():
    for _ in range(3): o = f(a, b)
    if k != "copy b": assert torch.equal(o, ref), k
ts = {k: [] for k in fs}
for _ in range(60):
    for k, f in fs.items():
        t = time.perf_counter(); f(a, b); ts[k].append(time.perf_counter() - t)
for k in ts: print(f"{k}: {1000*statistics.median(ts[k]):.3f} ms")
