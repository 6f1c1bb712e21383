"""Median fwd + bwd time, minor page faults and system time per call: the compiled scan and the seed-style
reference, 30 calls each: python results/scan_bench/probes/pf.py"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import sys, math, time, statistics, torch, resource
sys.path.insert(0, ROOT); import train_gpt as tg
sys.path.insert(0, os.path.join(ROOT, "tests")); import bench_speed as bs
torch.manual_seed(0)
B,T,K=4,1024,256
tau = torch.logspace(math.log10(2), math.log10(T), K)
a = torch.sigmoid(torch.log(tau - 1) + 0.5 * torch.randn(B, T, K)).unsqueeze(2).requires_grad_()
b = torch.randn(B, T, 2, K, requires_grad=True); g = torch.randn(B, T, 2, K)
f = torch.compile(tg.kogge_stone_scan, dynamic=False)
for name, fn in [("ours", f), ("ref", bs.scan_naive_ks)]:
    def fb():
        h = fn(a, b); return torch.autograd.grad(h, (a, b), g)
    for _ in range(5): fb()
    r0 = resource.getrusage(resource.RUSAGE_SELF); ts=[]
    for _ in range(30):
        t=time.perf_counter(); fb(); ts.append(time.perf_counter()-t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(name, "median ms %.2f" % (1000*statistics.median(ts)), "minflt/call", (r1.ru_minflt-r0.ru_minflt)/30, "sys s/call %.5f" % ((r1.ru_stime-r0.ru_stime)/30))
