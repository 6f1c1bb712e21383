"""The backward alone, compiled: the shipped one (∂L/∂b by the blocked scan backwards, then ∂L/∂a over ∂L/∂b and h)
against ∂L/∂a fused into the rerun, with the real and imaginary planes together (fused) or split (split),
4 x 60 alternating calls: python results/scan_bench/probes/fbw.py"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import sys, time, statistics, torch
import torch.nn.functional as F
sys.path.insert(0, ROOT); import train_gpt as tg
from train_gpt import _shift, _kogge_stone

def shipped(a, g, h):
    gb = tg._blocked_scan(a, g, reverse=True)
    ga = (gb[:, 1:] * h[:, :-1]).sum_to_size(a[:, 1:].shape)
    return F.pad(ga, (0, 0) * (ga.dim() - 2) + (1, 0)), gb

def first_pass(a, g, C):  # the block ends of the backward scan, as in _blocked_scan(reverse=True)
    dec = [a[:, :, i] for i in range(1, C)] + [_shift(a[:, :, 0], 1, True)]
    s, p = g[:, :, C - 1], dec[C - 1]
    for i in range(C - 2, -1, -1):
        s, p = g[:, :, i] + dec[i] * s, dec[i] * p
    return dec, _shift(_kogge_stone(p, s, True), 1, True)

def fused(a, g, h, C=32):
    nb = g.size(1) // C
    a, g, hb = a.unflatten(1, (nb, C)), g.unflatten(1, (nb, C)), h.unflatten(1, (nb, C))
    dec, c = first_pass(a, g, C)
    h0 = _shift(hb[:, :, C - 1], 1, False)  # h_{t-1} at each block's first step
    gs, gas = [None] * C, [None] * C
    for i in range(C - 1, -1, -1):
        gs[i] = c = g[:, :, i] + dec[i] * c
        gas[i] = (c * (hb[:, :, i - 1] if i else h0)).sum(2, keepdim=True)
    return torch.stack(gas, 2).flatten(1, 2), torch.stack(gs, 2).flatten(1, 2)

def split(a, g, h, C=32):
    nb = g.size(1) // C
    a, g, hb = a.unflatten(1, (nb, C)), g.unflatten(1, (nb, C)), h.unflatten(1, (nb, C))
    dec, c = first_pass(a, g, C)
    cr, ci = c[:, :, 0], c[:, :, 1]
    gr, gi, hr, hi = g[:, :, :, 0], g[:, :, :, 1], hb[:, :, :, 0], hb[:, :, :, 1]
    hr0, hi0 = _shift(hr[:, :, C - 1], 1, False), _shift(hi[:, :, C - 1], 1, False)
    gs, gas = [None] * C, [None] * C
    for i in range(C - 1, -1, -1):
        d = dec[i][:, :, 0]
        cr, ci = gr[:, :, i] + d * cr, gi[:, :, i] + d * ci
        gs[i] = torch.stack((cr, ci), 2)
        gas[i] = cr * (hr[:, :, i - 1] if i else hr0) + ci * (hi[:, :, i - 1] if i else hi0)
    return torch.stack(gas, 2).flatten(1, 2).unsqueeze(2), torch.stack(gs, 2).flatten(1, 2)

B, T, K = 4, 1024, 256
torch.manual_seed(0)
a = torch.rand(B, T, 1, K) * 0.5 + 0.5; g = torch.randn(B, T, 2, K); h = torch.randn(B, T, 2, K)
fs = {k: torch.compile(f, dynamic=False) for k, f in (("shipped", shipped), ("fused", fused), ("split", split))}
r = {k: f(a, g, h) for k, f in fs.items()}
print("max abs difference to shipped:", {k: max(float((x - y).abs().max()) for x, y in zip(r["shipped"], v)) for k, v in r.items()})
keep = {}
for rep in range(4):
    ts = {k: [] for k in fs}
    for _ in range(60):
        for k, f in fs.items():
            t = time.perf_counter(); keep[k] = f(a, g, h); ts[k].append(1000 * (time.perf_counter() - t))
    print("  ".join(f"{k} {statistics.median(v):.3f} ms" for k, v in ts.items()))
