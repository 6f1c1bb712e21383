"""Evaluation: sliding windows, per-target scoring over simulated ranks, finish(), and score-first LoRA TTT."""
import math
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from conftest import VOCAB, HostReads


# ----------------------------------------------------------------------------- eval_windows

WINDOW_CASES = [(1, 64, 16), (5, 64, 16), (63, 64, 16), (64, 64, 16), (65, 64, 16), (79, 64, 16), (80, 64, 16),
                (81, 64, 16), (1000, 64, 16), (1000, 64, 7), (999, 64, 64), (128, 64, 64), (129, 64, 64),
                (77, 10, 3), (10, 10, 10), (11, 10, 1), (50, 8, 8), (2, 1, 1), (37, 5, 5), (37, 5, 4)]


@pytest.mark.parametrize("n,seq_len,stride", WINDOW_CASES)
def test_eval_windows(n, seq_len, stride):
    starts, offsets = tg.eval_windows(n, seq_len, stride)
    starts, offsets = np.asarray(starts), np.asarray(offsets)
    L = min(seq_len, n)
    assert len(starts) == len(offsets) >= 1
    cover = np.zeros(n, np.int64)
    for i, (s, o) in enumerate(zip(starts.tolist(), offsets.tolist())):
        assert 0 <= s and s + L <= n  # every window has length L and lies inside the targets
        assert 0 <= o < L  # and scores at least one target
        cover[s + o:s + L] += 1
        if i == 0:
            assert s == 0 and o == 0
        else:
            assert o >= seq_len - stride  # context before the first scored target
    assert (cover == 1).all(), np.flatnonzero(cover != 1)[:10]
    assert starts[-1] + L == n
    assert len(starts) <= 1 + math.ceil(max(n - L, 0) / stride)  # no redundant windows


# ----------------------------------------------------------------------------- score_windows + finish

class BigramFake(nn.Module):
    """Per-token nll that depends only on (x_t, y_t): a random bigram logit table."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)

    def forward(self, x, y, reduction="mean"):
        assert x.shape == y.shape and x.dtype == torch.int64 and y.dtype == torch.int64
        nll = -F.log_softmax(self.table[x], -1).gather(-1, y[..., None])[..., 0]
        return nll.mean() if reduction == "mean" else nll


class PositionFake(nn.Module):
    """nll_t = t, the position of the target in its window (= tokens of context before it)."""

    def forward(self, x, y, reduction="mean"):
        return torch.arange(x.size(1), dtype=torch.float32).expand(x.shape).clone()


def _score_all_ranks(model, val, seq_len, stride, batch, ws):
    nll = cnt = None
    for r in range(ws):
        a, c = tg.score_windows(model, val, seq_len, stride, batch, rank=r, world_size=ws)
        nll, cnt = (a, c) if nll is None else (nll + a, cnt + c)
    return nll, cnt


SCORE_CASES = [(1, 16, 16, 4), (15, 16, 16, 4), (16, 16, 16, 4), (17, 16, 16, 4), (100, 16, 16, 3),
               (100, 16, 5, 3), (333, 32, 8, 7), (257, 64, 16, 2), (64, 64, 16, 16), (50, 12, 12, 1)]


@pytest.mark.parametrize("ws", [1, 2, 3])
@pytest.mark.parametrize("n,seq_len,stride,batch", SCORE_CASES)
def test_score_windows_exact_once(n, seq_len, stride, batch, ws):
    V = 37
    g = torch.Generator().manual_seed(n * 7 + stride)
    val = torch.randint(0, V, (n + 1,), generator=g, dtype=torch.int32)
    model = BigramFake(V)
    nll, cnt = _score_all_ranks(model, val, seq_len, stride, batch, ws)
    assert nll.shape == cnt.shape == (n,)
    assert nll.dtype == torch.float64
    assert (cnt == 1).all()
    with torch.no_grad():
        direct = model(val[:-1].long()[None], val[1:].long()[None], reduction="none")[0].double()
    torch.testing.assert_close(nll, direct, rtol=1e-6, atol=1e-6)
    assert float(nll.sum()) == pytest.approx(float(direct.sum()), rel=1e-9)
    tbytes = torch.randint(0, 5, (n,), generator=g).double()
    tbytes[0] = 3  # never zero bytes in total
    loss, bpb, ntok, nbytes = tg.finish(nll, cnt, tbytes)
    assert ntok == n and nbytes == int(tbytes.sum())
    assert loss == pytest.approx(float(direct.sum()) / n, rel=1e-9)
    assert bpb == pytest.approx(float(direct.sum()) / math.log(2) / float(tbytes.sum()), rel=1e-9)


@pytest.mark.parametrize("ws", [1, 3])
@pytest.mark.parametrize("n,seq_len,stride", [(200, 32, 8), (201, 32, 32), (45, 16, 5), (10, 16, 4)])
def test_score_windows_context(n, seq_len, stride, ws):
    """Each target is scored in the window position the sliding evaluation promises: the first window scores
    targets 0..L-1 at positions 0..L-1, every later target has at least seq_len - stride tokens before it."""
    val = torch.zeros(n + 1, dtype=torch.int32)
    pos, cnt = _score_all_ranks(PositionFake(), val, seq_len, stride, 3, ws)
    assert (cnt == 1).all()
    L = min(seq_len, n)
    assert pos[:L].tolist() == list(range(L))
    assert (pos[L:] >= seq_len - stride).all() and (pos < L).all()


def test_val_bpb_on_synthetic_val(synth):
    """End to end on the synthetic val shard: bpb = total nll / ln 2 / UTF-8 bytes of the documents."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=synth["tokenizer_path"])
    val = torch.tensor(synth["val_tokens"], dtype=torch.int32)
    tbytes = tg.target_bytes(val, tg.byte_luts(sp, VOCAB))
    model = BigramFake(VOCAB, seed=3)
    with torch.no_grad():
        direct = float(model(val[:-1].long()[None], val[1:].long()[None], reduction="none").double().sum())
    n_bytes = sum(len(d.encode("utf-8")) for d in synth["val_docs"])
    for seq_len, stride in ((64, 64), (64, 16)):
        nll, cnt = _score_all_ranks(model, val, seq_len, stride, 16, 2)
        loss, bpb, ntok, nbytes = tg.finish(nll, cnt, tbytes)
        assert ntok == len(synth["val_tokens"]) - 1 and nbytes == n_bytes
        assert bpb == pytest.approx(direct / math.log(2) / n_bytes, rel=1e-9)


@pytest.mark.parametrize("bad", ["twice", "never", "both"])
def test_finish_rejects_bad_coverage(bad):
    n = 20
    nll, cnt, tb = torch.rand(n, dtype=torch.float64), torch.ones(n, dtype=torch.int32), torch.ones(n, dtype=torch.float64)
    tg.finish(nll.clone(), cnt.clone(), tb)  # fine as it is
    if bad in ("twice", "both"):
        cnt[3] = 2
    if bad in ("never", "both"):
        cnt[17] = 0
    with pytest.raises(RuntimeError):
        tg.finish(nll, cnt, tb)


# ----------------------------------------------------------------------------- doc_spans

def test_doc_spans():
    v = torch.tensor([1, 5, 6, 1, 7, 1, 1, 8, 9, 9], dtype=torch.int32)
    assert tg.doc_spans(v, 1) == [(0, 3), (3, 5), (5, 6), (6, 9)]
    w = torch.tensor([5, 6, 1, 7, 8, 1], dtype=torch.int32)  # no leading BOS, trailing BOS is only a target
    assert tg.doc_spans(w, 1) == [(0, 2), (2, 5)]


# ----------------------------------------------------------------------------- TTT

C, SEQ = 16, 64  # TTT_CHUNK and EVAL_SEQ_LEN of the tiny config
BIG_LR = 0.05


def _docs(synth):
    val = synth["val_tokens"]
    starts = [i for i, t in enumerate(val) if t == 1] + [len(val)]
    return [val[s:e] for s, e in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def ttt_docs(synth):
    """A handful of synthetic val documents: very short (< one chunk), around SEQ, and several chunks long."""
    docs = sorted(_docs(synth), key=len)
    want = [11, 28, 50, 64, 65, 90, 140, 200]
    chosen = []
    for w in want:
        d = min((d for d in docs if d not in chosen), key=lambda d: abs(len(d) - w))
        chosen.append(d)
    rng = np.random.default_rng(0)
    rng.shuffle(chosen)
    return [list(d) for d in chosen]


def _val(docs):
    return torch.tensor([t for d in docs for t in d], dtype=torch.int32)


def _h(monkeypatch, **kw):
    for k, v in kw.items():
        monkeypatch.setenv(k, str(v))
    return tg.Hyperparameters()


def _model(h, seed=0):
    """The tiny GPT with every weight random (the zero-initialised projections too), so outputs depend on context."""
    torch.manual_seed(seed)
    m = tg.GPT(h)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("emb.weight"):
                p.normal_(0, 0.5)
            elif p.ndim == 2 and "resid_mix" not in name and "skip" not in name:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    return m.eval()


def _ttt(model, val, h, ws=1, deadline=None, log=None, seed=0):
    """score_ttt over simulated ranks: summed nll and cnt, total plain-scored docs, log lines."""
    torch.manual_seed(seed)
    lines = []
    nll = cnt = None
    plain = 0
    for r in range(ws):
        a, c, (frozen, p) = tg.score_ttt(model, val, h, r, ws, deadline=deadline, log=lines.append if log is None else log)
        nll, cnt = (a, c) if nll is None else (nll + a, cnt + c)
        plain += frozen + p  # scored after adaptation stopped: with frozen adapters, or with none
    return nll, cnt, plain, lines


def _no_adapters(model):
    assert getattr(model, "head_lora", None) is None
    for name, m in model.named_modules():
        if isinstance(m, tg.CastedLinear) or hasattr(m, "lora"):
            assert m.lora is None, name or "<model>"


def _window_reference(model, val, h):
    """Plain (no adaptation) chunked document scoring computed directly: a target at position r of its document
    is scored by a window of the document that starts at max(0, chunk_end - L) and ends at its chunk's end."""
    L = max(h.eval_seq_len, h.ttt_chunk)
    n = val.numel() - 1
    ref = torch.full((n,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for s, e in tg.doc_spans(val, h.bos_id):
            ln = e - s
            for c0 in range(0, ln, h.ttt_chunk):
                lo, hi = max(0, c0 + h.ttt_chunk - L), min(c0 + h.ttt_chunk, ln)
                loss = model(val[s + lo:s + hi][None].long(), val[s + lo + 1:s + hi + 1][None].long(), reduction="none")[0]
                ref[s + c0:s + hi] = loss[c0 - lo:].double()
    assert not ref.isnan().any()
    return ref


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_ttt_lr0_is_plain_document_scoring(tiny_env, monkeypatch, ttt_docs, ws):
    h = _h(monkeypatch, TTT_LR=0, TTT_BATCH_DOCS=3)
    model = _model(h)
    val = _val(ttt_docs)
    nll, cnt, plain, _ = _ttt(model, val, h, ws)
    assert (cnt == 1).all() and plain == 0
    _no_adapters(model)
    # documents that fit one window: the model's per-token loss on the whole document
    n_short = 0
    with torch.no_grad():
        for s, e in tg.doc_spans(val, 1):
            if e - s <= SEQ:
                n_short += 1
                direct = model(val[s:e][None].long(), val[s + 1:e + 1][None].long(), reduction="none")[0].double()
                torch.testing.assert_close(nll[s:e], direct, rtol=1e-5, atol=1e-5)
    assert n_short >= 3
    # all documents, long ones included: a window of at most L tokens ending at the chunk's end
    torch.testing.assert_close(nll, _window_reference(model, val, h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_ttt_coverage_and_cleanup(tiny_env, monkeypatch, ttt_docs, ws):
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=3)
    model = _model(h)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = _val(ttt_docs)
    nll, cnt, plain, lines = _ttt(model, val, h, ws)
    assert cnt.shape == (val.numel() - 1,) and (cnt == 1).all() and plain == 0
    assert torch.isfinite(nll).all() and not any("ttt_time_guard" in l for l in lines)
    _no_adapters(model)
    for k, v in model.state_dict().items():  # TTT never touches the base weights
        assert torch.equal(v, before[k]), k
    # adaptation is real: later chunks score differently from plain scoring, the first chunk identically
    plain_ref = _window_reference(model, val, h)
    first = torch.zeros_like(cnt, dtype=torch.bool)
    for s, e in tg.doc_spans(val, 1):
        first[s:min(e, s + C)] = True
    torch.testing.assert_close(nll[first], plain_ref[first], rtol=1e-5, atol=1e-5)
    assert (nll[~first] - plain_ref[~first]).abs().max() > 1e-2


def test_ttt_more_ranks_than_documents(tiny_env, monkeypatch, ttt_docs):
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=2)
    model = _model(h)
    val = _val(sorted(ttt_docs, key=len)[:2])
    nll, cnt, plain, _ = _ttt(model, val, h, ws=3)
    assert (cnt == 1).all() and plain == 0 and torch.isfinite(nll).all()
    _no_adapters(model)


def _perturb(val, positions, seed):
    v = val.clone()
    g = torch.Generator().manual_seed(seed)
    for q in positions:
        old = int(v[q])
        new = old
        while new == old:
            new = int(torch.randint(4, VOCAB, (1,), generator=g))
        v[q] = new
    return v


def _long_doc(val):
    spans = tg.doc_spans(val, 1)
    return max(spans, key=lambda se: se[1] - se[0]), spans


@pytest.mark.parametrize("rel", [1, 7, C - 1, C, C + 1, 2 * C + 5, 3 * C, 100])
def test_ttt_score_depends_only_on_tokens_up_to_target(tiny_env, monkeypatch, ttt_docs, rel):
    """With adaptation on (large TTT_LR) the score of target t (predicting val[t+1]) may depend on val[..t+1] only.
    Changing token q of a document leaves every target before q-1 unchanged: a chunk trained on before it is
    scored, or an adapter stepped on tokens beyond it, would break this (also for tokens inside the same chunk)."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=3)
    model = _model(h)
    val = _val(ttt_docs)
    (s, e), spans = _long_doc(val)
    assert e - s > 150 and rel < e - s
    q = s + rel
    base, _, _, _ = _ttt(model, val, h)
    pert, cnt, _, _ = _ttt(model, _perturb(val, [q], seed=rel), h)
    assert (cnt == 1).all()
    assert torch.equal(pert[:q - 1], base[:q - 1])  # everything before, this document and the others
    assert torch.equal(pert[e:], base[e:])  # other documents (the rest of val) are independent of this one
    assert (pert[q - 1:e] - base[q - 1:e]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [0, 1, 2, 5])
def test_ttt_changing_later_chunks_keeps_earlier_scores(tiny_env, monkeypatch, ttt_docs, chunk):
    """Scores of chunks <= c equal those of a run on a val where every token after chunk c of that document
    (up to, not including, the next BOS) is changed; some later score does change."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=3)
    model = _model(h)
    val = _val(ttt_docs)
    (s, e), _ = _long_doc(val)
    end = s + (chunk + 1) * C  # targets s..end-1 form chunks 0..c; their last target token is val[end]
    assert end + 2 < e
    base, _, _, _ = _ttt(model, val, h)
    pert, cnt, _, _ = _ttt(model, _perturb(val, range(end + 1, e), seed=chunk), h)
    assert (cnt == 1).all()
    assert torch.equal(pert[:end], base[:end])
    assert torch.equal(pert[e:], base[e:])
    assert (pert[end:e] - base[end:e]).abs().max() > 1e-3


def test_ttt_scores_each_chunk_before_stepping_on_it(tiny_env, monkeypatch, ttt_docs):
    """Instrumented: record the adapter optimizers' creation and steps and the model calls. In each batch of
    documents the k-th forward comes after exactly k steps, one step follows every forward but the last, and the
    scores of chunk k are exactly that forward's (pre-step) losses. Rows are matched to documents by a token
    unique to each document, so the test does not assume an order of the documents."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=3)
    model = _model(h)
    docs = [list(d) for d in ttt_docs]
    for i, d in enumerate(docs):
        d[1] = 200 + i  # the first token after BOS identifies the document
    val = _val(docs)
    spans = tg.doc_spans(val, 1)
    by_tag = {int(val[s + 1]): (s, e) for s, e in spans}
    assert len(by_tag) == len(spans)
    L = max(h.eval_seq_len, h.ttt_chunk)
    events = []
    real_adam = torch.optim.Adam

    class RecordingAdam(real_adam):
        def __init__(self, *a, **k):
            events.append(("opt", None))
            super().__init__(*a, **k)

        def step(self, *a, **k):
            events.append(("step", None))
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    real_forward = model.forward

    def forward(x, y, reduction="mean"):
        loss = real_forward(x, y, reduction=reduction)
        events.append(("fwd", (x.clone(), loss.detach().clone())))
        return loss

    monkeypatch.setattr(model, "forward", forward)
    nll, cnt, _, _ = _ttt(model, val, h)
    assert (cnt == 1).all()

    kinds = "".join({"opt": "O", "step": "S", "fwd": "F"}[k] for k, _ in events)
    batches = [b for b in kinds.split("O") if b]
    assert kinds.startswith("O") and len(batches) == math.ceil(len(spans) / h.ttt_batch_docs), kinds
    for b in batches:  # F S F S ... F: each chunk scored, then one step on it; no step after the last
        assert b == "FS" * (len(b) // 2) + "F", kinds
    checked = 0
    pos = 0
    for b in batches:
        pos += 1  # the "opt" event
        fwds = [events[pos + 2 * k][1] for k in range((len(b) + 1) // 2)]
        pos += len(b)
        # chunk 0 windows start at the document's BOS; empty documents pad the last batch (no tag)
        rows = [by_tag[int(x)] for x in fwds[0][0][:, 1] if int(x) in by_tag]
        assert len(set(rows)) == len(rows)
        assert len(fwds) == math.ceil(max(e - s for s, e in rows) / C)
        for k, (x, loss) in enumerate(fwds):
            lo = max(0, (k + 1) * C - L)  # the window ends at the chunk's end
            for r, (s, e) in enumerate(rows):
                hi = min((k + 1) * C, e - s)
                if k * C >= hi:
                    continue
                assert torch.equal(x[r, :hi - lo].int(), val[s + lo:s + hi])
                assert torch.equal(nll[s + k * C:s + hi], loss[r, k * C - lo:hi - lo].double())
                checked += hi - k * C
    assert pos == len(events)
    assert checked == val.numel() - 1


def test_ttt_steps_on_the_chunk_just_scored_only(tiny_env, monkeypatch, ttt_docs):
    """Each adaptation step's objective is, per document, the mean loss of the chunk just scored: the gradient
    reaching a forward's per-position losses is 1/k on the k targets of that chunk (the window's last TTT_CHUNK
    positions, a prefix of them where the document ends) and 0 elsewhere, on the earlier chunks in the window
    (already scored and stepped on) too."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=3)
    model = _model(h)
    grads, real_forward = [], model.forward

    def forward(x, y, reduction="mean"):
        loss = real_forward(x, y, reduction=reduction)
        if loss.requires_grad:  # the last chunk of a batch takes no step: its hook never fires
            loss.register_hook(lambda g: grads.append(g.detach().clone()))
        return loss

    monkeypatch.setattr(model, "forward", forward)
    _ttt(model, _val(ttt_docs), h)
    assert grads and any(g.size(1) > C for g in grads), "no window held an earlier chunk: the check is vacuous"
    for g in grads:
        assert not g[:, :-C].any()
        for row in g[:, -C:]:
            k = int((row != 0).sum())
            assert torch.equal(row[k:], torch.zeros(C - k)), row  # k = 0: a document already ended
            assert torch.allclose(row[:k], torch.full((k,), 1.0 / max(k, 1))), row


@pytest.mark.parametrize("stride", [SEQ, 16])
def test_scoring_never_waits_for_the_device(tiny_env, monkeypatch, ttt_docs, stride):
    """Flat and sliding scoring queue every batch without reading a device value on the host (its three
    boolean-mask indexes per batch each made the host wait for the GPU)."""
    h = _h(monkeypatch)
    with HostReads() as reads:
        nll, cnt = tg.score_windows(_model(h), _val(ttt_docs), SEQ, stride, 4)
    assert reads.found == [] and (cnt == 1).all()


def _same_lengths_other_content(doc, seed):
    g = np.random.default_rng(seed)
    return [1] + g.integers(4, VOCAB, size=len(doc) - 1).tolist()


@pytest.mark.parametrize("batch_docs", [1, 2, 4])
def test_ttt_adapters_reset_between_documents(tiny_env, monkeypatch, ttt_docs, batch_docs):
    """A document's TTT scores do not depend on the documents processed before it (nor on its batch mates).
    Exactly comparable: the same document at the same place after other documents of the same lengths and
    different content, so the adapters' random initialisation draws the same numbers in both runs."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=batch_docs)
    model = _model(h)
    docs = sorted(ttt_docs, key=len)
    target = docs[-2]  # long (several chunks), processed after the shorter ones
    others = [d for d in docs if d is not target]
    alt = [_same_lengths_other_content(d, i) for i, d in enumerate(others)]
    a = _val(others + [target] + [[1, 5]])
    b = _val(alt + [target] + [[1, 5]])
    s = sum(len(d) for d in others)
    e = s + len(target)
    na, ca, _, _ = _ttt(model, a, h)
    nb, cb, _, _ = _ttt(model, b, h)
    assert (ca == 1).all() and (cb == 1).all()
    assert not torch.equal(na[:s], nb[:s])  # the other documents really differ
    torch.testing.assert_close(na[s:e], nb[s:e], rtol=1e-5, atol=1e-5)
    # and TTT did act on this document (its later chunks differ from plain scoring)
    h0 = _h(monkeypatch, TTT_LR=0)
    ref = _window_reference(model, a, h0)
    assert (na[s + C:e] - ref[s + C:e]).abs().max() > 1e-2


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_ttt_time_guard(tiny_env, monkeypatch, ttt_docs, ws):
    """A deadline already in the past: each rank adapts at most its first batch, then scores plainly and says so
    once; every target is still scored exactly once, and the plainly scored documents equal plain scoring."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=1)
    model = _model(h)
    val = _val(ttt_docs)
    n = val.numel() - 1
    nll, cnt, plain, lines = _ttt(model, val, h, ws, deadline=time.time() - 1)
    assert (cnt == 1).all()
    _no_adapters(model)
    guard = [l for l in lines if "ttt_time_guard" in l]
    assert len(guard) == ws, lines
    spans = tg.doc_spans(val, 1)
    longest = [max(e - s for s, e in spans[r::ws]) for r in range(ws)]
    assert n - sum(longest) <= plain <= n - ws  # plain tokens: all but (part of) each rank's first document
    ref = _window_reference(model, val, h)
    differ = [(s, e) for s, e in spans if not torch.allclose(nll[s:e], ref[s:e], rtol=1e-5, atol=1e-5)]
    assert len(differ) <= ws  # only a rank's first batch (one document) may have been adapted
    # a distant deadline changes nothing: no plain tokens, no message, and adaptation happened
    nll2, cnt2, plain2, lines2 = _ttt(model, val, h, ws, deadline=time.time() + 3600)
    assert plain2 == 0 and (cnt2 == 1).all() and not any("ttt_time_guard" in l for l in lines2)
    nll3, _, _, _ = _ttt(model, val, h, ws)
    torch.testing.assert_close(nll2, nll3, rtol=1e-5, atol=1e-5)
    assert (nll2 - ref).abs().max() > 1e-2


def test_ttt_time_guard_quiet_when_nothing_is_left(tiny_env, monkeypatch, ttt_docs):
    """If the deadline passes only after the last chunk was scored, nothing is scored plainly, so the guard
    must not report that EVAL_MAX_SECONDS would be exceeded."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=4)
    model = _model(h)
    short = min(ttt_docs, key=len)
    assert len(short) <= C
    val = _val([short])  # a single chunk: scored with fresh adapters, no step, nothing left afterwards
    nll, cnt, plain, lines = _ttt(model, val, h, deadline=time.time() - 1)
    assert (cnt == 1).all() and plain == 0
    assert not any("ttt_time_guard" in l for l in lines), lines


def test_ttt_compiled_matches_eager_with_few_graphs(tiny_env, monkeypatch, ttt_docs):
    """score_ttt through a compiled model: the same scores as eager, one graph per window shape (batches padded
    to TTT_BATCH_DOCS, windows to a multiple of TTT_CHUNK), and a second pass compiles nothing new."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=3)
    model = _model(h)
    val = _val(ttt_docs)
    eager, _, _, _ = _ttt(model, val, h)
    torch._dynamo.reset()
    cm = torch.compile(model, backend="aot_eager", dynamic=False)
    nll, cnt, _ = tg.score_ttt(model, val, h, fwd=cm)
    assert (cnt == 1).all()
    torch.testing.assert_close(nll, eager, rtol=1e-4, atol=1e-4)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs <= max(h.eval_seq_len, C) // C + 1, graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        tg.score_ttt(model, val, h, fwd=cm)
    _no_adapters(model)
    torch._dynamo.reset()


def test_warm_ttt_compiles_every_shape_a_passed_deadline_needs(tiny_env, monkeypatch, ttt_docs):
    """After the warmup's warm_ttt, TTT compiles nothing new, adapting or with the deadline passed at once: then
    later batches of long documents run with B zeroed (zero tensors without requires_grad recompiled each window)."""
    h = _h(monkeypatch, TTT_BATCH_DOCS=2)
    model = _model(h)
    val = _val(ttt_docs)
    assert max(max(lens) for _, lens in tg.ttt_batches(val, h)[1:]) > 2 * C  # later batches need long windows
    torch._dynamo.reset()
    cm = torch.compile(model, backend="eager", dynamic=False)
    tg.warm_ttt(model, h, cm)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for deadline in (0, None):
            _, cnt, (frozen, plain) = tg.score_ttt(model, val, h, deadline=deadline, log=lambda m: None, fwd=cm)
            assert (cnt == 1).all() and (plain > 0) == (deadline == 0)
    _no_adapters(model)
    torch._dynamo.reset()


@pytest.mark.parametrize("spare", [3, 10, 25])
def test_ttt_guard_ends_within_the_deadline(tiny_env, monkeypatch, ttt_docs, spare):
    """On a model clock where a model call takes 1 s, an adapter step 2 s and nothing else any time, with a bound
    `spare` seconds more than plain scoring needs: TTT adapts as long as plain scoring of the rest still fits,
    then stops, and ends by the deadline without having stopped earlier than it had to."""
    h = _h(monkeypatch, TTT_LR=BIG_LR, TTT_BATCH_DOCS=2)
    model = _model(h)
    val = _val(ttt_docs)
    calls = sum(-(-max(lens) // C) for _, lens in tg.ttt_batches(val, h))
    clock = [1000.0]

    def fwd(*a, **k):
        clock[0] += 1.0
        return model(*a, **k)

    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        clock[0] += 2.0
        return real_step(self, *a, **k)

    monkeypatch.setattr(tg, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    lines = []
    deadline = 1000.0 + calls + spare
    nll, cnt, (frozen, plain) = tg.score_ttt(model, val, h, deadline=deadline, log=lines.append, fwd=fwd)
    assert (cnt == 1).all() and len(lines) == 1 and frozen + plain > 0
    assert deadline - 3 < clock[0] <= deadline  # an adapting chunk costs 3 s: at most that much is left over
