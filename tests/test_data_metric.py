"""Data loading (shard validation, TokenStream, TrainLoader) and the byte accounting behind val_bpb."""
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import VOCAB, write_shard

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- shard validation

def _write_corrupt(path, kind):
    toks = [1, 5, 7, 300, 2, 9]
    if kind == "bad_magic":
        write_shard(path, toks, magic=20240521)
    elif kind == "bad_version":
        write_shard(path, toks, version=2)
    elif kind == "truncated":  # header promises more tokens than the file holds
        write_shard(path, toks, count=len(toks) + 3)
    elif kind == "too_long":  # file holds more tokens than the header says
        write_shard(path, toks, count=len(toks) - 2)
    elif kind == "odd_tail":  # one stray byte after the last token
        write_shard(path, toks)
        with open(path, "ab") as f:
            f.write(b"\x00")
    elif kind == "short_header":  # cut inside the 1024-byte header
        write_shard(path, toks)
        with open(path, "r+b") as f:
            f.truncate(500)
    elif kind == "empty_file":
        open(path, "wb").close()
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["bad_magic", "bad_version", "truncated", "too_long", "odd_tail", "short_header", "empty_file"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_shard_raises_user_error_naming_file(tmp_path, kind):
    good = tmp_path / "fineweb_train_000000.bin"
    write_shard(good, [1, 2, 3])
    bad = tmp_path / "fineweb_train_000001.bin"
    _write_corrupt(bad, kind)
    for call in (lambda: tg.shard_len(str(bad)), lambda: tg.load_shard(str(bad), VOCAB),
                 lambda: tg.shard_files(str(tmp_path), "train")):
        with pytest.raises(tg.UserError) as ei:
            call()
        assert str(bad) in str(ei.value)
    # the good shard on its own is fine
    assert tg.shard_len(str(good)) == 3


def test_corrupt_val_shard_found_by_shard_files(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3])
    bad = tmp_path / "fineweb_val_000000.bin"
    _write_corrupt(bad, "truncated")
    assert tg.shard_files(str(tmp_path), "train") == [str(tmp_path / "fineweb_train_000000.bin")]
    with pytest.raises(tg.UserError, match="fineweb_val_000000.bin"):
        tg.shard_files(str(tmp_path), "val")


def test_token_id_out_of_vocab(tmp_path):
    p = tmp_path / "fineweb_val_000000.bin"
    write_shard(p, [1, 5, VOCAB, 7])
    assert tg.shard_len(str(p)) == 4  # the header is fine: only loading checks the ids
    with pytest.raises(tg.UserError) as ei:
        tg.load_shard(str(p), VOCAB)
    msg = str(ei.value)
    assert str(p) in msg and str(VOCAB) in msg
    np.testing.assert_array_equal(tg.load_shard(str(p), VOCAB + 1), [1, 5, VOCAB, 7])
    # the largest legal id passes
    q = tmp_path / "fineweb_val_000001.bin"
    write_shard(q, [VOCAB - 1, 0, 1])
    np.testing.assert_array_equal(tg.load_shard(str(q), VOCAB), [VOCAB - 1, 0, 1])


def test_load_shard_roundtrip_and_sorted_files(tmp_path):
    rng = np.random.default_rng(0)
    shards = {i: rng.integers(0, 65535, size=int(rng.integers(0, 50))) for i in (2, 0, 10, 1)}
    for i, toks in shards.items():
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", toks)
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    (tmp_path / "README.txt").write_text("not a shard")
    files = tg.shard_files(str(tmp_path), "train")
    assert files == [str(tmp_path / f"fineweb_train_{i:06d}.bin") for i in (0, 1, 2, 10)]
    for i, toks in shards.items():
        path = str(tmp_path / f"fineweb_train_{i:06d}.bin")
        assert tg.shard_len(path) == len(toks)
        got = tg.load_shard(path, 65536)
        np.testing.assert_array_equal(got, toks)


def test_missing_data_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(tg.UserError) as ei:
        tg.shard_files(str(missing), "train")
    msg = str(ei.value)
    assert "DATA_PATH" in msg and str(missing) in msg and "cached_challenge_fineweb.py" in msg


@pytest.mark.parametrize("contents", ["empty", "other_split", "wrong_names"])
def test_no_matching_shards(tmp_path, contents):
    if contents == "other_split":
        write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    elif contents == "wrong_names":
        write_shard(tmp_path / "train_000000.bin", [1, 2, 3])
        write_shard(tmp_path / "fineweb_train_000000.dat", [1, 2, 3])
    with pytest.raises(tg.UserError) as ei:
        tg.shard_files(str(tmp_path), "train")
    msg = str(ei.value)
    assert "DATA_PATH" in msg and str(tmp_path) in msg and "cached_challenge_fineweb.py" in msg


# ----------------------------------------------------------------------------- TokenStream

@pytest.fixture
def three_shards(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, VOCAB, size=n) for n in (10, 5, 7)]
    files = []
    for i, p in enumerate(parts):
        f = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(f, p)
        files.append(str(f))
    return files, np.concatenate(parts)


def test_token_stream_wraps_across_shards_and_around(three_shards):
    files, ref = three_shards
    s = tg.TokenStream(files, VOCAB)
    sizes = [3, 7, 1, 4, 6, 22, 9, 50, 2]  # crosses every shard boundary and wraps around several times
    got = np.concatenate([s.take(k) for k in sizes])
    want = np.resize(ref, sum(sizes))  # np.resize repeats the array cyclically
    np.testing.assert_array_equal(got, want)
    # deterministic: a second stream gives the same tokens
    s2 = tg.TokenStream(files, VOCAB)
    np.testing.assert_array_equal(np.concatenate([s2.take(k) for k in sizes]), want)


@pytest.mark.parametrize("skip", [0, 4, 10, 12, 15, 21, 22, 31])
def test_token_stream_state_restore(three_shards, skip):
    files, ref = three_shards
    s = tg.TokenStream(files, VOCAB)
    if skip:
        s.take(skip)
    st = dict(s.state())
    after = s.take(30)
    np.testing.assert_array_equal(after, np.resize(np.roll(ref, -(skip % len(ref))), 30))
    s.take(13)  # move somewhere else (another shard) before restoring
    s.restore(st)
    np.testing.assert_array_equal(s.take(30), after)
    fresh = tg.TokenStream(files, VOCAB)  # a new process resuming from a checkpointed state
    fresh.restore(st)
    np.testing.assert_array_equal(fresh.take(30), after)


def test_token_stream_validates_vocab(three_shards, tmp_path):
    files, _ = three_shards
    bad = tmp_path / "fineweb_train_000099.bin"
    write_shard(bad, [1, VOCAB + 5])
    s = tg.TokenStream(files + [str(bad)], VOCAB)
    with pytest.raises(tg.UserError, match="fineweb_train_000099.bin"):
        s.take(30)


# ----------------------------------------------------------------------------- TrainLoader

SEQ, NSEQ = 8, 6


@pytest.fixture
def loader_env(tiny_env, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, VOCAB, size=n) for n in (101, 76)]  # 177 tokens: wraps within 4 steps of 48
    for i, p in enumerate(parts):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", p)
    monkeypatch.setenv("DATA_PATH", str(tmp_path))
    monkeypatch.setenv("TRAIN_SEQ_LEN", str(SEQ))
    monkeypatch.setenv("TRAIN_BATCH_TOKENS", str(SEQ * NSEQ))
    monkeypatch.setenv("MICRO_BATCH_SEQS", "2")
    return np.concatenate(parts)


def _rank_batch(micro):
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    return x, y


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_loader_ranks_partition_the_global_batch(loader_env, world_size):
    ref = loader_env
    h = tg.Hyperparameters()
    loaders = [tg.TrainLoader(h, r, world_size, CPU) for r in range(world_size)]
    steps = 6
    prev_y = None
    for step in range(steps):
        xs, ys = [], []
        for r, ld in enumerate(loaders):
            micro = ld.next_batch()
            weights = [w for _, _, w in micro]
            assert sum(weights) == pytest.approx(1.0, abs=1e-12)
            x, y = _rank_batch(micro)
            assert x.dtype == torch.int64 and y.dtype == torch.int64
            assert x.shape == (NSEQ // world_size, SEQ) and y.shape == x.shape
            for (mx, my, w) in micro:
                assert mx.shape[0] <= h.micro_batch_seqs and mx.shape == my.shape
                assert w == pytest.approx(mx.shape[0] / x.shape[0])
            xs.append(x)
            ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)
        # exactly the world-size-1 batch: the stream read contiguously, with wrap-around
        base = step * SEQ * NSEQ
        want = np.resize(np.roll(ref, -(base % len(ref))), SEQ * NSEQ + 1)
        np.testing.assert_array_equal(x.flatten().numpy(), want[:-1])
        np.testing.assert_array_equal(y.flatten().numpy(), want[1:])
        # targets are the inputs shifted by one, also across row boundaries
        assert torch.equal(y.flatten()[:-1], x.flatten()[1:])
        if prev_y is not None:  # the last target of a step is the first input of the next
            assert int(prev_y.flatten()[-1]) == int(x.flatten()[0])
        prev_y = y


def test_train_loader_state_resume(loader_env):
    h = tg.Hyperparameters()
    a = tg.TrainLoader(h, 0, 1, CPU)
    a.next_batch()
    a.next_batch()
    st = dict(a.stream.state())
    want = [_rank_batch(a.next_batch()) for _ in range(3)]
    b = tg.TrainLoader(h, 0, 1, CPU)
    b.stream.restore(st)
    for wx, wy in want:
        x, y = _rank_batch(b.next_batch())
        assert torch.equal(x, wx) and torch.equal(y, wy)


@pytest.mark.parametrize("world_size", [4, 5, 7])
def test_train_loader_indivisible_world_size(loader_env, world_size):
    h = tg.Hyperparameters()
    with pytest.raises(tg.UserError, match=str(world_size)):
        tg.TrainLoader(h, 0, world_size, CPU)


def test_train_split_without_tokens_raises_instead_of_hanging(tiny_env, tmp_path):
    """Train shards that are all valid but empty: reading a batch must fail with a UserError, not spin forever
    in TokenStream.take looking for the next token. Run in a subprocess so a hang shows up as a timeout."""
    import subprocess
    import sys
    for i in range(2):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [])
    code = (
        "import sys, torch; sys.path.insert(0, {root!r}); import train_gpt as tg\n"
        "try:\n"
        "    h = tg.Hyperparameters()\n"
        "    tg.TrainLoader(h, 0, 1, torch.device('cpu')).next_batch()\n"
        "except tg.UserError as e:\n"
        "    print('USERERROR', e)\n"
    ).format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, DATA_PATH=str(tmp_path), OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("TrainLoader.next_batch() hangs when the train shards hold no tokens")
    assert "USERERROR" in r.stdout, r.stdout + r.stderr
    assert str(tmp_path) in r.stdout


# ----------------------------------------------------------------------------- byte accounting

@pytest.fixture(scope="module")
def sp_synth(synth):
    return spm.SentencePieceProcessor(model_file=synth["tokenizer_path"])


def _bytes(tokens, luts):
    return tg.target_bytes(torch.tensor(tokens, dtype=torch.int32), luts)


def test_val_bytes_equal_utf8_length_of_documents(synth, sp_synth):
    luts = tg.byte_luts(sp_synth, VOCAB)
    val = torch.from_numpy(tg.load_shard(os.path.join(synth["data_path"], "fineweb_val_000000.bin"), VOCAB).astype(np.int32))
    assert val.tolist() == synth["val_tokens"]
    tb = tg.target_bytes(val, luts)
    assert tb.shape == (val.numel() - 1,) and tb.dtype == torch.float64
    # conftest writes [BOS] + sp.encode(doc) per document; the dummy-prefix space after BOS is not a byte of the text
    assert int(tb.sum()) == sum(len(d.encode("utf-8")) for d in synth["val_docs"])
    # ... and per document: a document's targets are its pieces (the next BOS target counts 0)
    spans = tg.doc_spans(val, 1)
    assert len(spans) == len(synth["val_docs"])
    for (s, e), doc in zip(spans, synth["val_docs"]):
        assert int(tb[s:e].sum()) == len(doc.encode("utf-8"))


def test_byte_fallback_pieces_count_one_byte_each(sp_synth):
    luts = tg.byte_luts(sp_synth, VOCAB)
    text = "a\U0001F600 \u20ac"  # 'a', a 4-byte emoji and a 3-byte euro sign, both unknown to the tokenizer
    ids = sp_synth.encode(text)
    n_byte = sum(sp_synth.is_byte(i) for i in ids)
    assert n_byte == 7, [sp_synth.id_to_piece(i) for i in ids]  # the test relies on byte fallback happening
    tb = _bytes([1] + ids, luts)
    assert tb.tolist() == [1.0] * len(ids)
    assert int(tb.sum()) == len(text.encode("utf-8"))
    base, space, boundary = luts
    for i in range(VOCAB):
        if sp_synth.is_byte(i):
            assert int(base[i]) == 1 and not bool(space[i]) and not bool(boundary[i])


def test_control_and_unknown_count_zero(sp_synth):
    luts = tg.byte_luts(sp_synth, VOCAB)
    base, space, boundary = luts
    a = sp_synth.piece_to_id("a")
    for i in (0, 1, 2, 3):  # pad, bos, eos (control) and unk
        assert int(base[i]) == 0 and bool(boundary[i])
        assert _bytes([a, i], luts).tolist() == [0.0]
        assert _bytes([i, i], luts).tolist() == [0.0]


def test_leading_space_counted_except_after_boundary(sp_synth):
    luts = tg.byte_luts(sp_synth, VOCAB)
    uber, bare, a = (sp_synth.piece_to_id(p) for p in ("\u2581\u00fcber", "\u2581", "a"))
    tokyo = sp_synth.piece_to_id("\u6771")
    byte_piece = next(i for i in range(VOCAB) if sp_synth.is_byte(i))
    assert 3 not in (uber, bare, a, tokyo), "expected pieces missing from the synthetic tokenizer"
    for prev in (a, tokyo, byte_piece, uber):  # ordinary pieces, including a byte piece: the space is a real byte
        assert _bytes([prev, uber], luts).tolist() == [6.0]  # ' ' + 'ü'(2) + 'ber'
        assert _bytes([prev, bare], luts).tolist() == [1.0]
    for prev in (0, 1, 2, 3):  # after a document boundary the leading space is the tokenizer's dummy prefix
        assert _bytes([prev, uber], luts).tolist() == [5.0]
        assert _bytes([prev, bare], luts).tolist() == [0.0]
    assert _bytes([a, tokyo], luts).tolist() == [3.0]
    assert _bytes([1, tokyo], luts).tolist() == [3.0]
    # the whole sequence: [BOS] ▁über a 東 ▁ ▁über <UNK> ▁über
    seq = [1, uber, a, tokyo, bare, uber, 3, uber]
    assert _bytes(seq, luts).tolist() == [5.0, 1.0, 3.0, 1.0, 6.0, 0.0, 5.0]


@pytest.mark.parametrize("vocab", [VOCAB - 1, VOCAB + 1, 1024])
def test_tokenizer_vocab_mismatch(sp_synth, vocab):
    with pytest.raises(tg.UserError, match=str(vocab)):
        tg.byte_luts(sp_synth, vocab)


def test_real_val_bytes(real_data):
    sp = spm.SentencePieceProcessor(model_file=real_data["tokenizer_path"])
    files = tg.shard_files(real_data["data_path"], "val")
    val = np.concatenate([tg.load_shard(f, 1024) for f in files])
    luts = tg.byte_luts(sp, 1024)
    total = int(tg.target_bytes(torch.from_numpy(val.astype(np.int32)), luts).sum())
    starts = np.flatnonzero(val == 1).tolist()
    assert starts and starts[0] == 0
    want = sum(len(sp.decode(val[s:e].tolist()).encode("utf-8")) for s, e in zip(starts, starts[1:] + [len(val)]))
    assert total == want
    if len(val) == 1_040_060:  # the fineweb_mini kit: its README gives the byte count
        assert total == 2_504_310
