"""Model-level tests for train_gpt.py: the Kogge-Stone scan, causality, BOS isolation, the model API, TRN
initialisation, QAT (eager and compiled), graph breaks, the learning-rate schedule and import hygiene.

Every model test builds its Hyperparameters from the environment (tiny_env plus monkeypatch overrides) and
re-initialises the zero-initialised weights at random, so that information actually flows between positions:
at initialisation every output projection is zero and the model is a per-token function, which would make
causality or isolation tests pass vacuously."""
import copy
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, VOCAB

import train_gpt as tg

BOS = 1



# ----------------------------------------------------------------------------- helpers

def make_h(monkeypatch, **overrides):
    for k, v in overrides.items():
        monkeypatch.setenv(k, str(v))
    return tg.Hyperparameters()


def randomize(model, seed=0):
    """Random weights everywhere a Linear/Embedding lives (including the zero-initialised projections and the
    bigram table), and a non-trivial bigram scale; the TRN's decay/frequency parameters keep their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                w = m.weight
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]))
        for name, p in model.named_parameters():
            if name.endswith("bigram.scale"):
                p.fill_(0.5)
    return model


def build(monkeypatch, seed=0, **overrides):
    h = make_h(monkeypatch, **overrides)
    torch.manual_seed(seed)
    return randomize(tg.GPT(h), seed).eval(), h


def rand_ids(B, T, seed, low=2):
    """Random token ids that avoid PAD(0) and BOS(1) unless asked."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (B, T), generator=g)


def seq_scan(a, b):
    """Reference: h_t = a_t * h_{t-1} + b_t along dim 1, h_{-1} = 0 (a broadcasts like in kogge_stone_scan)."""
    h = torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.size(1)):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def scan_inputs(kind, T, dtype, broadcast, seed):
    g = torch.Generator().manual_seed(seed)
    B, K = 2, 3
    a_shape = (B, T, K, 1) if broadcast else (B, T, K, 2)
    if kind == "random":
        a = torch.rand(a_shape, generator=g, dtype=torch.float64)
    elif kind == "resets":  # exact zeros (document starts) at some positions, including t = 0 and the last one
        a = torch.rand(a_shape, generator=g, dtype=torch.float64)
        a[:, ::5] = 0.0
        a[:, -1] = 0.0
    elif kind == "near_one":  # long memories: 0.9999 everywhere, errors would accumulate over T
        a = torch.full(a_shape, 0.9999, dtype=torch.float64)
    else:
        raise ValueError(kind)
    b = torch.randn((B, T, K, 2), generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def close(x, ref, rel):
    """Elementwise |x - ref| <= rel * (|ref| + max|ref|): relative tolerance at the scale of the data."""
    ref = ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(x.double(), ref, rtol=rel, atol=rel * max(scale, 1e-30))


# ----------------------------------------------------------------------------- 1. kogge_stone_scan

@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("T", [1, 2, 3, 17, 64, 100, 257])
@pytest.mark.parametrize("broadcast", [False, True], ids=["same_shape", "broadcast_K1_vs_K2"])
@pytest.mark.parametrize("kind", ["random", "resets", "near_one"])
def test_scan_matches_sequential_values_and_grads(kind, broadcast, T, dtype, rel):
    a, b = scan_inputs(kind, T, dtype, broadcast, seed=T)
    a.requires_grad_(True)
    b.requires_grad_(True)
    h = tg.kogge_stone_scan(a, b)
    assert h.shape == b.shape and h.dtype == dtype
    # the reference runs in float64 on the very same (rounded) inputs
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ref = seq_scan(a64, b64)
    close(h, ref, rel)
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1000 + T), dtype=torch.float64)
    ga, gb = torch.autograd.grad(h, (a, b), g.to(dtype))
    ra, rb = torch.autograd.grad(ref, (a64, b64), g)
    assert ga.shape == a.shape and gb.shape == b.shape
    close(ga, ra, rel)
    close(gb, rb, rel)


@pytest.mark.parametrize("broadcast", [False, True])
def test_scan_reset_isolates_exactly(broadcast):
    """a_p = 0 is a reset: h_p == b_p exactly, and h_t for t >= p ignores b before p bit for bit
    (values and gradients), which is what document isolation in the TRN relies on."""
    T, p = 100, 37
    a, b = scan_inputs("random", T, torch.float32, broadcast, seed=5)
    a = a * 0.5 + 0.5  # long-ish memories so that a leak would be visible
    a[:, p] = 0.0
    h = tg.kogge_stone_scan(a, b)
    assert torch.equal(h[:, p], b[:, p])
    b2 = b.clone()
    b2[:, :p] = torch.randn(b2[:, :p].shape) * 100
    h2 = tg.kogge_stone_scan(a, b2)
    assert torch.equal(h[:, p:], h2[:, p:])
    assert not torch.allclose(h[:, :p], h2[:, :p])
    b.requires_grad_(True)
    (gb,) = torch.autograd.grad(tg.kogge_stone_scan(a, b)[:, p:].square().sum(), (b,))
    assert torch.count_nonzero(gb[:, :p]) == 0
    assert torch.count_nonzero(gb[:, p:]) > 0


def test_scan_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 33, 1, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
    b = torch.randn(2, 3, 33, 2, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
    h = tg.kogge_stone_scan(a, b)
    ref = seq_scan(a, b)
    close(h, ref, 1e-12)
    up = torch.randn(h.shape, generator=g, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    for x, y in zip(torch.autograd.grad(h, (a, b), up), torch.autograd.grad(ref, (a, b), up)):
        close(x, y, 1e-12)


@pytest.mark.parametrize("broadcast", [False, True])
def test_scan_gradcheck(broadcast):
    g = torch.Generator().manual_seed(11)
    a_shape = (2, 7, 2, 1) if broadcast else (2, 7, 2, 2)
    a = (torch.rand(a_shape, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    a[:, 3] = 0.0  # a reset in the middle
    a.requires_grad_(True)
    b = torch.randn(2, 7, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tg.kogge_stone_scan, (a, b), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- 2. causality

CAUSAL_CONFIGS = {
    "hybrid": dict(MODEL_TYPE="hybrid"),
    "hybrid_no_attn": dict(MODEL_TYPE="hybrid", ATTN_POSITIONS=""),
    "transformer": dict(MODEL_TYPE="transformer"),
}


@pytest.mark.parametrize("cfg", list(CAUSAL_CONFIGS))
def test_causality(cfg, tiny_env, monkeypatch):
    model, h = build(monkeypatch, **CAUSAL_CONFIGS[cfg])
    B, T = 2, 32
    ids = rand_ids(B, T, seed=1)
    with torch.no_grad():
        base = model.forward_logits(ids)
        for t in (0, 9, 20, T - 2):
            # 1) the whole future replaced: the past is untouched
            alt = ids.clone()
            alt[:, t + 1:] = rand_ids(B, T - t - 1, seed=100 + t)
            alt[:, t + 1] = (ids[:, t + 1] - 2 + 1) % (VOCAB - 2) + 2  # certainly different at t + 1
            out = model.forward_logits(alt)
            assert (out[:, :t + 1] - base[:, :t + 1]).abs().max() <= 1e-6, f"t={t}: future tokens leak into the past"
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-3
            # 2) one token changed: the positions after it see the change (the mixers do carry information)
            one = ids.clone()
            one[:, t + 1] = alt[:, t + 1]
            out = model.forward_logits(one)
            assert (out[:, :t + 1] - base[:, :t + 1]).abs().max() <= 1e-6
            if t + 2 < T:
                assert (out[:, t + 2:] - base[:, t + 2:]).abs().max() > 1e-3, "no information flows forward"
        # rows of a batch are independent
        alt = ids.clone()
        alt[1] = rand_ids(1, T, seed=7)[0]
        out = model.forward_logits(alt)
        assert (out[0] - base[0]).abs().max() <= 1e-6


# ----------------------------------------------------------------------------- 3. BOS isolation

ISO = dict(MODEL_TYPE="hybrid", ATTN_POSITIONS="", USE_TOKEN_SHIFT="1", BIGRAM_VOCAB_SIZE="256", BOS_ID=str(BOS))


def _iso_pair(T, p, seed):
    """Two sequences equal from position p on (with a BOS at p), different everywhere before p."""
    x = rand_ids(2, T, seed)
    y = x.clone()
    y[:, :p] = (x[:, :p] - 2 + 1 + rand_ids(2, p, seed + 1) % 50) % (VOCAB - 2) + 2
    x[:, p] = y[:, p] = BOS
    assert (x[:, :p] != y[:, :p]).all() and (x[:, :p] != BOS).all() and (y[:, :p] != BOS).all()
    return x, y


@pytest.mark.parametrize("p", [1, 5, 20, 31])
def test_bos_isolation_with_reset(p, tiny_env, monkeypatch):
    model, h = build(monkeypatch, RESET_AT_BOS="1", **ISO)
    assert h.reset_at_bos and not h.attn_layers and h.use_token_shift and h.bigram_vocab_size
    x, y = _iso_pair(32, p, seed=p)
    with torch.no_grad():
        lx, ly = model.forward_logits(x), model.forward_logits(y)
    assert (lx[:, p:] - ly[:, p:]).abs().max() <= 1e-6, "tokens before a BOS leak into its document"
    assert (lx[:, :p] - ly[:, :p]).abs().max() > 1e-3


def test_document_starts_like_a_sequence(tiny_env, monkeypatch):
    """With the reset, a document after a BOS is scored exactly as if it began the sequence (position 0 there)."""
    model, h = build(monkeypatch, RESET_AT_BOS="1", **ISO)
    doc = rand_ids(1, 20, 7)
    doc[0, 0] = h.bos_id
    prefix = rand_ids(1, 11, 8)
    with torch.no_grad():
        alone = model.forward_logits(doc)
        after = model.forward_logits(torch.cat((prefix, doc), 1))[:, 11:]
    assert (alone - after).abs().max() <= 1e-5


@pytest.mark.parametrize("shift,bigram", [("1", "0"), ("0", "256"), ("0", "0")])
def test_bos_isolation_each_path(shift, bigram, tiny_env, monkeypatch):
    """The same isolation with the token shift and the bigram hash switched on one at a time / both off."""
    model, h = build(monkeypatch, **dict(ISO, RESET_AT_BOS="1", USE_TOKEN_SHIFT=shift, BIGRAM_VOCAB_SIZE=bigram))
    x, y = _iso_pair(32, 12, seed=3)
    with torch.no_grad():
        lx, ly = model.forward_logits(x), model.forward_logits(y)
    assert (lx[:, 12:] - ly[:, 12:]).abs().max() <= 1e-6


@pytest.mark.parametrize("p", [5, 20])
def test_no_bos_isolation_without_reset(p, tiny_env, monkeypatch):
    """Control: with RESET_AT_BOS=0 the same model does see across the BOS (so the test above can fail)."""
    model, h = build(monkeypatch, RESET_AT_BOS="0", **ISO)
    assert not h.reset_at_bos
    x, y = _iso_pair(32, p, seed=p)
    with torch.no_grad():
        lx, ly = model.forward_logits(x), model.forward_logits(y)
    assert (lx[:, p:] - ly[:, p:]).abs().max() > 1e-3
    # already at the BOS itself (token shift and bigram hash look one token back)
    assert (lx[:, p] - ly[:, p]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- 4. model API

@pytest.mark.parametrize("model_type", ["hybrid", "transformer"])
def test_model_api(model_type, tiny_env, monkeypatch):
    model, h = build(monkeypatch, MODEL_TYPE=model_type)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights must be fp32"
    B, T = 3, 24
    ids, tgt = rand_ids(B, T, 1, low=0), rand_ids(B, T, 2, low=0)
    logits = model.forward_logits(ids)
    assert logits.shape == (B, T, h.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= h.logit_softcap
    loss = model(ids, tgt)
    assert loss.shape == () and loss.dtype == torch.float32
    ref = F.cross_entropy(logits.double().flatten(0, 1), tgt.flatten())
    assert abs(loss.item() - ref.item()) < 1e-5
    per = model(ids, tgt, reduction="none")
    assert per.shape == (B, T)
    ref_per = F.cross_entropy(logits.double().flatten(0, 1), tgt.flatten(), reduction="none").view(B, T)
    torch.testing.assert_close(per.double(), ref_per, rtol=1e-5, atol=1e-5)
    assert abs(per.mean().item() - loss.item()) < 1e-5
    # the loss trains every parameter, in fp32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the soft cap binds: with a huge (tied) embedding the logits approach but never pass LOGIT_SOFTCAP
    with torch.no_grad():
        model.tok_emb.weight.mul_(100)
        big = model.forward_logits(ids)
    assert big.abs().max() <= h.logit_softcap and big.abs().max() > 0.9 * h.logit_softcap


def test_forward_reduction_sum(tiny_env, monkeypatch):
    """`reduction` is passed through to cross_entropy, so "sum" should give the scalar sum of the per-token losses."""
    model, h = build(monkeypatch)
    ids, tgt = rand_ids(2, 16, 1), rand_ids(2, 16, 2)
    with torch.no_grad():
        per = model(ids, tgt, reduction="none")
        total = model(ids, tgt, reduction="sum")
    assert total.shape == ()
    assert total.item() == pytest.approx(per.sum().item(), rel=1e-5)


def test_model_fp32_master_weights_under_autocast(tiny_env, monkeypatch):
    """Under bf16 autocast the parameters stay fp32, the logits come back fp32, the gradients are fp32."""
    model, h = build(monkeypatch)
    ids, tgt = rand_ids(2, 16, 1), rand_ids(2, 16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.forward_logits(ids)
        loss = model(ids, tgt)
    assert logits.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        ref = model.forward_logits(ids)
    assert (logits - ref).abs().max() < 0.5  # the same function, at bf16 precision


def test_mlp_squares_with_a_mul_that_cuda_autocast_keeps_in_bf16():
    """Tensor.square() dispatches pow, which CUDA autocast runs in fp32 (an fp32 copy of the widest activation
    under COMPILE=0); the MLP squares with a mul instead. This CPU cannot run CUDA autocast: the test checks the
    premise as far as the dispatcher shows it (autocast has a CUDA kernel registered for pow and none for mul,
    and square() dispatches pow), that the MLP runs no pow, and that its result equals square()'s."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::pow.Tensor_Scalar", "AutocastCUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::mul.Tensor", "AutocastCUDA")
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        torch.ones(2).square()
    assert "pow" in ops
    ops.clear()
    torch.manual_seed(0)
    mlp, x = tg.MLP(SimpleNamespace(mlp_mult=2, model_dim=8)), torch.randn(3, 8)
    nn.init.normal_(mlp.proj.weight)  # zero at init
    with torch.no_grad(), Ops():
        y = mlp(x)
    assert "mul" in ops and not any(o.startswith("pow") for o in ops)
    with torch.no_grad():
        assert torch.equal(y, mlp.proj(F.leaky_relu(mlp.fc(x), 0.5).square()))


# ----------------------------------------------------------------------------- 5. TRN initialisation

@pytest.mark.parametrize("seq_len,K", [(64, 16), (1024, 256)])
def test_trn_init_time_scales(seq_len, K, tiny_env, monkeypatch):
    h = make_h(monkeypatch, TRAIN_SEQ_LEN=seq_len, TRAIN_BATCH_TOKENS=seq_len * 4, NUM_OSCILLATORS=K,
               EVAL_SEQ_LEN=seq_len)
    torch.manual_seed(0)
    trn = tg.TRN(h)
    a = torch.sigmoid(trn.decay_logit.detach().double())
    assert a.shape == (K,)
    # strictly inside (0, 1): none pinned at 0 (no memory) nor at 1 (no forgetting, vanishing sigmoid gradient)
    assert a.min() > 0.4 and a.max() < 0.9995
    assert (a * (1 - a)).min() > 1e-4
    # spread over time scales tau = 1 / (1 - a) from ~2 tokens to ~the training length
    tau = 1 / (1 - a)
    assert tau.min() <= 2.5 and tau.max() >= seq_len / 2
    assert len(set(a.tolist())) == K
    # log-spread: every quarter of the log range holds some oscillators
    lt = tau.log()
    edges = torch.linspace(lt.min().item(), lt.max().item(), 5)
    counts = [((lt >= lo) & (lt <= hi)).sum().item() for lo, hi in zip(edges[:-1], edges[1:])]
    assert min(counts) >= K // 8, counts
    # distinct, positive base frequencies spanning at least a decade
    f = trn.log_freq.detach().double().exp()
    assert len(set(f.tolist())) == K and f.min() > 0 and f.max() / f.min() >= 10
    # the data-dependent decay offset is small at init: the effective decays stay inside (0, 1) too
    x = tg.rms_norm(torch.randn(4, 8, h.model_dim))
    d = trn.ctrl(x).unflatten(-1, (3, K))[..., 2, :].detach()
    eff = torch.sigmoid(d + trn.decay_logit.detach())
    assert eff.min() > 0.3 and eff.max() < 0.9999


# ----------------------------------------------------------------------------- 6. QAT

def quantized_copy(model):
    """The model with every exported quantized weight (matrices, tied embedding, bigram table) replaced by its
    export-grid value; the scales come from the exporter's rule (refresh_qclips) and are shared with `model`."""
    tg.refresh_qclips(model)
    ref = copy.deepcopy(model)
    tg.set_qat(ref, False)
    n = 0
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, tg.FakeQuant):
                assert m.qbits >= 2
                m.weight.copy_(tg.fake_quant(m.weight, tg.clip_scale(m.weight, m.qclip, m.qbits), m.qbits))
                n += 1
    assert n > 0
    return ref


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, tg.FakeQuant)]


def qat_case(monkeypatch):
    """A randomized tiny model, its fake-quantized copy, inputs, and both models' float outputs."""
    model, h = build(monkeypatch)
    ids, tgt = rand_ids(2, 24, 1), rand_ids(2, 24, 2)
    ref = quantized_copy(model)
    with torch.no_grad():
        float_out = model(ids, tgt, reduction="none")
        ref_out = ref(ids, tgt, reduction="none")
    assert (float_out - ref_out).abs().max() > 1e-4  # quantization visibly changes the model
    return model, ref, ids, tgt, float_out, ref_out


def test_qat_eager_matches_fake_quantized_copy(tiny_env, monkeypatch):
    model, ref, ids, tgt, float_out, ref_out = qat_case(monkeypatch)
    with torch.no_grad():
        tg.set_qat(model, True)
        assert all(m.qat.item() == 1.0 for _, m in linears(model))
        torch.testing.assert_close(model(ids, tgt, reduction="none"), ref_out, rtol=0, atol=1e-5)
        tg.set_qat(model, False)
        torch.testing.assert_close(model(ids, tgt, reduction="none"), float_out, rtol=0, atol=0)
    # STE: with QAT on, the gradient w.r.t. the fp32 weight is the gradient at the quantized weight
    tg.set_qat(model, True)
    model(ids, tgt).backward()
    ref(ids, tgt).backward()
    refmods = dict(linears(ref))
    for name, m in linears(model):
        g, rg = m.weight.grad, refmods[name].weight.grad
        dense = isinstance(m, tg.CastedLinear)  # an embedding's gradient has only the rows it looked up
        assert g is not None and torch.count_nonzero(g) > (0.5 * g.numel() if dense else 0), name
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


def test_qat_compiled_no_recompile(tiny_env, monkeypatch):
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()
    model, ref, ids, tgt, float_out, ref_out = qat_case(monkeypatch)

    aot_eager, calls = lookup_backend("aot_eager"), []

    def counting_backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    cm = torch.compile(model, backend=counting_backend)
    out = cm(ids, tgt, reduction="none")
    torch.testing.assert_close(out, float_out, rtol=0, atol=1e-5)
    n_first = len(calls)
    assert n_first >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        tg.set_qat(model, True)
        out = cm(ids, tgt, reduction="none")
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
        # STE through the compiled graph: the gradient equals the float model's at the quantized weights
        cm(ids, tgt, reduction="none").mean().backward()
        ref(ids, tgt, reduction="none").mean().backward()
        refmods = dict(linears(ref))
        for name, m in linears(model):
            assert torch.count_nonzero(m.weight.grad) > 0, name
            torch.testing.assert_close(m.weight.grad, refmods[name].weight.grad, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # refreshed scales are read, not baked into the graph
            for _, m in linears(model):
                m.qclip.mul_(0.5)
        assert (cm(ids, tgt, reduction="none") - ref_out).abs().max() > 1e-4
        tg.refresh_qclips(model)
        torch.testing.assert_close(cm(ids, tgt, reduction="none"), ref_out, rtol=0, atol=1e-5)
        tg.set_qat(model, False)
        out = cm(ids, tgt, reduction="none")
        torch.testing.assert_close(out, float_out, rtol=0, atol=1e-5)
    assert len(calls) == n_first, "toggling QAT or refreshing its scales recompiled the model"
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- 7. graph breaks

def test_no_graph_breaks(tiny_env, monkeypatch):
    torch._dynamo.reset()
    model, h = build(monkeypatch, MODEL_TYPE="hybrid")
    assert h.attn_layers and len(h.attn_layers) < h.num_layers  # both mixers are in the graph
    ids, tgt = rand_ids(2, 16, 1), rand_ids(2, 16, 2)
    ex = torch._dynamo.explain(model)(ids, tgt)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- 8. learning-rate schedule

CAP_S = 600.0


def ms(frac):
    return frac * CAP_S * 1000


def test_lr_scale_wallclock_slow_steps(tiny_env, monkeypatch):
    """A slow machine: only a few hundred of ITERATIONS=20000 steps fit in the cap and WARMDOWN_ITERS=1200 is
    larger than that, yet the rate stays 1.0 until the last WARMDOWN_FRAC=0.25 of the wallclock (the step-based
    warmdown only bites within WARMDOWN_ITERS of ITERATIONS, which these steps never reach), then falls
    linearly to 0 at the cap and stays 0 beyond it."""
    h = make_h(monkeypatch, MAX_WALLCLOCK_SECONDS=CAP_S, ITERATIONS=20000, WARMDOWN_ITERS=1200, WARMDOWN_FRAC=0.25)
    assert tg.lr_scale(h, 0, 0.0) == 1.0
    assert tg.lr_scale(h, 1, ms(0.10)) == 1.0
    assert tg.lr_scale(h, 10, ms(0.50)) == 1.0
    assert tg.lr_scale(h, 100, ms(0.74)) == 1.0
    assert tg.lr_scale(h, 101, ms(0.75)) == pytest.approx(1.0)
    for f in (0.8, 0.85, 0.9, 0.95, 0.99):
        assert tg.lr_scale(h, 120, ms(f)) == pytest.approx((1 - f) / 0.25, abs=1e-9)
    assert tg.lr_scale(h, 130, ms(1.0)) == pytest.approx(0.0, abs=1e-12)
    assert tg.lr_scale(h, 131, ms(1.2)) == 0.0
    vals = [tg.lr_scale(h, 50, ms(f / 100)) for f in range(0, 121)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))


def test_lr_scale_wallclock_large_warmdown_iters(tiny_env, monkeypatch):
    """WARMDOWN_ITERS larger than the steps that fit (5000 vs ~100): still 1.0 until 75% of the time. A fast
    machine that gets within WARMDOWN_ITERS of ITERATIONS before that decays by steps instead."""
    h = make_h(monkeypatch, MAX_WALLCLOCK_SECONDS=CAP_S, ITERATIONS=20000, WARMDOWN_ITERS=5000, WARMDOWN_FRAC=0.25)
    assert tg.lr_scale(h, 1, ms(0.1)) == 1.0
    assert tg.lr_scale(h, 100, ms(0.7)) == 1.0
    assert tg.lr_scale(h, 110, ms(0.9)) == pytest.approx(0.4)
    assert tg.lr_scale(h, 17500, ms(0.1)) == pytest.approx(0.5)  # step cap first
    assert tg.lr_scale(h, 17500, ms(0.95)) == pytest.approx(0.2)  # the smaller of the two
    assert tg.lr_scale(h, 20000, ms(0.5)) == 0.0


def test_lr_scale_steps_only(tiny_env, monkeypatch):
    """MAX_WALLCLOCK_SECONDS=0: the last WARMDOWN_ITERS steps decay linearly to 0 at ITERATIONS; time is ignored."""
    h = make_h(monkeypatch, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=100, WARMDOWN_ITERS=20, WARMDOWN_FRAC=0.25)
    for elapsed in (0.0, 1e3, 1e12):
        assert tg.lr_scale(h, 0, elapsed) == 1.0
        assert tg.lr_scale(h, 80, elapsed) == 1.0
        assert tg.lr_scale(h, 85, elapsed) == pytest.approx(0.75)
        assert tg.lr_scale(h, 90, elapsed) == pytest.approx(0.5)
        assert tg.lr_scale(h, 99, elapsed) == pytest.approx(0.05)
        assert tg.lr_scale(h, 100, elapsed) == 0.0
        assert tg.lr_scale(h, 105, elapsed) == 0.0
    h = make_h(monkeypatch, WARMDOWN_ITERS=0)
    assert tg.lr_scale(h, 0, 0.0) == 1.0 and tg.lr_scale(h, 100, 1e12) == 1.0
    # WARMDOWN_FRAC=0 with a cap: no time-based decay, only the step one
    h = make_h(monkeypatch, MAX_WALLCLOCK_SECONDS=CAP_S, WARMDOWN_FRAC=0, WARMDOWN_ITERS=20)
    assert tg.lr_scale(h, 10, ms(0.99)) == 1.0
    assert tg.lr_scale(h, 90, ms(0.5)) == pytest.approx(0.5)


def test_progress(tiny_env, monkeypatch):
    h = make_h(monkeypatch, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=200)
    assert tg.progress(h, 0, 0.0) == 0.0
    assert tg.progress(h, 50, 1e12) == pytest.approx(0.25)  # time is ignored without a cap
    assert tg.progress(h, 200, 0.0) == 1.0
    assert tg.progress(h, 400, 0.0) == 1.0
    h = make_h(monkeypatch, MAX_WALLCLOCK_SECONDS=CAP_S, ITERATIONS=200)
    assert tg.progress(h, 0, 0.0) == 0.0
    assert tg.progress(h, 10, ms(0.3)) == pytest.approx(0.3)  # the time fraction when it is ahead
    assert tg.progress(h, 100, ms(0.3)) == pytest.approx(0.5)  # the step fraction when it is ahead
    assert tg.progress(h, 10, ms(1.5)) == 1.0
    vals = [tg.progress(h, s, ms(s / 400)) for s in range(0, 250)]
    assert all(0.0 <= x <= y <= 1.0 for x, y in zip(vals, vals[1:]))


# ----------------------------------------------------------------------------- 9. import hygiene

def test_import_has_no_side_effects(tmp_path):
    """`import train_gpt` from an empty directory with a clean environment prints nothing, writes no file (in
    the working directory, next to the module or in HOME), installs no signal handler and starts no process
    group. A second run with bad values in the env shows that nothing is read from it at import time.
    (Both subprocesses run concurrently: importing torch dominates their time.)"""
    code = ("import signal, sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))\n"
            "import train_gpt\n"
            "import torch.distributed as dist\n"
            "assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before\n"
            "assert not dist.is_initialized()\n"
            "assert callable(train_gpt.main)\n")
    procs = []
    for hostile in (False, True):
        base = tmp_path / ("hostile" if hostile else "clean")
        src, run, home = base / "src", base / "run", base / "home"
        for d in (src, run, home):
            d.mkdir(parents=True)
        shutil.copy(os.path.join(ROOT, "train_gpt.py"), src / "train_gpt.py")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
        if hostile:
            env.update(VOCAB_SIZE="oops", MODEL_DIM="-3", QUANT_BITS="nope", RUN_ID="x", DATA_PATH="/nonexistent",
                       RANK="0", WORLD_SIZE="2", COMPILE="7")
        p = subprocess.Popen([sys.executable, "-c", code, str(src)], cwd=run, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append((hostile, p, src, run, home))
    for hostile, p, src, run, home in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, (hostile, err)
        assert out == "" and err == "", (hostile, out, err)
        assert os.listdir(run) == []
        assert os.listdir(src) == ["train_gpt.py"]
        assert os.listdir(home) == []


# ----------------------------------------------------------------------------- bf16 control path

def _train_losses(h, seed, fp32_ctrl, steps=20):
    """Training losses of the tiny model on the synthetic data under CPU bf16 autocast (as on a GPU)."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    if fp32_ctrl:  # the control projection as before: fp32, outside autocast
        for m in model.modules():
            if isinstance(m, tg.TRN):
                m.ctrl.forward = lambda x, lin=m.ctrl: _fp32_linear(lin, x)
    opts, loader, out = tg.make_optimizers(model, h), tg.TrainLoader(h, 0, 1, torch.device("cpu")), []
    for _ in range(steps):
        total = 0.0
        for x, y, w in loader.next_batch():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, y)
            (loss * w).backward()
            total += float(loss.detach()) * w
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append(total)
    return out


def _fp32_linear(lin, x):
    with torch.autocast("cpu", enabled=False):
        return tg.CastedLinear.forward(lin, x.float())


def test_bf16_control_matmul_trains_like_fp32(tiny_env, monkeypatch):
    """The TRN control projection (frequency, phase, decay) runs in bf16 under autocast; with an fp32 one the
    same 20 steps end at the same loss, within the spread that another seed gives."""
    h = make_h(monkeypatch, ITERATIONS=20)
    bf16, fp32, other = (_train_losses(h, 0, False), _train_losses(h, 0, True), _train_losses(h, 1, False))
    tail = lambda v: sum(v[-5:]) / 5
    print(f"mean loss of steps 16-20: bf16 control {tail(bf16):.4f}, fp32 control {tail(fp32):.4f}, "
          f"bf16 control with another seed {tail(other):.4f}")
    assert bf16 != fp32  # the control path really changed
    assert abs(tail(bf16) - tail(fp32)) < max(0.02, abs(tail(bf16) - tail(other))), (tail(bf16), tail(fp32), tail(other))
