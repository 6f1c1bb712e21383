"""Quantization and export: quantize() error bounds, pack/unpack bit-exactness, fit_budget's bit choice, the
over-budget failure, EMA export, a non-finite artifact, and whether the default full-size model fits 16,000,000 bytes."""
import io
import json
import math
import os
import re

import pytest
import torch
import zstandard

import train_gpt as tg
from conftest import SCRIPT, TINY, run_script

QUIET = dict(TTT_ENABLED="0", EVAL_STRIDE="0")



@pytest.fixture(scope="module")
def base_env(synth):
    return dict(TINY, DATA_PATH=synth["data_path"], TOKENIZER_PATH=synth["tokenizer_path"])


def random_state(h, seed=0):
    """A tiny GPT's state with every quantized matrix Gaussian (std 1/sqrt(fan_in)), floats at their init."""
    model = tg.GPT(h)
    qgroups = tg.quant_groups(model)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name in qgroups:
            t = torch.randn(t.shape, generator=g) / math.sqrt(t.shape[1])
        state[name] = t
    return state, qgroups


def row_sse(w, q, s):
    return (q.float() * s.float() - w).square().sum(1)


# ----------------------------------------------------------------------------- 9. quantize

def _matrices(bits):
    g = torch.Generator().manual_seed(100 + bits)
    gauss = torch.randn(40, 256, generator=g) * torch.logspace(-3, 1, 40)[:, None]  # row magnitudes 1e-3..10
    heavy = torch.randn(40, 256, generator=g) * torch.exp(1.5 * torch.randn(40, 256, generator=g))  # outliers
    return torch.cat([gauss, heavy * 0.02])


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_codes_scales_and_error_bound(bits):
    w = _matrices(bits)
    qmax = 2 ** (bits - 1) - 1
    q, s = tg.quantize(w, bits)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float16 and s.shape == (w.shape[0], 1)
    assert int(q.abs().max()) <= qmax and int(q.min()) >= -qmax
    sf = s.float()
    assert torch.isfinite(sf).all() and (sf > 0).all()
    err = (q.float() * sf - w).abs()
    bound = sf / 2 + 1e-6 * w.abs()  # half a step, plus float rounding of w / s
    inside = w.abs() <= qmax * sf  # elements the (possibly clipped) grid covers
    assert (err <= bound)[inside].all()
    unclipped = (qmax * sf >= w.abs().amax(1, keepdim=True)).squeeze(1)
    assert unclipped.any()
    assert (err[unclipped] <= bound[unclipped]).all()

    # clip 1.0 alone: every row unclipped (fp16 rounding of the scale stays well under half a step at <= 8 bits)
    q1, s1 = tg.quantize(w, bits, torch.ones(w.shape[0], 1))
    err1 = (q1.float() * s1.float() - w).abs()
    assert (err1 <= s1.float() / 2 + 1e-6 * w.abs()).all()
    # the clip search never does worse than clip 1.0, row by row, and it does help on outlier rows at low bits
    sse, sse1 = row_sse(w, q, s), row_sse(w, q1, s1)
    assert (sse <= sse1).all()
    if bits <= 4:
        assert (sse < sse1).any()


def test_quantize_zero_and_tiny_rows_are_finite():
    w = torch.zeros(3, 64)
    w[1, 5] = 1e-9
    w[2] = torch.linspace(-1e-6, 1e-6, 64)
    for bits in (2, 5, 8):
        q, s = tg.quantize(w, bits)
        dq = q.float() * s.float()
        assert torch.isfinite(dq).all()
        assert (q[0] == 0).all() and (dq[0] == 0).all()
        assert ((dq - w).abs() <= w.abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_quantize_large_rows_stay_finite(bits):
    """Rows whose scale amax/qmax exceeds float16's 65504 must not store an inf scale (inf * 0 code = NaN)."""
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(4, 64, generator=g) * (70000.0 * qmax)
    q, s = tg.quantize(w, bits)
    dq = q.float() * s.float()
    assert torch.isfinite(dq).all(), f"{int((~torch.isfinite(dq)).sum())} non-finite dequantized weights"
    assert ((dq - w).abs() <= w.abs().amax(1, keepdim=True)).all()


def test_clip_scale_rounds_to_fp16_exactly():
    """clip_scale's integer rounding equals a .half().float() round trip on every positive finite fp16 value, the
    midpoints between neighbours (ties to even) and the floats next to them."""
    h = torch.arange(1, 31744, dtype=torch.int16).view(torch.float16).float()
    mid = (h[:-1] + h[1:]) / 2
    x = torch.cat((h, mid, torch.nextafter(mid, torch.zeros(())), torch.nextafter(mid, torch.full((), 1e9))))
    x = x[:, None] * 127  # an 8-bit scale at clip 1 is amax / 127
    s = tg.clip_scale(x, torch.ones(()), 8)
    assert torch.equal(s, (x / 127).clamp(2 ** -24, 65504.0).half().float())


@pytest.mark.parametrize("bits", [5, 8])
def test_compiled_fake_quant_is_the_export_grid(bits):
    """Under inductor (which drops a .half().float() pair) fake-quant still gives exactly what the export stores,
    subnormal fp16 scales included."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(256, 256, generator=g) * 0.02
    w[:16] *= 1e-4  # scales below fp16's normal range
    clip = tg.row_clips(w, bits)
    torch._dynamo.reset()
    fq = torch.compile(lambda w, c: tg.fake_quant(w, tg.clip_scale(w, c, bits), bits), backend="inductor")
    q, s = tg.quantize(w, bits, clip)
    assert torch.equal(fq(w, clip), q.float() * s.float())
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- 10. pack / unpack

def test_pack_unpack_roundtrip_bit_exact(tiny_env):
    h = tg.Hyperparameters()
    state, qgroups = random_state(h)
    raw = tg.pack(state, qgroups, h.quant_bits, h.arch())
    blob = zstandard.ZstdCompressor(level=3).compress(raw)
    arch, bits, out = tg.unpack(blob)
    assert arch == h.arch() and bits == h.quant_bits
    assert out.keys() == state.keys()
    for name, w in state.items():
        if name in qgroups:
            q, s = tg.quantize(w, h.quant_bits[qgroups[name]])
            assert torch.equal(out[name], q.float() * s.float()), name
        else:
            assert out[name].dtype == torch.float32 and torch.equal(out[name], w.float()), name
    model = tg.GPT(h)
    model.load_state_dict(out, strict=True)

    obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    assert obj["arch"] == h.arch() and obj["bits"] == h.quant_bits
    n_codes = 0
    for name in qgroups:
        t = obj["tensors"][name]
        assert t["q"].dtype == torch.int8 and t["q"].shape == state[name].shape
        assert t["q"].untyped_storage().nbytes() == t["q"].numel()  # one byte per code, no shared storage
        assert t["s"].dtype == torch.float16 and t["s"].shape == (state[name].shape[0], 1)
        n_codes += t["q"].numel()
    floats = [n for n in state if n not in qgroups]
    records = 2 * len(qgroups) + len(floats)  # container overhead: a zip record and pickle entry per storage
    assert n_codes <= len(raw) < n_codes + 4 * sum(state[n].numel() for n in floats) + 2 * sum(
        state[n].shape[0] for n in qgroups) + 512 * records + 8192


def test_pack_prune_zeroes_small_codes(tiny_env):
    h = tg.Hyperparameters()
    state, qgroups = random_state(h, seed=1)
    obj = torch.load(io.BytesIO(tg.pack(state, qgroups, h.quant_bits, h.arch(), prune=1)), weights_only=True)
    for name in qgroups:
        q, s = tg.quantize(state[name], h.quant_bits[qgroups[name]])
        want = torch.where(q.abs() <= 1, torch.zeros_like(q), q)
        assert torch.equal(obj["tensors"][name]["q"], want) and torch.equal(obj["tensors"][name]["s"], s)


# ----------------------------------------------------------------------------- 11. fit_budget

def _bits_line(lines):
    # a width below QUANT_BITS, or pruning, adds one quant_mismatch line
    assert lines[0].startswith("quant_bits ") and all(l.startswith("quant_mismatch: ") for l in lines[1:]), lines
    assert len(lines) <= 2, lines
    f = dict(re.findall(r"(\w+):(\d+)", lines[0]))
    assert f.keys() == set(tg.QUANT_GROUPS) | {"prune"}, lines
    return {g: int(f[g]) for g in tg.QUANT_GROUPS}, int(f["prune"])


def FLOOR(group):
    """The budget fit never takes the tied embedding/output head or the TRN frequency/phase/decay rows below 6 bits."""
    return 6 if group in ("embed", "trn_ctrl") else 4


def test_fit_budget_generous_tight_impossible(tiny_env):
    h = tg.Hyperparameters()
    default = dict(h.quant_bits)  # QUANT_BITS' default (TINY leaves it unset)
    state, qgroups = random_state(h, seed=2)
    code = 50_000

    # generous (the default 16 MB): keeps QUANT_BITS, no pruning, and is exactly the zstd-22 packed state
    logs = []
    blob = tg.fit_budget(state, qgroups, h, code, logs.append)
    assert _bits_line(logs) == (default, 0)
    assert blob == zstandard.ZstdCompressor(level=22).compress(tg.pack(state, qgroups, h.quant_bits, h.arch()))
    full = len(blob)

    # tight: 80% of the full-precision size must lower some group's bits (never below the floors, never above QUANT_BITS)
    h.budget_bytes = code + int(0.8 * full)
    logs = []
    blob = tg.fit_budget(state, qgroups, h, code, logs.append)
    bits, prune = _bits_line(logs)
    assert len(blob) <= h.budget_bytes - code
    assert all(min(FLOOR(g), default[g]) <= bits[g] <= default[g] for g in bits) and bits != default
    arch, stored, out = tg.unpack(blob)  # the log line tells the truth about the blob
    assert stored == bits and arch == h.arch()
    for name in qgroups:
        q, s = tg.quantize(state[name], bits[qgroups[name]])
        if prune:
            q = torch.where(q.abs() <= prune, torch.zeros_like(q), q)
        assert torch.equal(out[name], q.float() * s.float())

    # impossible: everything at its floor and pruned as far as it goes, and the returned blob does not fit
    h.budget_bytes = code + 1000
    logs = []
    blob = tg.fit_budget(state, qgroups, h, code, logs.append)
    assert _bits_line(logs) == ({g: min(FLOOR(g), default[g]) for g in default}, 2)
    assert len(blob) > h.budget_bytes - code
    tg.unpack(blob)


# ----------------------------------------------------------------------------- 12-13. end-to-end export runs

def _run(env, cwd, run_id, **over):
    r = run_script(dict(env, RUN_ID=run_id, **over), str(cwd))
    log_path = os.path.join(cwd, "logs", f"{run_id}.txt")
    r.log = open(log_path).read() if os.path.exists(log_path) else ""
    r.artifact = os.path.join(cwd, "logs", f"{run_id}.model.ptz")
    r.explain = f"rc={r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r


def test_over_budget_fails_but_keeps_artifact_and_log(base_env, tmp_path):
    r = _run(base_env, tmp_path, "big", BUDGET_BYTES="1000", ITERATIONS="2", **QUIET)
    assert r.returncode == 2, r.explain
    errs = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(errs) == 1 and errs[0].startswith("error: artifact is ") and "BUDGET_BYTES=1000" in errs[0], errs
    assert "logs/big.model.ptz" in errs[0]
    total = int(re.search(r"artifact is (\d+) bytes", errs[0]).group(1))
    m = re.search(r"^Total submission size: (\d+) bytes \(code:(\d+) model:(\d+)\)", r.log, re.M)
    assert m and int(m.group(1)) == total
    assert os.path.getsize(r.artifact) == int(m.group(3)) and int(m.group(2)) == os.path.getsize(SCRIPT)
    assert re.search(r"^quant_bits attn:4 bigram:4 embed:6 mlp:4 trn_ctrl:6 trn_in:4 trn_out:4 prune:2$", r.log, re.M)
    assert re.search(r"^quant_mismatch: the budget fit moved off the grid QAT trained \(attn:6->4 .*prune:2\)", r.log, re.M)
    assert "final_int5_zstd_roundtrip_exact " in r.log  # still scored, for the record
    meta = json.load(open(tmp_path / "logs" / "big.submission.json"))
    assert meta["within_budget"] is False and meta["bytes_total"] == total
    tg.unpack(open(r.artifact, "rb").read())


ALL_INT5 = "embed:5,bigram:5,attn:5,mlp:5,trn_in:5,trn_out:5,trn_ctrl:5"


@pytest.mark.parametrize("bits", [None, ALL_INT5])
def test_qat_forward_predicts_the_roundtrip_score(base_env, tmp_path, bits):
    """QAT trains the exported grid: the fake-quantized forward of the weights about to be exported scores what
    the reloaded artifact scores (within 0.001 bpb), at the default widths and with every group at int5."""
    over = dict(QUANT_BITS=bits) if bits else {}
    r = _run(base_env, tmp_path, "qf", ITERATIONS="8", QAT_START_FRAC="0.25", QAT_REFRESH_EVERY="3", **QUIET, **over)
    assert r.returncode == 0, r.explain
    lines = r.log.splitlines()
    order = [next(i for i, l in enumerate(lines) if l.startswith(p)) for p in
             ("final_prequant ", "final_qat_forward ", "Total submission size", "final_int5_zstd_roundtrip ")]
    assert order == sorted(order)
    bpb = {p: float(re.search(rf"^{p} val_loss:\S+ val_bpb:(\S+)", r.log, re.M).group(1))
           for p in ("final_prequant", "final_qat_forward", "final_int5_zstd_roundtrip_exact")}
    assert abs(bpb["final_qat_forward"] - bpb["final_int5_zstd_roundtrip_exact"]) <= 0.001, bpb
    # on CPU (fp32) the two are the same weights: equal up to the log's 4 decimals
    assert abs(bpb["final_qat_forward"] - bpb["final_int5_zstd_roundtrip_exact"]) <= 1e-4, bpb
    assert "quant_mismatch" not in r.log
    if bits:  # at int5 quantization visibly moves the score, so the match above is not vacuous
        assert abs(bpb["final_prequant"] - bpb["final_int5_zstd_roundtrip_exact"]) > 0.001, bpb


@pytest.mark.parametrize("window", ["1", "0.3"])
def test_export_uses_ema_weights(base_env, tmp_path, tiny_env, window):
    """EMA from step 1 of 3. A window of the whole run keeps the running mean of the weights after steps 1..3 (its
    warm start); a window of 0.3 of 3 steps, under one step, is the live weights. The artifact must hold exactly
    that (quantized): the EMA's window follows the run's length."""
    r = _run(base_env, tmp_path, "ema", EMA_WINDOW_FRAC=window, EMA_START_FRAC="0", ITERATIONS="3",
             CHECKPOINT_EVERY="1", CHECKPOINT_KEEP="5", **QUIET)
    assert r.returncode == 0, r.explain
    assert re.search(r"^ema_start step:1$", r.log, re.M)
    assert re.search(rf"^export: EMA weights \(window {window} of the run, from step 1\)$", r.log, re.M)
    cks = [torch.load(tmp_path / "checkpoints" / "ema" / f"step_000000{i}.pt", map_location="cpu", weights_only=True)
           for i in (1, 2, 3)]
    names = list(cks[0]["model"])
    mean = {n: cks[0]["model"][n].clone() for n in names}
    for k, ck in enumerate(cks[1:], start=2):
        for n in names:
            mean[n].lerp_(ck["model"][n], 1 / k)
    h = tg.Hyperparameters()
    with torch.device("meta"):
        qgroups = tg.quant_groups(tg.GPT(h))
    arch, bits, art = tg.unpack(open(r.artifact, "rb").read())
    assert bits == h.quant_bits and art.keys() == set(names)
    differs = 0
    for name in names:
        mean_w, live = mean[name].float(), cks[2]["model"][name].float()
        if name in qgroups:
            (q, s), (q3, s3) = tg.quantize(mean_w, bits[qgroups[name]]), tg.quantize(live, bits[qgroups[name]])
            mean_w, live = q.float() * s.float(), q3.float() * s3.float()
        want, other = (mean_w, live) if window == "1" else (live, mean_w)
        assert torch.allclose(art[name], want, rtol=0, atol=1e-6), f"{name}: artifact is not the EMA it should be"
        differs += not torch.allclose(art[name], other, rtol=0, atol=1e-6)
    assert differs >= len(art) // 2, "steps 2-3 barely changed the weights: the test would not tell EMA from live"


def test_non_finite_artifact_is_not_a_success(tiny_env, monkeypatch, tmp_path):
    """An artifact whose weights are not finite (here one float tensor set to NaN as it is packed) scores NaN: the
    run must stop with one error naming the kept artifact, not end with exit 0 and no submission.json written.
    (A huge MATRIX_LR, tried before, stays finite: clip_scale clamps the scales to fp16's range.)"""
    real = tg.pack

    def pack(state, qgroups, *args, **kw):
        name = next(n for n in state if n not in qgroups)
        return real({**state, name: torch.full_like(state[name], math.nan)}, qgroups, *args, **kw)

    monkeypatch.chdir(tmp_path)
    for k, v in dict(RUN_ID="nan", TTT_ENABLED="0", EVAL_STRIDE="0", ITERATIONS="2").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tg, "pack", pack)
    with pytest.raises(tg.UserError, match=r"the reloaded artifact scores val_loss nan: its weights are not finite"
                                           r" \(files kept: logs.nan\.model\.ptz\)"):
        tg.train_and_evaluate(tg.Hyperparameters())
    assert os.path.isfile(tmp_path / "logs" / "nan.model.ptz")
    assert not os.path.exists(tmp_path / "logs" / "nan.submission.json")


# ----------------------------------------------------------------------------- 14. full-size budget

def _clean_env(monkeypatch):
    names = set(re.findall(r'\b(?:env|flag|pos|nonneg|frac|int_list)\("([A-Z0-9_]+)"', open(SCRIPT).read()))
    assert {"NUM_LAYERS", "MODEL_DIM", "QUANT_BITS", "BUDGET_BYTES"} <= names
    for n in names - {"DATA_PATH", "TOKENIZER_PATH"}:
        monkeypatch.delenv(n, raising=False)


def test_default_full_size_model_fits_budget(monkeypatch, capsys):
    """Estimate the default submission's size: the default GPT's exact shapes, Gaussian weights quantized at the
    default QUANT_BITS, real zstd-22 on a sample of rows of every tensor, plus scales, float tensors, the container's
    own overhead and train_gpt.py itself.

    Assumption: every quantized matrix is Gaussian with std 1/sqrt(fan_in) (the scale Muon's orthogonalized updates
    give each entry). Quantization is per row and scale-free, so the codes depend only on the shape of each row's
    distribution, not on the std (which only has to stay inside float16's range); Gaussian rows are a fair stand-in
    for Muon-trained matrices, which have few outliers. Heavier-tailed weights would compress better."""
    _clean_env(monkeypatch)
    h = tg.Hyperparameters()
    assert (h.num_layers, h.model_dim, h.num_oscillators, h.budget_bytes) == (10, 512, 256, 16_000_000)
    with torch.device("meta"):
        model = tg.GPT(h)
    qgroups = tg.quant_groups(model)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    n_params = sum(math.prod(s) for s in shapes.values())

    g = torch.Generator().manual_seed(0)
    per_group, sample = {}, 1 << 17
    for grp in sorted(set(qgroups.values())):
        names = [n for n in qgroups if qgroups[n] == grp]
        total = sum(math.prod(shapes[n]) for n in names)
        codes = []
        for n in names:
            rows, cols = shapes[n]
            k = min(rows, max(1, round(sample * math.prod(shapes[n]) / total / cols)))
            w = torch.randn(k, cols, generator=g) / math.sqrt(cols)
            codes.append(tg.quantize(w, h.quant_bits[grp])[0].flatten())
        c = torch.cat(codes)
        per_group[grp] = len(zstandard.ZstdCompressor(level=22).compress(c.numpy().tobytes())) / c.numel() * total
    scales = 2 * sum(shapes[n][0] for n in qgroups)
    floats = 4 * sum(math.prod(s) for n, s in shapes.items() if n not in qgroups)
    skeleton = {n: torch.zeros((1, 1) if n in qgroups else (1,)) for n in shapes}
    overhead = len(zstandard.ZstdCompressor(level=22).compress(tg.pack(skeleton, qgroups, h.quant_bits, h.arch())))
    code = os.path.getsize(SCRIPT)
    estimate = round(sum(per_group.values()) + scales + floats + overhead + code)
    margin = h.budget_bytes - estimate
    with capsys.disabled():
        print(f"\n[budget] default model: {n_params} params; codes by group (bytes): "
              + " ".join(f"{k}@{h.quant_bits[k]}b:{v:.0f}" for k, v in per_group.items())
              + f"; scales:{scales} floats:{floats} container:{overhead} code:{code}"
              + f"; estimate {estimate} of {h.budget_bytes}: margin {margin} bytes ({100 * margin / h.budget_bytes:+.2f}%)")
    assert estimate <= h.budget_bytes, f"default config over budget by {-margin} bytes at the default QUANT_BITS"
