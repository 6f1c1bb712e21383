"""Python GC collections during the training loop of a compiled run (see gcrun.out for the environment):
the reference configuration with ITERATIONS=100 TRAIN_LOG_EVERY=50 COMPILE=1 python results/scan_bench/probes/gcrun.py"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import gc, time, sys, os
sys.path.insert(0, ROOT); sys.argv = ["train_gpt.py"]
import train_gpt as tg
ev, t = [], {}
def cb(phase, info):
    if phase == "start": t["s"] = time.perf_counter()
    else: ev.append((time.perf_counter(), info["generation"], time.perf_counter() - t["s"], info["collected"]))
gc.callbacks.append(cb)
orig = tg.train
span = {}
def train(h, tr):
    span["a"] = time.perf_counter(); r = orig(h, tr); span["b"] = time.perf_counter(); return r
tg.train = train
try:
    tg.main()
except SystemExit:
    pass
inloop = [e for e in ev if span["a"] <= e[0] <= span["b"]]
for g in (0, 1, 2):
    es = [e for e in inloop if e[1] == g]
    print(f"in loop gen{g}: {len(es)} collections, total {1000*sum(e[2] for e in es):.1f} ms, max {1000*max([e[2] for e in es] or [0]):.1f} ms")
print(f"loop {span['b']-span['a']:.2f} s; objects {len(gc.get_objects())}")
