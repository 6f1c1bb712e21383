"""Forward, compiled: the shipped blocked scan against one taken over T in nc chunks one after another (a carry
between chunks), so that each chunk's rerun rereads a and b from the cache; 3 x 60 alternating calls, with the
compile time: python results/scan_bench/probes/tchunk.py 2 4"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import sys, math, time, statistics, torch
sys.path.insert(0, ROOT); import train_gpt as tg
from train_gpt import _shift, _kogge_stone

def chunked(a, b, nc, C=32):
    nb = b.size(1) // C; nbc = nb // nc
    a, b = a.unflatten(1, (nb, C)), b.unflatten(1, (nb, C))
    out, carry = [], None
    for c in range(nc):
        ac, bc = a[:, c * nbc:(c + 1) * nbc], b[:, c * nbc:(c + 1) * nbc]
        s, p = bc[:, :, 0], ac[:, :, 0]
        for i in range(1, C):
            s, p = bc[:, :, i] + ac[:, :, i] * s, ac[:, :, i] * p
        x = _shift(_kogge_stone(p, s, False), 1, False)  # state entering each block, zero carry into the chunk
        if carry is not None:
            x = x + _shift(torch.cumprod(p, 1), 1, False, 1.0) * carry.unsqueeze(1)
        hs = [None] * C
        for i in range(C):
            hs[i] = x = bc[:, :, i] + ac[:, :, i] * x
        carry = x[:, -1]
        out.append(torch.stack(hs, 2))
    return torch.cat(out, 1).flatten(1, 2)

B, T, K = 4, 1024, 256
torch.manual_seed(0)
tau = torch.logspace(math.log10(2), math.log10(T), K)
a = torch.sigmoid(torch.log(tau - 1) + 0.5 * torch.randn(B, T, K)).unsqueeze(2)
b = torch.randn(B, T, 2, K)
fs = {"shipped": torch.compile(lambda a, b: tg._blocked_scan(a, b, False), dynamic=False)}
for nc in map(int, sys.argv[1:]):
    fs[f"{nc} chunks"] = torch.compile(lambda a, b, nc=nc: chunked(a, b, nc), dynamic=False)
ref = tg._blocked_scan(a, b, False)
for k, f in fs.items():
    t = time.perf_counter(); o = f(a, b)
    print(f"{k}: compile + first call {time.perf_counter() - t:.1f} s, max rel difference {float((o - ref).abs().max() / ref.abs().max()):.1e}")
keep = {}
for rep in range(3):
    ts = {k: [] for k in fs}
    for _ in range(60):
        for k, f in fs.items():
            t = time.perf_counter(); keep[k] = f(a, b); ts[k].append(1000 * (time.perf_counter() - t))
    print("  ".join(f"{k} {statistics.median(v):.3f} ms" for k, v in ts.items()))
