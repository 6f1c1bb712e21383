"""Forward + backward, compiled: the shipped scan against a backward with the a-gradient fused into its rerun
(fused) or taken over the blocked view (blockedga), 3 x 40 alternating rounds:
python results/scan_bench/probes/fga.py fused; python results/scan_bench/probes/fga.py blockedga"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import sys, math, time, statistics, torch
import torch.nn.functional as F
sys.path.insert(0, ROOT); import train_gpt as tg
from train_gpt import _shift, _kogge_stone

def blocked(a, b, reverse, C=32, h=None):
    T = b.size(1)
    C, nb = min(C, T), -(-T // min(C, T))
    a, b = a.unflatten(1, (nb, C)), b.unflatten(1, (nb, C))
    dec = [a[:, :, i] for i in range(reverse, C)] + ([_shift(a[:, :, 0], 1, True)] if reverse else [])
    steps = range(C - 1, -1, -1) if reverse else range(C)
    s, p = b[:, :, steps[0]], dec[steps[0]]
    for i in steps[1:]:
        s, p = b[:, :, i] + dec[i] * s, dec[i] * p
    c, hs = _shift(_kogge_stone(p, s, reverse), 1, reverse), [None] * C
    gas = [None] * C
    if h is not None:
        hp = _shift(h, 1, False).unflatten(1, (nb, C))   # h_{t-1}
    for i in steps:
        hs[i] = c = b[:, :, i] + dec[i] * c
        if h is not None:
            gas[i] = (c * hp[:, :, i]).sum_to_size(a[:, :, 0].shape)
    out = torch.stack(hs, 2).flatten(1, 2)[:, :T]
    return out if h is None else (out, torch.stack(gas, 2).flatten(1, 2))

MODE = sys.argv[1]
class V(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        h = blocked(a, b, False); ctx.save_for_backward(a, h); return h
    @staticmethod
    def backward(ctx, g):
        a, h = ctx.saved_tensors
        if MODE == "fused":
            return blocked(a, g.contiguous(), True, h=h)[::-1]
        gb = blocked(a, g.contiguous(), True)
        nb = h.size(1) // 32
        hp = _shift(h, 1, False).unflatten(1, (nb, 32))
        ga = (gb.unflatten(1, (nb, 32)) * hp).sum_to_size(a.unflatten(1, (nb, 32)).shape).flatten(1, 2)
        return ga, gb
B,T,K=4,1024,256
torch.manual_seed(0)
tau = torch.logspace(math.log10(2), math.log10(T), K)
a = torch.sigmoid(torch.log(tau - 1) + 0.5 * torch.randn(B, T, K)).unsqueeze(2).requires_grad_()
b = torch.randn(B, T, 2, K, requires_grad=True); g = torch.randn(B, T, 2, K)
f0 = torch.compile(tg.kogge_stone_scan, dynamic=False)
f1 = torch.compile(V.apply, dynamic=False)
def fb(f):
    h = f(a, b); return (h,) + torch.autograd.grad(h, (a, b), g)
r0, r1 = fb(f0), fb(f1)
print("maxrel", max(float((x-y).abs().max()/y.abs().max()) for x,y in zip(r0,r1)))
for _ in range(3): fb(f0); fb(f1)
for rep in range(3):
    t0s, t1s = [], []
    for _ in range(40):
        t=time.perf_counter(); fb(f0); t0s.append(time.perf_counter()-t)
        t=time.perf_counter(); fb(f1); t1s.append(time.perf_counter()-t)
    m0, m1 = 1000*statistics.median(t0s), 1000*statistics.median(t1s)
    print(f"{MODE}: shipped {m0:.3f} ms, variant {m1:.3f} ms, ratio {m0/m1:.2f}")
