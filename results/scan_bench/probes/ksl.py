"""Forward + backward, compiled: the shipped scan against one whose Kogge-Stone step over the blocks runs on
per-block slices (so that inductor fuses its levels), 60 alternating rounds: python results/scan_bench/probes/ksl.py 32"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import sys, math, time, statistics, torch
import torch.nn.functional as F
sys.path.insert(0, ROOT); import train_gpt as tg
from train_gpt import _shift

def _ks_list(p, s, reverse):
    n = s.size(1)
    S, P = list(s.unbind(1)), list(p.unbind(1))
    if reverse: S, P = S[::-1], P[::-1]
    d = 1
    while d < n:
        S = [S[j] + P[j] * S[j - d] if j >= d else S[j] for j in range(n)]
        P = [P[j] * P[j - d] if j >= d else P[j] for j in range(n)]
        d *= 2
    return torch.stack(S[::-1] if reverse else S, 1)

def blocked(a, b, reverse, C=32, ks=_ks_list):
    T = b.size(1)
    C, nb = min(C, T), -(-T // min(C, T))
    if nb * C != T:
        a, b = (F.pad(x, (0, 0) * (x.dim() - 2) + (0, nb * C - T)) for x in (a, b))
    a, b = a.unflatten(1, (nb, C)), b.unflatten(1, (nb, C))
    dec = [a[:, :, i] for i in range(reverse, C)] + ([_shift(a[:, :, 0], 1, True)] if reverse else [])
    steps = range(C - 1, -1, -1) if reverse else range(C)
    s, p = b[:, :, steps[0]], dec[steps[0]]
    for i in steps[1:]:
        s, p = b[:, :, i] + dec[i] * s, dec[i] * p
    c, hs = _shift(ks(p, s, reverse), 1, reverse), [None] * C
    for i in steps:
        hs[i] = c = b[:, :, i] + dec[i] * c
    return torch.stack(hs, 2).flatten(1, 2)[:, :T]

C = int(sys.argv[1]) if len(sys.argv) > 1 else 32
class V(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        h = blocked(a, b, False, C); ctx.save_for_backward(a, h); return h
    @staticmethod
    def backward(ctx, g):
        a, h = ctx.saved_tensors
        gb = blocked(a, g.contiguous(), True, C)
        ga = (gb[:, 1:] * h[:, :-1]).sum_to_size(a[:, 1:].shape)
        return F.pad(ga, (0, 0) * (ga.dim() - 2) + (1, 0)), gb
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
print("maxdiff", max(float((x-y).abs().max()/y.abs().max()) for x,y in zip(r0,r1)))
for _ in range(3): fb(f0); fb(f1)
t0s, t1s = [], []
for _ in range(60):
    t=time.perf_counter(); fb(f0); t0s.append(time.perf_counter()-t)
    t=time.perf_counter(); fb(f1); t1s.append(time.perf_counter()-t)
m0, m1 = 1000*statistics.median(t0s), 1000*statistics.median(t1s)
print(f"C={C}: shipped {m0:.3f} ms, list-KS {m1:.3f} ms, ratio {m0/m1:.2f}")
