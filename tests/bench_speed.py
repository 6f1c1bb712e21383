"""Speed benchmark for train_gpt.py: the TRN scan against references and a bandwidth bound, and the full
training step of the hybrid against the plain transformer. Prints Markdown tables for the README.

    python tests/bench_speed.py            # full sizes on CUDA (tiny sizes when there is no CUDA device)
    python tests/bench_speed.py --tiny     # small sizes, well under a minute on a laptop CPU
    python tests/bench_speed.py --profile  # also a per-layer-type profile of one eager hybrid step
    python tests/bench_speed.py --compile --scan-shape 4,1024,256 --scan-only --reps 15 --runs 9   # the README's CPU scan

Besides the scan and the training step: one TRN block against one attention block, the inductor kernel count
of a TRN block with the previous and the current scan (when compiling), and one Muon step (ours against
torch.optim.Muon).

Not a pytest module (its name does not start with test_). Timings are medians over repeats after warmup; the
scan's ratio to the seed-style reference is also timed paired (the two alternating), with its quartiles: ours
straight after the reference, and ours again. --runs N repeats that comparison N times and prints the median.
"""
import argparse, math, os, statistics, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
TINY_MODEL = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", ATTN_POSITIONS="1", NUM_OSCILLATORS="16",
                  TRAIN_SEQ_LEN="128", MICRO_BATCH_SEQS="2", BIGRAM_VOCAB_SIZE="1024", BIGRAM_DIM="32")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, reps, warmup):
    """(median ms, peak MiB allocated above what was live before; None off CUDA) of fn() over reps runs."""
    for _ in range(warmup):
        fn()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else None
    return statistics.median(times), peak


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


# ----------------------------------------------------------------------------- scan references

def scan_sequential(a, b):
    """h_t = a_t h_{t-1} + b_t, one time step at a time (the definition)."""
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.size(1)):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def _naive_ks_real(a, b):
    T, d = b.size(1), 1
    while d < T:  # every level pads shifted copies and builds new full tensors; autograd keeps them all
        a_prev = F.pad(a[:, :-d], (0, 0, d, 0), value=1.0)
        b_prev = F.pad(b[:, :-d], (0, 0, d, 0))
        b = b + a * b_prev
        a = a * a_prev
        d *= 2
    return b


def scan_naive_ks(a, b):
    """Kogge-Stone as a published hybrid wrote it: real and imaginary parts as two separate passes, each
    recomputing the decay products, plain autograd through every level."""
    a = a[:, :, 0]  # the model's layout: a (B, T, 1, K), b (B, T, 2, K)
    return torch.stack((_naive_ks_real(a, b[:, :, 0]), _naive_ks_real(a, b[:, :, 1])), 2)


class _DoublingScan(torch.autograd.Function):
    """The scan before the blocked one (train_gpt.py up to c9d6898): ceil(log2 T) in-place doubling passes
    over the whole tensor forward, and again backward; saves a and h."""

    @staticmethod
    def _ks(a, b, reverse):  # the doubling scan over the whole sequence, in place on copies, as it was
        a, b = a.clone(), b.clone()
        T, d = b.size(1), 1
        while d < T:
            src, dst = (slice(d, None), slice(None, -d)) if reverse else (slice(None, -d), slice(d, None))
            b[:, dst] += a[:, dst] * b[:, src]
            if 2 * d < T:
                a[:, dst] = a[:, dst] * a[:, src]
            d *= 2
        return b

    @staticmethod
    def forward(ctx, a, b):
        h = _DoublingScan._ks(a, b, False)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, g):
        a, h = ctx.saved_tensors
        gb = _DoublingScan._ks(torch.cat((a[:, 1:], torch.zeros_like(a[:, :1])), 1), g.contiguous(), True)
        return (gb * torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), 1)).sum_to_size(a.shape), gb


def scan_doubling(a, b):
    return _DoublingScan.apply(a, b)


def saved_mib(fn, *args):
    """MiB of distinct storages autograd saves for backward when running fn(*args)."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values()) / 2**20


def bench_scan(B, T, K, reps, seq_reps, compile_, runs=1):
    torch.manual_seed(0)
    tau = torch.logspace(math.log10(2), math.log10(max(T, 4)), K, device=DEV)  # TRN's decay range
    # the layout TRN.forward uses: real and imaginary planes, K innermost
    a = torch.sigmoid(torch.log(tau - 1) + 0.5 * torch.randn(B, T, K, device=DEV)).unsqueeze(2).requires_grad_()
    b = torch.randn(B, T, 2, K, device=DEV, requires_grad=True)
    g = torch.randn(B, T, 2, K, device=DEV)
    NAIVE, OURS = "seed-style Kogge-Stone (bench reference)", "ours (`kogge_stone_scan`), eager"
    impls = {"sequential loop": scan_sequential, NAIVE: scan_naive_ks,
             "previous doubling scan (before the blocked one), eager": scan_doubling, OURS: tg.kogge_stone_scan}
    if compile_:
        impls["previous doubling scan, compiled"] = torch.compile(scan_doubling, dynamic=False)
        impls["ours, compiled"] = torch.compile(tg.kogge_stone_scan, dynamic=False)

    def fwd_bwd(fn):
        h = fn(a, b)
        return (h, *torch.autograd.grad(h, (a, b), g))

    ref = [t.detach() for t in fwd_bwd(scan_sequential)]
    errs = {}
    for name, fn in impls.items():
        got = [t.detach() for t in fwd_bwd(fn)]
        errs[name] = max(float((x - r).abs().max() / r.abs().max()) for x, r in zip(got, ref))
        if errs[name] > 1e-4:
            sys.exit(f"error: {name} differs from the sequential loop (max relative error {errs[name]:.2e})")
    del ref, got

    # memory-bandwidth bound: fwd reads a, b and writes h; bwd reads a, h, grad_h and writes grad_a, grad_b
    n = B * T * K
    scan_bytes = 4 * ((n + 2 * n + 2 * n) + (n + 2 * n + 2 * n + n + 2 * n))  # 13 * 4 B per (b, t, k)
    # fp32, 1 GiB on CUDA and 256 MiB on CPU: beyond the last-level cache (a 16 MiB copy ran from a 32 MiB L3)
    src = torch.empty(2**28 if CUDA else 2**26, device=DEV)
    dst = torch.empty_like(src)
    copy_ms, _ = timed(lambda: dst.copy_(src), reps=10, warmup=2)
    bw = 2 * src.numel() * 4 / (copy_ms / 1000)  # bytes read + written per second
    del src, dst
    bound_ms = scan_bytes / bw * 1000

    results = {}
    for name, fn in impls.items():
        r = seq_reps if fn is scan_sequential else reps
        ms, peak = timed(lambda: fwd_bwd(fn), reps=r, warmup=1 if fn is scan_sequential else 3)
        results[name] = (ms, peak, saved_mib(fn, a, b), r)
    fastest = min((k for k in results if k.startswith("ours")), key=lambda k: results[k][0])
    ours, naive = results[fastest][0], results[NAIVE][0]
    # Paired, so that drift of a shared host hits both alike: per round the reference once, then ours twice, first
    # straight after the reference (its 236 MiB swept the caches), then again (warm, as the medians are timed)
    def paired():
        cold, warm = [], []
        for _ in range(reps):
            r, c, w = (timed(lambda: fwd_bwd(fn), 1, 0)[0] for fn in (scan_naive_ks, impls[fastest], impls[fastest]))
            cold.append(r / c)
            warm.append(r / w)
        return cold, warm

    cold, warm = paired()
    rows = [[name, f"{ms:.3f}", f"{naive / ms:.1f}", fmt(peak, ".1f"), f"{sv:.3g}", f"{errs[name]:.1e}", r]
            for name, (ms, peak, sv, r) in results.items()]
    rows.append([f"bandwidth lower bound ({scan_bytes / 1e6:.3g} MB at {bw / 1e9:.3g} GB/s)", f"{bound_ms:.3f}",
                 f"{naive / bound_ms:.1f}", "", "", "", ""])
    print(f"\n#### Scan forward+backward (B={B}, T={T}, K={K} complex pairs sharing one decay, fp32)\n")
    print(table(["implementation", "ms (median)", "x faster than seed-style", "peak MiB", "saved for bwd MiB",
                 "max rel err vs loop", "repeats"], rows))
    print(f"\nfaster of ours / seed-style = {ours / naive:.3f}, ours/lower bound = {ours / bound_ms:.1f}. Lower bound: forward reads a, b and "
          f"writes h, backward reads a, h, grad_h and writes grad_a, grad_b: 13 x 4 bytes per (b, t, k); ours moves 21 "
          f"(it reads a and b twice forward, a and grad_h twice backward, and grad_b and h once more for grad_a). Bandwidth "
          f"measured as a {'1 GiB' if CUDA else '256 MiB'} device copy, read + write bytes. Peak MiB: allocated above the inputs.")
    for name, ratios in (("straight after the reference", cold), ("again, warm", warm)):
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        print(f"\nPaired, {fastest} {name}: {len(ratios)} rounds, seed-style/ours median {med:.1f}x "
              f"(quartiles {q1:.1f}-{q3:.1f}x).")
    if runs < 2:
        return
    # The same comparison repeated in this process: a shared host drifts by tens of percent within seconds, so one
    # repeat's ratio is one sample; the figure to quote is the median over repeats
    rows, ratios, colds, warms = [], [], [], []
    for i in range(runs):
        (r, _), (o, _) = (timed(lambda: fwd_bwd(fn), reps, 1) for fn in (scan_naive_ks, impls[fastest]))
        ratios.append(r / o)
        cold, warm = (statistics.median(x) for x in paired())
        colds.append(cold)
        warms.append(warm)
        rows.append([i + 1, f"{r:.3f}", f"{o:.3f}", f"{r / o:.1f}", f"{cold:.1f}", f"{warm:.1f}"])
    print(f"\n#### The reference against {fastest}, repeated (each row: the median of {reps} calls of the reference, "
          f"then of {reps} of ours, then {reps} paired rounds as above)\n")
    print(table(["repeat", "seed-style ms", "ours ms", "ratio of medians", "paired, straight after", "paired, warm"], rows))
    for name, xs in (("ratio of medians", ratios), ("paired, straight after", colds), ("paired, warm", warms)):
        print(f"\nOver {runs} repeats, {name}: median {statistics.median(xs):.1f}x (range {min(xs):.1f}-{max(xs):.1f}x).")


# ----------------------------------------------------------------------------- training step

def hparams(**env):
    old = dict(os.environ)
    os.environ.update(env)
    try:
        return tg.Hyperparameters()
    finally:
        os.environ.clear()
        os.environ.update(old)


def build(model_type, tiny, compile_):
    h = hparams(MODEL_TYPE=model_type, **(TINY_MODEL if tiny else {}))
    torch.manual_seed(0)
    base = tg.GPT(h).to(DEV)
    model = torch.compile(base, dynamic=False) if compile_ else base
    opts, params = tg.make_optimizers(base, h), list(base.parameters())
    ids = torch.randint(0, h.vocab_size, (h.micro_batch_seqs, h.train_seq_len + 1), device=DEV)
    ids[torch.rand(ids.shape, device=DEV) < 1 / 300] = h.bos_id  # a few document starts: exercise the state reset
    x, y = ids[:, :-1], ids[:, 1:]

    def step(lr_mult=1.0):  # as train_gpt.train_step, one micro-batch
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
        with tg.autocast(DEV):
            loss = model(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(params, float("inf"))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return h, base, step


def bench_step(model_type, tiny, compile_, reps, warmup):
    torch._dynamo.reset()
    h, base, step = build(model_type, tiny, compile_)
    for _ in range(warmup):
        step()
    sync()
    frames = sum(torch._dynamo.utils.counters["frames"].values())
    i = [0]

    def timed_step():  # learning rates change every step and QAT switches on halfway: neither may recompile
        if i[0] == reps // 2:
            tg.set_qat(base, True)
        step(1.0 - 0.5 * i[0] / reps)
        i[0] += 1

    ms, peak = timed(timed_step, reps=reps, warmup=0)
    recompiles = sum(torch._dynamo.utils.counters["frames"].values()) - frames if compile_ else None
    if CUDA:
        peak = torch.cuda.max_memory_allocated() / 2**30
    del base, step
    return h, ms, peak, recompiles


# ----------------------------------------------------------------------------- blocks, kernels, optimizer

def bench_blocks(h, B, reps, compile_):
    """One TRN block against one attention block (each with its MLP), forward + backward at the same shape;
    and the number of kernels inductor generates for the TRN block with the previous and the current scan."""
    from torch._inductor import metrics
    x = torch.randn(B, h.train_seq_len, h.model_dim, device=DEV, requires_grad=True)
    ids = torch.randint(2, h.vocab_size, (B, h.train_seq_len), device=DEV)
    keep = torch.ones(B, h.train_seq_len, 1, device=DEV)
    ctx = (keep, torch.log1p(torch.arange(h.train_seq_len, device=DEV).float()).expand(B, -1)[..., None])
    rows, kernels = [], {}
    for name, attn in (("TRN block", False), ("attention block", True)):
        torch.manual_seed(0)
        block = tg.Block(h, attn).to(DEV)
        fn = torch.compile(block, dynamic=False) if compile_ else block

        def fwd_bwd():
            with tg.autocast(DEV):
                fn(x, x, ctx).float().square().mean().backward()

        ms, _ = timed(fwd_bwd, reps=reps, warmup=2)
        rows.append([name, f"{ms:.3f}"])
        if compile_ and not attn:
            for label, scan in (("previous doubling scan", scan_doubling), ("blocked scan", tg.kogge_stone_scan)):
                torch._dynamo.reset()
                metrics.reset()
                orig, tg.kogge_stone_scan = tg.kogge_stone_scan, scan
                try:
                    torch.compile(block, dynamic=False)(x, x, ctx).float().square().mean().backward()
                finally:
                    tg.kogge_stone_scan = orig
                kernels[label] = metrics.generated_kernel_count
    del ids
    print(f"\n#### One block, forward + backward ({'compiled' if compile_ else 'eager'}; B={B}, T={h.train_seq_len}, "
          f"dim {h.model_dim}, K={h.num_oscillators})\n")
    print(table(["block", "ms (median)"], rows))
    print(f"\nTRN/attention block = {float(rows[0][1]) / float(rows[1][1]):.3f}")
    if kernels:
        print("inductor kernels generated for one TRN block forward + backward: " +
              ", ".join(f"{k} {v}" for k, v in kernels.items()))


def bench_optimizer(h, reps):
    """One Muon step over the model's matrices: train_gpt.Muon (batched Newton-Schulz) against torch.optim.Muon."""
    torch.manual_seed(0)
    base = tg.GPT(h).to(DEV)
    mats = tg.param_groups(base)["matrix"]
    for p in mats:
        p.grad = torch.randn_like(p)
    rows = []
    for name, cls, extra in (("torch.optim.Muon", torch.optim.Muon, dict(adjust_lr_fn="original")),
                             ("train_gpt.Muon", tg.Muon, {})):
        opt = cls(mats, lr=0.02, momentum=0.95, weight_decay=0.04, ns_steps=h.muon_backend_steps, **extra)
        ms, _ = timed(opt.step, reps=reps, warmup=1)
        rows.append([name, f"{ms:.2f}"])
    shapes = len({tuple(p.shape) for p in mats})
    print(f"\n#### Muon step over the {len(mats)} matrices ({shapes} shapes) of the {h.num_layers}-layer, "
          f"dim-{h.model_dim} model\n")
    print(table(["optimizer", "ms (median)"], rows))
    print(f"\ntrain_gpt.Muon / torch.optim.Muon = {float(rows[1][1]) / float(rows[0][1]):.3f}")


# ----------------------------------------------------------------------------- per-layer-type profile

def profile_hybrid(tiny):
    """One eager hybrid step under torch.profiler. Forward ops are attributed to a layer type by the
    record_function range they run in; backward ops by the autograd sequence number of their forward op."""
    from torch.profiler import ProfilerActivity, profile, record_function
    h, base, step = build("hybrid", tiny, compile_=False)
    kinds = {tg.TRN: "TRN", tg.Attention: "Attention", tg.MLP: "MLP"}
    ranges = {}

    def pre(m, args):
        ranges[id(m)] = record_function(f"fwd:{kinds[type(m)]}").__enter__()

    def post(m, args, out):
        ranges.pop(id(m)).__exit__(None, None, None)

    for m in base.modules():
        if type(m) in kinds:
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        step()
        sync()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async]  # ops; kernels hang off them
    dur = (lambda e: e.device_time_total) if CUDA else (lambda e: e.cpu_time_total)
    fwd, bwd, seq_kind = {}, {}, {}

    def walk(e, kind):
        if e.sequence_nr >= 0:
            seq_kind[e.sequence_nr] = kind
        for c in e.cpu_children:
            walk(c, kind)

    for e in events:
        if e.name.startswith("fwd:") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("fwd:")):
            kind = e.name[4:]
            fwd[kind] = fwd.get(kind, 0) + dur(e)
            walk(e, kind)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in seq_kind:
            kind = seq_kind[e.sequence_nr]
            bwd[kind] = bwd.get(kind, 0) + dur(e)
    total = sum(dur(e) for e in events if e.cpu_parent is None)  # all threads: forward, backward, optimizer
    counts = {k: sum(type(m) is t for m in base.modules()) for t, k in kinds.items()}
    rows = [[k, counts[k], f"{fwd.get(k, 0) / 1e3:.2f}", f"{bwd.get(k, 0) / 1e3:.2f}",
             f"{(fwd.get(k, 0) + bwd.get(k, 0)) / 1e3:.2f}", f"{100 * (fwd.get(k, 0) + bwd.get(k, 0)) / total:.0f}%"]
            for k in ("TRN", "Attention", "MLP")]
    rest = total - sum(fwd.values()) - sum(bwd.values())
    rows.append(["other (embeddings, norms, head, loss, optimizer)", "", "", "", f"{rest / 1e3:.2f}", f"{100 * rest / total:.0f}%"])
    print(f"\n#### Per-layer-type profile of one eager hybrid step ({'GPU kernel' if CUDA else 'CPU'} time, profiler overhead included)\n")
    print(table(["layer type", "layers", "fwd ms", "bwd ms", "total ms", "share"], rows))


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes (automatic without CUDA)")
    ap.add_argument("--no-compile", action="store_true", help="eager training step on CUDA too")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step off CUDA too (needs a C++ compiler)")
    ap.add_argument("--profile", action="store_true", help="per-layer-type profile of one eager hybrid step")
    ap.add_argument("--reps", type=int, default=0, help="timed repeats (default 20 full, 5 tiny)")
    ap.add_argument("--scan-shape", default="", help="B,T,K of the scan benchmark (default: one rank's micro-batch "
                    "of the model benchmarked, 64,1024,256 full, 2,128,16 tiny)")
    ap.add_argument("--scan-only", action="store_true", help="only the scan benchmark")
    ap.add_argument("--runs", type=int, default=1, help="repeat the scan's reference-against-ours timing this many "
                    "times and print the median over repeats (default 1: no repeats)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error(f"--runs must be at least 1, got {args.runs}")
    tiny = args.tiny or not CUDA
    reps = args.reps or (5 if tiny else 20)
    compile_ = (CUDA or args.compile) and not args.no_compile
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train_gpt.py
    h = hparams(**(TINY_MODEL if tiny else {}))
    B, T, K = (map(int, args.scan_shape.split(",")) if args.scan_shape
               else (h.micro_batch_seqs, h.train_seq_len, h.num_oscillators))
    dev_name = torch.cuda.get_device_name() if CUDA else f"CPU ({torch.get_num_threads()} threads)"
    print(f"### Speed benchmark: {dev_name}, torch {torch.__version__}{', CUDA ' + torch.version.cuda if CUDA else ''}, "
          f"{'tiny' if tiny else 'full'} sizes (scan B={B} T={T} K={K}), training step {'compiled' if compile_ else 'eager'}, "
          f"{'bf16 autocast' if CUDA else 'fp32 (no autocast off CUDA)'}")

    bench_scan(B, T, K, reps, min(reps, 3), compile_, args.runs)
    if args.scan_only:
        return
    bench_blocks(h, h.micro_batch_seqs, reps, compile_)
    bench_optimizer(h, max(3, reps // 4))

    rows, ms, hs = [], {}, {}
    for mt in ("hybrid", "transformer"):
        hs[mt], ms[mt], peak, recompiles = bench_step(mt, tiny, compile_, reps=max(reps, 4), warmup=2 if tiny else 5)
        h = hs[mt]
        tokens = h.micro_batch_seqs * h.train_seq_len
        rows.append([mt, f"{ms[mt]:.2f}", f"{tokens / ms[mt] * 1000:,.0f}", fmt(peak), fmt(recompiles, "d")])
        if recompiles:
            print(f"warning: {mt}: {recompiles} recompiles after warmup", file=sys.stderr)
    print(f"\n#### Training step (forward + backward + Muon/Adam step; {h.num_layers} layers, dim {h.model_dim}, "
          f"micro-batch {h.micro_batch_seqs} x {h.train_seq_len} tokens, hybrid attention at layers {sorted(hs['hybrid'].attn_layers)})\n")
    print(table(["model", "ms/step", "tokens/s", "peak GiB", "recompiles after warmup (lr changes, QAT on)"], rows))
    print(f"\nhybrid/transformer ms per step = {ms['hybrid'] / ms['transformer']:.3f}")
    if args.profile:
        profile_hybrid(tiny)


if __name__ == "__main__":
    main()
