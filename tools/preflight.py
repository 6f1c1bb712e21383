"""Preflight for a paid run: on the rented machine, with the run's own environment variables, check what would
otherwise fail or disappoint minutes into the run. Writes one Markdown report (stdout and
logs/preflight_<RUN_ID>.md) and the same figures as JSON (logs/preflight_<RUN_ID>.json).

    python tools/preflight.py                                     # one process
    torchrun --standalone --nproc_per_node=8 tools/preflight.py   # also the all-reduce; rank 0 writes the report

Stages, in order, each timed; a stage that raises is reported in one line and the next one still runs:
  1 environment (torch, CUDA, bf16, flash SDPA, packages); data, checked with train_gpt's own functions, and the
    run's refusals (an existing log or checkpoints of RUN_ID, a RESUME_FROM checkpoint that does not load or match);
    all-reduce bandwidth of a gradient-sized buffer (under torchrun)
  2 size: parameters by quantization group; artifact estimate (fit_budget on Gaussian weights) vs BUDGET_BYTES
  3 parity: loss and gradients of torch.compile against eager, QAT off and on
  4 memory: the largest micro-batch (MICRO_BATCH_SEQS, halved on OOM) whose full training step fits; peak memory
  5 speed: step time of hybrid and transformer, recompiles after warmup, projected steps in MAX_WALLCLOCK_SECONDS
  6 evaluation: flat, sliding and TTT throughput on a slice of the validation split, projected to all of it
  7 scan: tests/bench_speed.py's scan benchmark at the training shape, with its memory-traffic bound
PREFLIGHT_SECONDS (default 480) is a deadline: a stage whose time guess (STAGES) no longer fits is skipped.
Under torchrun every rank checks its own GPU (size and scan: rank 0 only); rank 0's report lists every rank's
failures, and every rank exits with the worst status. The report is rewritten after each stage (INCOMPLETE until
the last), so a preflight killed by a timeout keeps what it measured.
Exit status: 0 passed; 1 a check failed (parity, no micro-batch fits, over budget) or a stage raised; 2 an input
error (settings, data, tokenizer). Warnings (flash unavailable, recompiles, evaluation over EVAL_MAX_SECONDS, a
smaller micro-batch than MICRO_BATCH_SEQS) do not change it.
"""
import contextlib, copy, datetime, gc, glob, importlib, inspect, io, json, math, os, re, resource, statistics, sys, time, traceback
from types import SimpleNamespace

T_START = time.time()  # before torch is imported: the import counts against PREFLIGHT_SECONDS too
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt as tg  # noqa: E402

CUDA = torch.cuda.is_available()


class Skip(Exception):
    """The stage does not apply here; the message says why."""


class Section:
    """One stage's report: Markdown lines, figures for the JSON, failures (input_error: a UserError) and warnings."""

    def __init__(self, num, key, title):
        self.num, self.key, self.title, self.lines, self.figs = num, key, title, [], {}
        self.fails, self.warns, self.input_error, self.status, self.seconds = [], [], False, "ok", 0.0

    def add(self, text, **figs):
        self.lines.append(text)
        self.figs.update(figs)

    def fail(self, msg, input_error=False):
        if msg not in self.fails:
            self.fails.append(msg)
        self.input_error |= input_error


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def print_nothing(msg):
    pass


def secs(x):
    return f"{x:,.1f}" if x >= 1 else f"{x:.2g}"


def peak_mib(reset=False):
    if CUDA and reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**20 if CUDA else None


def hparams(**over):
    """Hyperparameters() with some variables overridden in os.environ for the call."""
    old = {k: os.environ.get(k) for k in over}
    os.environ.update(over)
    try:
        return tg.Hyperparameters()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def gaussian_(model):
    """Every quantized matrix Gaussian, std 1/sqrt(fan_in) (tests/test_export.py random_state): trained-like weights,
    and no zero-initialized projection zeroing the gradients upstream of it."""
    g, qgroups = torch.Generator().manual_seed(0), tg.quant_groups(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in qgroups:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def tokens(P, B, T):
    """(x, y, source) of B sequences of T: validation tokens when loaded, else random ids."""
    if P.val is not None and P.val.numel() > B * T:
        t, src = P.val[:B * T + 1].long(), "validation tokens"
    else:
        t, src = torch.randint(P.h.vocab_size, (B * T + 1,), generator=torch.Generator().manual_seed(0)), "random ids"
    t = t.to(P.dev)
    return t[:-1].view(B, T), t[1:].view(B, T), src


def trainer(P, h, B):
    """A model (compiled when COMPILE=1), the run's optimizers, and one micro-batch step as in Trainer.train_step."""
    torch.manual_seed(h.seed)
    base = tg.GPT(h).to(P.dev)
    model = torch.compile(base, dynamic=False) if h.compile else base
    opts, params = tg.make_optimizers(base, h), list(base.parameters())
    x, y, _ = tokens(P, B, h.train_seq_len)

    def step(lr_mult=1.0):
        for opt in opts:
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * lr_mult
        with tg.autocast(P.dev):
            loss = model(x, y)
        loss.backward()
        nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return SimpleNamespace(base=base, step=step)


# ----------------------------------------------------------------------------- 1. environment, data, all-reduce

def stage_environment(P, s):
    h = P.h
    s.add(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}; world size "
          f"{P.run.world_size}; COMPILE={int(h.compile)}", torch=torch.__version__, world_size=P.run.world_size)
    if CUDA:
        pr, bf16 = torch.cuda.get_device_properties(P.dev), torch.cuda.is_bf16_supported()
        s.add(f"- GPU: {pr.name}, {pr.total_memory / 2**30:.1f} GiB, sm_{pr.major}{pr.minor}, "
              f"{torch.cuda.device_count()} visible; bf16: {'yes' if bf16 else 'NO'}", gpu=pr.name, bf16=bf16)
        if not bf16:
            s.fail("no bf16 support: the run autocasts to bf16")
    else:
        s.add("- GPU: none (CUDA not available): a run here uses the CPU, in fp32", gpu=None, bf16=None)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    hd, dt = h.model_dim // h.num_heads, torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(2, h.num_heads, 256, hd, device=P.dev, dtype=dt, requires_grad=True)
    kv = torch.randn(2, h.num_kv_heads, 256, hd, device=P.dev, dtype=dt)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            gqa = h.num_kv_heads != h.num_heads
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=gqa).sum().backward()
        flash = "yes"
    except RuntimeError as e:
        flash = "no: " + str(e).strip().splitlines()[0][:160]
    s.add(f"- SDPA flash backend ({str(dt)[6:]}, causal, {h.num_heads}/{h.num_kv_heads} heads of {hd}, forward+backward): "
          f"{flash}", flash=flash == "yes")
    if CUDA and flash != "yes":
        s.warns.append("SDPA cannot use flash attention at the model's shape: attention falls back to a slower kernel")
    for mod in ("zstandard", "sentencepiece"):
        try:
            s.add(f"- {mod} {getattr(importlib.import_module(mod), '__version__', '?')}: importable", **{mod: True})
        except ImportError:
            s.fail(f"{mod} is not importable: pip install {mod}", input_error=True)


def stage_data(P, s):
    """As load_inputs checks them (which cannot be called: it starts the run's log), each part on its own."""
    h = P.h

    def train():
        files = tg.shard_files(h.data_path, "train")
        P.train_tokens = n = sum(tg.shard_len(f) for f in files)
        tg.TrainLoader(h, P.run.rank, P.run.world_size, torch.device("cpu"))  # first shard's ids, split over ranks
        s.add(f"- train: {len(files)} shards, {n:,} tokens ({n / h.train_batch_tokens:,.0f} batches of "
              f"TRAIN_BATCH_TOKENS)", train_shards=len(files), train_tokens=n)

    def tokenizer():
        import sentencepiece as spm
        if not os.path.isfile(h.tokenizer_path):
            raise tg.UserError(f"TOKENIZER_PATH={h.tokenizer_path} does not exist; {tg.DOWNLOAD_HINT}")
        try:
            sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
        except Exception:
            raise tg.UserError(f"TOKENIZER_PATH={h.tokenizer_path} is not a SentencePiece model") from None
        P.luts = tg.byte_luts(sp, h.vocab_size)
        if h.reset_at_bos and sp.bos_id() != h.bos_id:
            raise tg.UserError(f"BOS_ID={h.bos_id} but the tokenizer's BOS id is {sp.bos_id()}")
        s.add(f"- tokenizer: {sp.vocab_size()} pieces (= VOCAB_SIZE), BOS id {sp.bos_id()}", vocab_size=sp.vocab_size())

    def val():
        files = tg.shard_files(h.data_path, "val")
        v = np.concatenate([tg.load_shard(f, h.vocab_size) for f in files])
        P.val = torch.from_numpy(v.astype(np.int32)).to(P.dev)
        s.add(f"- validation: {len(files)} shards, {v.size:,} tokens, {v.size - 1:,} targets, "
              f"{len(tg.doc_spans(P.val, h.bos_id)):,} documents", val_tokens=v.size, val_targets=v.size - 1)
        if P.luts is not None:
            b = int(tg.target_bytes(P.val, P.luts).sum())
            s.add(f"- validation bytes: {b:,} ({b / (v.size - 1):.3f} per target)", val_bytes=b)

    def outputs():  # setup_run's refusals, which would stop the run at once
        g = copy.copy(h)
        g.checkpoint_dir = h.checkpoint_dir or os.path.join("checkpoints", h.run_id)
        if h.resume_from:
            path, ck = tg.load_checkpoint(g, h.resume_from)
            s.add(f"- resume: {path} (step {ck['step']}) was made with these settings")
        elif not h.overwrite:
            log = os.path.join("logs", f"{h.run_id}.txt")
            if h.run_id and os.path.exists(log):
                raise tg.UserError(f"{log} exists: pick another RUN_ID, or set OVERWRITE=1 or RESUME_FROM")
            if (h.run_id or h.checkpoint_dir) and glob.glob(os.path.join(g.checkpoint_dir, "step_*.pt")):
                raise tg.UserError(f"CHECKPOINT_DIR={g.checkpoint_dir} holds another run's checkpoints: "
                                   "set RESUME_FROM, or OVERWRITE=1 to delete them")

    for part in (train, tokenizer, val, outputs):
        try:
            part()
        except (tg.UserError, ImportError) as e:  # ImportError: sentencepiece is missing
            s.fail(f"input error: {e}", input_error=True)


def stage_allreduce(P, s):
    run = P.run
    if not run.distributed:
        raise Skip("one process (under torchrun it is measured)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if CUDA else "gloo", device_id=run.device if CUDA else None,
                                timeout=datetime.timedelta(minutes=5))
    try:
        buf, W = torch.zeros(P.n_params, device=P.dev), run.world_size
        sec = statistics.median([timed(lambda: dist.all_reduce(buf)) for _ in range(6)][1:])
    finally:  # the later stages run on each process alone: no collective can hang on a rank that skipped a stage
        dist.destroy_process_group()
    alg = 4 * P.n_params / sec
    s.add(f"- all-reduce of {P.n_params:,} fp32 ({4 * P.n_params / 2**20:.3g} MiB, one gradient) over {W} processes, "
          f"median of 5: {1000 * sec:.2f} ms = {alg / 1e9:.2f} GB/s algorithm, {alg * 2 * (W - 1) / W / 1e9:.2f} GB/s bus",
          allreduce_ms=1000 * sec, algbw_gbs=alg / 1e9)
    s.add("- then the process group is closed: the later stages run on each process alone (Muon without its all-gather)")


# ----------------------------------------------------------------------------- 2. size

def stage_size(P, s):
    h = P.h
    if not P.run.master:
        raise Skip("rank 0 only")
    s.add("- params " + " ".join(f"{g}:{n}" for g, n in {"total": P.n_params, **P.counts}.items()), params=P.counts)
    torch.manual_seed(h.seed)
    model = gaussian_(tg.GPT(h))
    state, logged = {k: v.detach() for k, v in model.state_dict().items()}, []
    code = len(open(tg.__file__, "rb").read())
    blob = tg.fit_budget(state, tg.quant_groups(model), h, code, logged.append)
    total = code + len(blob)
    margin = h.budget_bytes - total
    s.add(f"- estimated artifact (quantized matrices Gaussian, std 1/sqrt(fan_in)): {total:,} bytes (code {code:,} + "
          f"model {len(blob):,}) of BUDGET_BYTES={h.budget_bytes:,}: margin {margin:+,} "
          f"({100 * margin / h.budget_bytes:+.2f}%)",
          total_bytes=total, code_bytes=code, model_bytes=len(blob), margin_bytes=margin, fit_budget_log=logged)
    s.lines += [f"- fit_budget logged: `{line}`" for line in logged]
    if margin < 0:
        s.fail(f"over budget: estimated artifact {total:,} bytes > BUDGET_BYTES={h.budget_bytes:,}; "
               "lower QUANT_BITS or shrink the model")
    elif any(line.startswith("quant_mismatch") for line in logged):
        s.warns.append("QUANT_BITS does not fit: the export would lower bits below the grid QAT trains")


# ----------------------------------------------------------------------------- 3. parity

def stage_parity(P, s):
    h, dev = P.h, P.dev
    torch.manual_seed(h.seed)
    model = gaussian_(tg.GPT(h)).to(dev)
    other, groups = torch.compile(model, dynamic=False) if h.compile else model, tg.param_groups(model)
    x, y, src = tokens(P, 2, h.train_seq_len)

    def run(m, cast=True):  # {"loss": [loss], group: [grads]}
        model.zero_grad(set_to_none=True)
        with tg.autocast(dev) if cast else contextlib.nullcontext():
            loss = m(x, y)
        loss.backward()
        out = {"loss": [loss.detach().double().view(1)]}
        for g, ps in groups.items():
            out[g] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in ps]
        if not all(bool(torch.isfinite(t).all()) for v in out.values() for t in v):
            raise FloatingPointError(f"non-finite loss or gradient ({'compiled' if m is other else 'eager'})")
        return out

    def rel(a, b):  # |a - b| / |b| over the group's tensors together
        num = sum((u.double() - v.double()).square().sum() for u, v in zip(a, b))
        return float(num.sqrt() / sum(v.double().square().sum() for v in b).sqrt().clamp_min(1e-30))

    keys = ["loss", *groups]
    worst, noise, rows = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0), []
    for qat in (False, True):
        if qat:
            tg.refresh_qclips(model)
            tg.set_qat(model, True)
        t0 = time.time()
        e = run(model)
        t1 = time.time()
        c = run(other)
        if h.compile and not qat:  # measured: the later stages' time guesses use it
            P.C = max(5.0, time.time() - t1 - (t1 - t0))
            s.add(f"- first compiled forward+backward took {P.C:.0f} s more than eager", compile_s=P.C)
        d = {k: rel(c[k], e[k]) for k in keys}
        if CUDA:  # yardstick: eager bf16 against eager fp32 (autocast and TF32 off)
            torch.backends.cuda.matmul.allow_tf32 = False
            f = run(model, cast=False)
            torch.backends.cuda.matmul.allow_tf32 = True
            noise = {k: max(noise[k], rel(e[k], f[k])) for k in keys}
        worst = {k: max(worst[k], d[k]) for k in keys}
        cells = [f"{float(e['loss'][0]):.5f}"] + [f"{d[k]:.2e}" for k in keys]
        rows.append(f"| {'on' if qat else 'off'} | " + " | ".join(cells) + " |")
    tg.set_qat(model, False)
    base_tol = {"loss": 1e-2 if CUDA else 1e-5, **dict.fromkeys(groups, 5e-2 if CUDA else 1e-4)}
    tols = {k: max(base_tol[k], 2 * noise[k]) for k in keys}
    ok = all(worst[k] <= tols[k] for k in keys)
    what = ("torch.compile(dynamic=False) vs eager" if h.compile
            else "COMPILE=0 (the run does not compile): two eager passes")
    s.add(f"- {what}, 2 x {h.train_seq_len} {src}, trained-like weights (as the size estimate), "
          f"{'bf16 autocast' if CUDA else 'fp32'}; relative difference |a-b|/|b| of the loss and of each parameter group:")
    s.lines += ["", "| QAT | eager loss | " + " | ".join(keys) + " |", "|---" * (2 + len(keys)) + "|", *rows,
                "| tolerance | | " + " | ".join(f"{tols[k]:.0e}" for k in keys) + " |"]
    if CUDA:
        s.lines.append("| eager bf16 vs fp32 | | " + " | ".join(f"{noise[k]:.1e}" for k in keys) + " |")
    s.add("", parity_worst=worst, parity_tolerance=tols, parity_pass=ok)
    why = ("bf16: 1e-2 (loss), 5e-2 (gradients), or twice eager bf16's own distance from fp32 if larger: compiled "
           "kernels round to bf16 at other places than eager (unit roundoff 2^-8, compounding over the layers)" if CUDA
           else "fp32: 1e-5 (loss), 1e-4 (gradients): compiled kernels only reorder fp32 sums, a few ulps (~1e-6)")
    s.add(f"- tolerance: {why}; a wrong graph differs by O(1)")
    s.add(f"- parity: {'pass' if ok else 'FAIL'}")
    if not ok:
        s.fail("parity: " + ", ".join(f"{k} {worst[k]:.2e} > {tols[k]:.0e}" for k in keys if worst[k] > tols[k]))


# ----------------------------------------------------------------------------- 4. memory

def stage_memory(P, s):
    h = P.h

    def attempt(B):  # a trainer after two full steps at micro-batch B (peak: of the second), None on OOM
        try:
            tr = trainer(P, h, B)
            tr.step()  # compiles; creates the optimizer state
            peak_mib(reset=True)
            tr.step()
            sync()
            return tr
        except torch.cuda.OutOfMemoryError:
            return None

    B = h.micro_batch_seqs
    while (tr := attempt(B)) is None:
        s.add(f"- micro-batch {B}: out of memory")
        free()
        if B == 1:
            return s.fail("no micro-batch fits, not even 1 sequence: shrink the model or TRAIN_SEQ_LEN")
        B //= 2
    P.micro, P.trained = B, tr
    s.add(f"- largest micro-batch whose full training step fits (from MICRO_BATCH_SEQS={h.micro_batch_seqs}, halving): "
          f"{B} x {h.train_seq_len} tokens", micro_batch_fits=B)
    if CUDA:
        a, r = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
        s.add(f"- peak of a full step (forward, backward, optimizer): allocated {a:,.0f} MiB, reserved {r:,.0f} MiB of "
              f"{torch.cuda.get_device_properties(P.dev).total_memory / 2**20:,.0f} MiB",
              peak_allocated_mib=a, peak_reserved_mib=r)
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        s.add(f"- CPU: device memory not measured; process max RSS so far {rss:,.0f} MiB", max_rss_mib=rss)
    if B < h.micro_batch_seqs:
        s.warns.append(f"MICRO_BATCH_SEQS={h.micro_batch_seqs} does not fit: the run's warmup would halve it to {B} "
                       f"(log line micro_batch_seqs:{B}); set MICRO_BATCH_SEQS={B} to skip the failed attempts")


# ----------------------------------------------------------------------------- 5. speed

def stage_speed(P, s):
    h, B, T = P.h, P.micro or P.h.micro_batch_seqs, P.h.train_seq_len
    n, res, graphs = 20 if CUDA else 10, {}, lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for mt in sorted(("hybrid", "transformer"), key=lambda m: m != h.model_type):  # the run's first: frees P.trained
        try:
            if mt == h.model_type and P.trained:  # the memory stage's model, compiled at this shape already
                tr, P.trained = P.trained, None
            else:
                tr = trainer(P, hparams(MODEL_TYPE=mt), B)
            for _ in range(3):
                tr.step()
            g0, times = graphs(), []
            for i in range(n):  # learning rates change every step and QAT switches on halfway: neither may recompile
                if i == n // 2:
                    tg.refresh_qclips(tr.base)
                    tg.set_qat(tr.base, True)
                times.append(1000 * timed(lambda: tr.step(1.0 - 0.5 * i / n)))
            res[mt] = (statistics.median(times), graphs() - g0 if h.compile else None)
        except torch.cuda.OutOfMemoryError:
            res[mt] = None
        tr = None
        free()
    s.add(f"- {'compiled' if h.compile else 'eager (COMPILE=0)'} training step (forward, backward, Muon/Adam) at "
          f"micro-batch {B} x {T}, median of {n} after 3 warmup steps:")
    s.lines += ["", "| model | ms/step | tokens/s | recompiles_after_warmup |", "|---|---|---|---|"]
    for mt, r in res.items():
        cells = ["out of memory", "", ""] if r is None else [f"{r[0]:.2f}", f"{B * T / r[0] * 1000:,.0f}",
                                                             "n/a (eager)" if r[1] is None else r[1]]
        s.lines.append(f"| {mt} | " + " | ".join(map(str, cells)) + " |")
    s.add("", step_ms={k: r and r[0] for k, r in res.items()},
          recompiles_after_warmup={k: r and r[1] for k, r in res.items()})
    if res["hybrid"] and res["transformer"]:
        ratio = res["hybrid"][0] / res["transformer"][0]
        s.add(f"- hybrid/transformer = {ratio:.3f}", ratio=ratio)
    if any(r and r[1] for r in res.values()):
        s.warns.append("recompiles after warmup: the run would compile during training")
    if not res.get(h.model_type):
        return s.fail(f"MODEL_TYPE={h.model_type}: no step time")
    ms, accum = res[h.model_type][0], h.train_batch_tokens / (B * T)
    s.add(f"- projection for MODEL_TYPE={h.model_type}: a step of TRAIN_BATCH_TOKENS={h.train_batch_tokens:,} is {accum:g} "
          "micro-steps each timed as above (a real step runs the optimizer once: slightly pessimistic); 8 processes: "
          "each does 1/8, assuming perfect scaling, the all-reduce hidden and the same GPU as this one")
    proj = {}
    for W in sorted({1, P.run.world_size, 8}):
        step_s = ms * accum / W / 1000
        steps = h.max_wallclock_seconds / step_s if h.max_wallclock_seconds else h.iterations
        proj[W] = {"step_ms": 1000 * step_s, "steps": min(steps, h.iterations)}
        passes = min(steps, h.iterations) * h.train_batch_tokens / (P.train_tokens or math.inf)
        seen = f"; {passes:.2f} passes over the training tokens" if P.train_tokens else ""
        s.add(f"- {W} process{'es' if W > 1 else ''}: {1000 * step_s:,.1f} ms per step -> " +
              (f"{steps:,.0f} steps in MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g}" if h.max_wallclock_seconds
               else f"ITERATIONS={h.iterations} in {secs(h.iterations * step_s)} s (no wallclock cap)") +
              (f" (ITERATIONS={h.iterations} stops it first)" if steps > h.iterations else "") + seen)
    s.figs["projection"] = proj


# ----------------------------------------------------------------------------- 6. evaluation

def padded_rows(n, L, stride, batch, W):
    """Window rows the slowest of W ranks runs, padded to full batches (score_windows' one shape)."""
    k = len(tg.eval_windows(n, L, stride)[0])
    return max(math.ceil(len(range(k)[tg.my_share(k, r, W)]) / batch) * batch for r in range(W))


def ttt_work(val, h, W):
    """Token-rows of the windows score_ttt runs on the slowest of W ranks: its batches (ttt_batches), and per chunk
    a window of up to EVAL_SEQ_LEN tokens padded to a multiple of TTT_CHUNK, as its loop makes them."""
    C = h.ttt_chunk
    L = -(-max(h.eval_seq_len, C) // C) * C
    return max(sum(len(lens) * -(-(min(c0 + C, max(lens)) - max(0, c0 + C - L)) // C) * C
                   for _, lens in tg.ttt_batches(val, h, r, W) for c0 in range(0, max(lens), C)) for r in range(W))


def stage_eval(P, s):
    h, dev, val, T = P.h, P.dev, P.val, P.h.train_seq_len
    if val is None:
        raise Skip("no validation tokens (the data stage failed)")
    spans = tg.doc_spans(val, h.bos_id)
    end = next((e for _, e in spans if e >= (65536 if CUDA else 4096)), spans[-1][1])  # whole documents
    vs, n_full, Ws = val[:end + 1], val.numel() - 1, sorted({P.run.world_size, 8})
    torch.manual_seed(h.seed)
    base = tg.GPT(h).to(dev)
    model = torch.compile(base, dynamic=False) if h.compile else base
    modes, proj, rows = [("flat", T, T, lambda W: max(1, h.val_batch_size // (T * W)))], {W: {} for W in Ws}, []
    if 0 < h.eval_stride < h.eval_seq_len:
        modes.append((f"sliding (stride {h.eval_stride})", h.eval_seq_len, h.eval_stride, lambda W: h.eval_batch_seqs))
    for name, L, stride, batch in modes:
        run = lambda: tg.score_windows(model, vs, L, stride, batch(1))
        run()  # warm: compiles when COMPILE=1, as the run's warmup does
        peak_mib(reset=True)
        t = timed(run)
        for W in Ws:
            proj[W][name] = t * padded_rows(n_full, L, stride, batch(W), W) / padded_rows(end, L, stride, batch(1), 1)
        rows.append((name, end / t, peak_mib()))
    if h.ttt_enabled:
        run = lambda: tg.score_ttt(base, vs, h, log=print_nothing, fwd=model)
        run()  # warm: every window shape of the slice
        peak_mib(reset=True)
        t = timed(run)
        for W in Ws:
            proj[W]["ttt"] = t * ttt_work(val, h, W) / ttt_work(vs, h, 1)
        rows.append(("ttt", end / t, peak_mib()))
    s.add(f"- slice: the first {end:,} of {n_full:,} validation targets (whole documents); "
          f"{'compiled' if h.compile else 'eager'} model as in the run; each mode timed on its second pass",
          eval_slice_targets=end)
    s.lines += ["", "| mode | tokens/s (slice) | " + " | ".join(f"projected s, {W} proc" for W in Ws) + " | peak MiB |",
                "|---" * (3 + len(Ws)) + "|"]
    for name, tps, peak in rows:
        s.lines.append(f"| {name} | {tps:,.0f} | " + " | ".join(secs(proj[W][name]) for W in Ws) +
                       f" | {'n/a' if peak is None else f'{peak:,.0f}'} |")
    sums = {W: sum(proj[W].values()) for W in Ws}
    s.lines += ["| all (bounded by EVAL_MAX_SECONDS) | | " + " | ".join(secs(sums[W]) for W in Ws) + " | |", ""]
    s.add("- projection: flat/sliding by padded window batches, TTT by the token-rows of its chunk loop, slowest rank; "
          "the export adds 2 flat passes (prequant, QAT forward) outside EVAL_MAX_SECONDS",
          eval_tokens_per_s={n: r for n, r, _ in rows}, eval_projected_s={str(W): proj[W] for W in Ws})
    for W in Ws:
        verdict = ("fits" if sums[W] <= h.eval_max_seconds
                   else "OVER: TTT would score part of the split without adapting")
        s.add(f"- {W} process{'es' if W > 1 else ''}: {secs(sums[W])} s of EVAL_MAX_SECONDS={h.eval_max_seconds:g}: "
              + verdict)
    if sums[P.run.world_size] > h.eval_max_seconds:
        s.warns.append(f"evaluation projected over EVAL_MAX_SECONDS at world size {P.run.world_size}")


# ----------------------------------------------------------------------------- 7. scan

def stage_scan(P, s):
    if not P.run.master:
        raise Skip("rank 0 only")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import bench_speed
    B, T, K = (P.micro or P.h.micro_batch_seqs, P.h.train_seq_len, P.h.num_oscillators) if CUDA else (2, 128, 16)
    args = dict(B=B, T=T, K=K, reps=10 if CUDA else 3, seq_reps=2, compile_=P.h.compile)
    args = {k: v for k, v in args.items() if k in inspect.signature(bench_speed.bench_scan).parameters}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_speed.bench_scan(**args)
    m = re.search(r"ours/lower bound = (\d+(?:\.\d+)?)", out.getvalue())
    s.add(f"- tests/bench_speed.py bench_scan({', '.join(f'{k}={v}' for k, v in args.items())})"
          f"{'' if CUDA else ', a small shape on CPU'}:", scan_args=args, scan_ours_over_bound=m and float(m[1]))
    s.lines += [line for line in out.getvalue().strip().splitlines() if not line.startswith("####")]


# ----------------------------------------------------------------------------- main

# (number, key, title, function, time guess in s). P.C: seconds of one torch.compile, 45 until parity measures it.
# Stage 1 is never skipped (guess 0): it is cheap, the later stages need its data, and every rank must join the
# all-reduce.
STAGES = [
    ("1", "environment", "Environment", stage_environment, lambda P: 0),
    ("1", "data", "Data", stage_data, lambda P: 0),
    ("1", "allreduce", "All-reduce", stage_allreduce, lambda P: 0),
    ("2", "size", "Size", stage_size, lambda P: 5 + 2e-6 * P.n_params),
    ("3", "parity", "Parity", stage_parity, lambda P: 5 + P.C),
    ("4", "memory", "Memory", stage_memory, lambda P: 10 + P.C),
    ("5", "speed", "Speed", stage_speed, lambda P: 20 + P.C * (1 + (P.trained is None))),
    ("6", "eval", "Evaluation", stage_eval,  # flat, sliding, and TTT's window widths (multiples of TTT_CHUNK)
     lambda P: 30 + P.C * (2 + P.h.ttt_enabled * -(-P.h.eval_seq_len // P.h.ttt_chunk))),
    ("7", "scan", "Scan", stage_scan, lambda P: 20 + 2 * P.C)]  # compiled: the previous scan and ours


def run_stage(P, num, key, title, fn, guess, deadline):
    s, need, left = Section(num, key, title), guess(P), deadline - time.time()
    if need > left:
        s.status = f"skipped: deadline (guess {need:.0f} s, {max(left, 0):.0f} s left)"
        return s
    print(f"preflight: {num}. {title} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        fn(P, s)
    except Skip as e:
        s.status = f"skipped: {e}"
    except (Exception, SystemExit) as e:  # SystemExit: bench_speed exits on a wrong scan
        traceback.print_exc()
        s.fail(f"{key}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}", isinstance(e, tg.UserError))
        s.status = "error"
    s.seconds = time.time() - t0
    if s.status == "ok":
        s.status = "FAIL" if s.fails else "warn" if s.warns else "ok"
    free()
    return s


def report(P, sections, code, t_start, others=()):
    """(Markdown, JSON). code None: the stages so far, written after each one, so a killed preflight keeps them;
    others: the other ranks' failures."""
    took = time.time() - t_start
    verdict = (f"INCOMPLETE** ({len(sections)} of {len(STAGES)} stages done; killed, or still running)" if code is None
               else f"{'PASS' if code == 0 else 'FAIL'}** (exit {code})")
    head = ["# Preflight", "", f"**{verdict} in {took:.0f} s of PREFLIGHT_SECONDS={P.budget:g}"
            f"{' (over it: a stage ran past its guess)' if took > P.budget else ''}; RUN_ID {P.run_id}; "
            f"device {P.run.gpu_name()}; world size {P.run.world_size}", "", "| stage | status | s |", "|---|---|---|"]
    head += [f"| {s.num}. {s.title} | {s.status} | {s.seconds:.1f} |" for s in sections]
    notes = [f"- {s.title}: {m}" for s in sections for m in s.fails + [f"warning: {w}" for w in s.warns]]
    notes += [f"- {m}" for m in others]
    head += [""] + notes if notes else []
    body = []
    for s in sections:
        body += ["", f"## {s.num}. {s.title}", ""] + ([f"- {s.status}"] if s.status.startswith("skipped") else [])
        body += s.lines + [f"- **failed** {m}" for m in s.fails] + [f"- warning: {m}" for m in s.warns]
    figs = {"run_id": P.run_id, "exit_code": code, "pass": code == 0, "complete": code is not None, "seconds": took,
            "other_ranks_failures": list(others),
            "preflight_seconds": P.budget, "device": P.run.gpu_name(), "world_size": P.run.world_size,
            "stages": {s.key: {"status": s.status, "seconds": s.seconds, "failures": s.fails, "warnings": s.warns,
                               "figures": s.figs} for s in sections}}
    return "\n".join(head + body) + "\n", json.dumps(figs, indent=2, default=str) + "\n"


def write(P, *args):
    text, js = report(P, *args)
    tg.atomic_write(os.path.join("logs", f"preflight_{P.run_id}.md"), text.encode())
    tg.atomic_write(os.path.join("logs", f"preflight_{P.run_id}.json"), js.encode())
    return text


def main():
    t_start = T_START
    try:
        budget = float(os.environ.get("PREFLIGHT_SECONDS", "480"))
        h = tg.Hyperparameters()
    except (ValueError, tg.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run = tg.Run()
    if CUDA:
        torch.cuda.set_device(run.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as setup_run
    torch._dynamo.config.cache_size_limit = 32  # as Trainer: one graph per shape, and here several models
    with torch.device("meta"):
        meta = tg.GPT(h)
    qg, counts = tg.quant_groups(meta), {}
    for name, p in meta.named_parameters():  # as the run's `params` line
        counts[qg.get(name, "float")] = counts.get(qg.get(name, "float"), 0) + p.numel()
    P = SimpleNamespace(h=h, run=run, dev=run.device, budget=budget, run_id=h.run_id or "preflight",
                        counts=dict(sorted(counts.items())), n_params=sum(counts.values()), C=45 if h.compile else 0,
                        val=None, luts=None, train_tokens=None, micro=None, trained=None)  # set by the stages
    sections = []
    for st in STAGES:
        sections.append(run_stage(P, *st, deadline=t_start + budget))
        if run.master:
            write(P, sections, None, t_start)
    code = 2 if any(s.input_error for s in sections) else 1 if any(s.fails for s in sections) else 0
    mine, others = [f"rank {run.rank}: {s.title}: {m}" for s in sections for m in s.fails], []
    if run.distributed:  # rank 0 reports every rank's failures, and every rank exits with the worst status; through
        # torchrun's store (a second process group after the first was closed hung); rank 0 runs size and scan alone
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=budget + 600))
        store.set(f"preflight/{run.rank}", json.dumps((code, mine)))
        got = [json.loads(store.get(f"preflight/{r}")) for r in range(run.world_size)]
        code, others = max(c for c, _ in got), [m for _, ms in got[1:] for m in ms]
    if run.master:
        print(write(P, sections, code, t_start, others), end="", flush=True)
    else:
        print("\n".join(mine), file=sys.stderr)
    if run.distributed and run.master:
        store.set("preflight/written", "1")
    elif run.distributed:  # no rank exits (torchrun would then stop the others) before rank 0 has written the report
        store.get("preflight/written")
    sys.exit(code)


if __name__ == "__main__":
    main()
