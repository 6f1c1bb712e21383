"""End-to-end behaviour of train_gpt.py's main(): input validation, the full tiny run and its log, 1 vs 2 processes,
checkpoint/resume bit-exactness, SIGTERM, refused checkpoints, the overwrite guard and divergence handling.

Subprocess runs are the expensive part (~6 s each, ~15-20 s under torchrun), so runs that several tests look at are
module-scoped fixtures; everything that needs no process boundary is checked in-process."""
import json
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import SCRIPT, TINY, VOCAB, HostReads, run_script

QUIET = dict(TTT_ENABLED="0", EVAL_STRIDE="0")  # for runs that do not look at the sliding/TTT evaluations


# ----------------------------------------------------------------------------- helpers

class Run:
    def __init__(self, proc, cwd, run_id):
        self.rc, self.stdout, self.stderr, self.cwd, self.run_id = proc.returncode, proc.stdout, proc.stderr, cwd, run_id
        self.log_path = os.path.join(cwd, "logs", f"{run_id}.txt")
        self.log = open(self.log_path).read() if os.path.exists(self.log_path) else None
        self.artifact = os.path.join(cwd, "logs", f"{run_id}.model.ptz")

    def path(self, *p):
        return os.path.join(self.cwd, *p)

    def explain(self):
        return f"rc={self.rc}\n--- stdout tail\n{self.stdout[-3000:]}\n--- stderr tail\n{self.stderr[-3000:]}"


def launch(env, cwd, run_id, nproc=1, **over):
    os.makedirs(cwd, exist_ok=True)
    e = dict(env, RUN_ID=run_id, **over)
    return Run(run_script(e, str(cwd), nproc=nproc), str(cwd), run_id)


def one_line(line_text, prefix):
    found = [l for l in line_text.splitlines() if l.startswith(prefix)]
    assert len(found) == 1, f"want exactly one line starting with {prefix!r}, got {found}"
    return found[0]


def fields(line):
    return dict(re.findall(r"(\w+):(\S+)", line))


def train_losses(log):
    return {int(s): v for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:(\S+)", log, re.M)}


def _default_bits():
    saved = os.environ.pop("QUANT_BITS", None)
    try:
        return tg.Hyperparameters().quant_bits
    finally:
        if saved is not None:
            os.environ["QUANT_BITS"] = saved


def error_lines(stderr):
    return [l for l in stderr.splitlines() if l.strip()]


def assert_single_error(run, *needles):
    """Exit 2 and exactly one non-empty stderr line, `error: ...`, containing every needle."""
    assert run.rc == 2, run.explain()
    errs = error_lines(run.stderr)
    assert len(errs) == 1, f"want one stderr line, got {errs}"
    assert errs[0].startswith("error: "), errs
    for n in needles:
        assert n in errs[0], f"{n!r} not in {errs[0]!r}"
    return errs[0]


def same_tree(a, b, where="ck"):
    """Recursive bit-exact equality of checkpoint contents (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} vs {b.keys()}"
        for k in a:
            same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def base_env(synth):
    return dict(TINY, DATA_PATH=synth["data_path"], TOKENIZER_PATH=synth["tokenizer_path"])


@pytest.fixture(scope="module")
def e2e(base_env, tmp_path_factory):
    """One full tiny run: sliding-window and TTT evaluation on (the TINY defaults)."""
    return launch(base_env, tmp_path_factory.mktemp("e2e"), "e2e")


@pytest.fixture(scope="module")
def e2e_2proc(base_env, tmp_path_factory):
    """The same configuration on 2 gloo processes."""
    return launch(base_env, tmp_path_factory.mktemp("e2e2"), "e2e2", nproc=2)


@pytest.fixture(scope="module")
def ckrun(base_env, tmp_path_factory):
    """Uninterrupted 6-step run that checkpoints every 2 steps (keeps 2, 4, 6). It also reuses a RUN_ID whose log
    already exists, with OVERWRITE=1 (checked by test_overwrite_replaces_the_log)."""
    cwd = tmp_path_factory.mktemp("ck")
    os.makedirs(cwd / "logs")
    (cwd / "logs" / "ck.txt").write_text("OLD RUN SENTINEL\n")
    return launch(base_env, cwd, "ck", CHECKPOINT_EVERY="2", CHECKPOINT_KEEP="3", OVERWRITE="1", **QUIET)


# ----------------------------------------------------------------------------- 1. bad input

BAD_HPARAMS = [
    (dict(NUM_LAYERS="ten"), ["NUM_LAYERS", "ten"]),
    (dict(NUM_LAYERS="10", ATTN_POSITIONS="2,5,99"), ["ATTN_POSITIONS", "99", "NUM_LAYERS=10"]),
    (dict(ATTN_POSITIONS="2,x"), ["ATTN_POSITIONS"]),
    (dict(MODEL_DIM="30", NUM_HEADS="4", NUM_KV_HEADS="2"), ["MODEL_DIM=30", "NUM_HEADS=4"]),
    (dict(MODEL_DIM="48", NUM_HEADS="6", NUM_KV_HEADS="4"), ["NUM_HEADS=6", "NUM_KV_HEADS=4"]),
    (dict(TRAIN_BATCH_TOKENS="1000"), ["TRAIN_BATCH_TOKENS=1000", "TRAIN_SEQ_LEN=64"]),
    (dict(MODEL_DIM="-32"), ["MODEL_DIM"]),
    (dict(QUANT_BITS="embed:8,bigram:6,attn:6,mlp:9,trn_in:6,trn_out:6,trn_ctrl:8"), ["QUANT_BITS", "mlp:9"]),
    (dict(EMA_WINDOW_FRAC="0"), ["EMA_WINDOW_FRAC"]),
    (dict(RUN_ID="x/y"), ["RUN_ID", "x/y"]),
    (dict(RESUME_FROM="latest"), ["RESUME_FROM=latest", "RUN_ID"]),
]


@pytest.mark.parametrize("over,needles", BAD_HPARAMS, ids=[",".join(o) for o, _ in BAD_HPARAMS])
def test_bad_hyperparameters_raise_one_line_user_error(tiny_env, monkeypatch, over, needles):
    for k, v in over.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(tg.UserError) as ei:
        tg.Hyperparameters()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_transformer_ignores_hybrid_attention_positions(tiny_env, monkeypatch):
    """ATTN_POSITIONS places the hybrid's attention layers; a transformer has them everywhere, so a default
    that is out of range for a shallow transformer must not stop it."""
    monkeypatch.setenv("MODEL_TYPE", "transformer")
    monkeypatch.setenv("NUM_LAYERS", "2")
    monkeypatch.setenv("ATTN_POSITIONS", "2,5,8")
    assert tg.Hyperparameters().attn_layers == {0, 1}


def test_train_batch_not_splittable_over_world_size(tiny_env, monkeypatch):
    monkeypatch.setenv("TRAIN_BATCH_TOKENS", "192")  # 3 sequences of 64: not splittable over 2 processes
    h = tg.Hyperparameters()
    tg.TrainLoader(h, 0, 1, torch.device("cpu"))  # fine on one process
    with pytest.raises(tg.UserError, match=r"TRAIN_BATCH_TOKENS.*3 sequences.*2 processes"):
        tg.TrainLoader(h, 1, 2, torch.device("cpu"))


def test_train_loader_ranks_partition_the_global_batch(tiny_env):
    """Each rank keeps its own rows of the same global batch: the ranks' rows together are the 1-process batch."""
    h = tg.Hyperparameters()
    cpu = torch.device("cpu")
    one = tg.TrainLoader(h, 0, 1, cpu)
    two = [tg.TrainLoader(h, r, 2, cpu) for r in range(2)]
    for _ in range(3):
        full = one.next_batch()
        parts = [ld.next_batch() for ld in two]
        x1 = torch.cat([x for x, _, _ in full])
        y1 = torch.cat([y for _, y, _ in full])
        assert abs(sum(w for _, _, w in full) - 1) < 1e-12
        for p in parts:
            assert abs(sum(w for _, _, w in p) - 1) < 1e-12
        assert torch.equal(torch.cat([x for p in parts for x, _, _ in p]), x1)
        assert torch.equal(torch.cat([y for p in parts for _, y, _ in p]), y1)


@pytest.mark.parametrize("case", ["missing_data", "missing_tokenizer", "not_a_tokenizer", "vocab_mismatch", "no_checkpoint"])
def test_bad_paths_and_vocab_refused_before_anything_is_written(tiny_env, monkeypatch, tmp_path, case):
    """Bad DATA_PATH / TOKENIZER_PATH / VOCAB_SIZE: a clear UserError, and no log file left behind (a leftover
    logs/<RUN_ID>.txt would make the corrected rerun with the same RUN_ID fail with 'exists')."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUN_ID", "bad")
    if case == "missing_data":
        monkeypatch.setenv("DATA_PATH", str(tmp_path / "nope"))
        needles = ["DATA_PATH", "cached_challenge_fineweb.py"]
    elif case == "missing_tokenizer":
        monkeypatch.setenv("TOKENIZER_PATH", str(tmp_path / "nope.model"))
        needles = ["TOKENIZER_PATH", "nope.model"]
    elif case == "not_a_tokenizer":  # a file that exists but is no SentencePiece model (kept outside tmp_path)
        bad = tmp_path.parent / f"{tmp_path.name}_tok.vocab"
        bad.write_text("\u2581the\t-1\n")
        monkeypatch.setenv("TOKENIZER_PATH", str(bad))
        needles = ["TOKENIZER_PATH", "not a SentencePiece model"]
    elif case == "no_checkpoint":
        monkeypatch.setenv("RESUME_FROM", "latest")
        needles = ["RESUME_FROM=latest", "no checkpoint", os.path.join("checkpoints", "bad")]
    else:
        monkeypatch.setenv("VOCAB_SIZE", "300")
        needles = ["VOCAB_SIZE=300", str(VOCAB)]
    with pytest.raises(tg.UserError) as ei:
        tg.train_and_evaluate(tg.Hyperparameters())
    for n in needles:
        assert n in str(ei.value)
    assert "\n" not in str(ei.value)
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert written == [], f"a refused run wrote {written}"


def test_data_path_without_shards_mentions_download(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(tg.UserError, match="cached_challenge_fineweb.py"):
        tg.shard_files(str(tmp_path / "empty"), "train")


def test_subprocess_bad_int_exits_2_with_one_line(base_env, tmp_path):
    r = launch(base_env, tmp_path, "bad", NUM_LAYERS="ten")
    assert_single_error(r, "NUM_LAYERS", "'ten'")
    assert r.stdout == ""
    assert os.listdir(tmp_path) == []


def test_subprocess_vocab_mismatch_exits_2_with_one_line_and_writes_nothing(base_env, tmp_path):
    r = launch(base_env, tmp_path, "bad", VOCAB_SIZE="300")
    assert_single_error(r, "VOCAB_SIZE=300")
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert written == [], f"a refused run wrote {written}"


# ----------------------------------------------------------------------------- 2. end to end

def test_e2e_exit_and_log_lines(e2e, synth):
    assert e2e.rc == 0, e2e.explain()
    log = e2e.log
    assert log is not None
    # stdout is exactly the log (only rank 0 prints, and only log lines)
    assert e2e.stdout == log
    n_targets = len(synth["val_tokens"]) - 1
    n_bytes = sum(len(d.encode("utf-8")) for d in synth["val_docs"])  # BOS-led docs: no leading-space byte

    val = fields(one_line(log, "step:6/6 val_loss:"))
    assert int(val["val_tokens"]) == n_targets
    assert int(val["val_bytes"]) == n_bytes

    pre = fields(one_line(log, "final_prequant "))
    assert float(pre["val_loss"]) > 0

    size_line = one_line(log, "Total submission size:")
    m = re.match(r"Total submission size: (\d+) bytes \(code:(\d+) model:(\d+)\) artifact:(\S+)$", size_line)
    assert m, size_line
    total, code, model = map(int, m.group(1, 2, 3))
    assert code == os.path.getsize(SCRIPT)
    assert os.path.join(e2e.cwd, m.group(4)) == e2e.artifact
    assert model == os.path.getsize(e2e.artifact)
    assert total == code + model

    rt = fields(one_line(log, "final_int5_zstd_roundtrip val_loss:"))
    assert int(rt["val_tokens"]) == n_targets and int(rt["val_bytes"]) == n_bytes
    exact = one_line(log, "final_int5_zstd_roundtrip_exact ")
    em = re.fullmatch(r"final_int5_zstd_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", exact)
    assert em, exact
    ex_loss, ex_bpb = float(em.group(1)), float(em.group(2))
    assert abs(ex_loss - float(rt["val_loss"])) <= 5e-5
    assert abs(ex_bpb - float(rt["val_bpb"])) <= 5e-5
    # bpb = loss / ln 2 * tokens / bytes
    assert abs(ex_bpb - ex_loss / np.log(2) * n_targets / n_bytes) < 1e-6

    gap = fields(one_line(log, "quant_gap "))
    assert abs(float(gap["gap"]) - (float(gap["roundtrip_val_bpb"]) - float(gap["prequant_val_bpb"]))) <= 1.5e-4
    assert gap["prequant_val_bpb"] == pre["val_bpb"] and gap["roundtrip_val_bpb"] == rt["val_bpb"]

    sw = fields(one_line(log, "final_sliding_window "))
    assert int(sw["val_tokens"]) == n_targets and sw["stride"] == TINY["EVAL_STRIDE"]
    ttt = fields(one_line(log, "final_ttt "))
    assert int(ttt["val_tokens"]) == n_targets

    qb = fields(one_line(log, "quant_bits "))  # the tiny model is far under budget: QUANT_BITS' default, unpruned
    assert qb == {g: str(b) for g, b in _default_bits().items()} | {"prune": "0"}

    meta = json.load(open(e2e.path("logs", "e2e.submission.json")))
    assert meta["bytes_total"] == total and meta["bytes_code"] == code and meta["within_budget"] is True
    assert meta["val_bpb_mode"] == "roundtrip_ttt" and abs(meta["val_bpb"] - float(ttt["val_bpb"])) <= 5e-5
    assert abs(meta["roundtrip_flat_val_bpb"] - ex_bpb) <= 5e-9
    assert meta["steps"] == 6 and meta["run_id"] == "e2e"


def test_e2e_artifact_rescores_to_the_logged_loss(e2e, synth, tiny_env):
    """The artifact on disk, reloaded here from its bytes, scores the logged roundtrip loss: the number in the log is
    the artifact's, not the in-memory model's."""
    assert e2e.rc == 0, e2e.explain()
    exact = fields(one_line(e2e.log, "final_int5_zstd_roundtrip_exact "))
    h = tg.Hyperparameters()
    arch, bits, state = tg.unpack(open(e2e.artifact, "rb").read())
    assert arch == h.arch() and bits == h.quant_bits
    model = tg.GPT(h)
    model.load_state_dict(state, strict=True)
    model.eval()
    sp = spm.SentencePieceProcessor(model_file=synth["tokenizer_path"])
    val = torch.tensor(synth["val_tokens"], dtype=torch.int32)
    tbytes = tg.target_bytes(val, tg.byte_luts(sp, VOCAB))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nll, cnt = tg.score_windows(model, val, h.train_seq_len, h.train_seq_len, 32)
    finally:
        torch.set_num_threads(n)
    loss, bpb, _, _ = tg.finish(nll, cnt, tbytes)
    assert abs(loss - float(exact["val_loss"])) < 2e-6
    assert abs(bpb - float(exact["val_bpb"])) < 2e-6


# ----------------------------------------------------------------------------- 3. 1 vs 2 processes

# Tolerance: both runs train on the same global batches; with 2 ranks each rank's loss covers half the rows and
# DDP averages the two halves' gradients (a different float summation order than one process accumulating all
# micro-batches), and evaluation sums the same per-target nll in a different order. That moves results by float
# rounding (~1e-7 relative per step), far below 1e-4; any real difference (wrong rows, double counting, a rank's
# data dropped) moves the loss by >1e-2 in this tiny run.
TOL = 1e-4


def test_two_processes_match_one_process_val_loss(e2e, e2e_2proc):
    assert e2e.rc == 0, e2e.explain()
    assert e2e_2proc.rc == 0, e2e_2proc.explain()
    a, b = e2e.log, e2e_2proc.log
    assert "world_size:2" in b
    for prefix in ("final_int5_zstd_roundtrip_exact ",):
        la, lb = fields(one_line(a, prefix)), fields(one_line(b, prefix))
        assert abs(float(la["val_loss"]) - float(lb["val_loss"])) <= TOL, (la, lb)
        assert abs(float(la["val_bpb"]) - float(lb["val_bpb"])) <= TOL, (la, lb)
    # 4-decimal lines: allow the rounding of the printed value on top
    for prefix in ("step:6/6 val_loss:", "final_prequant ", "final_sliding_window "):
        la, lb = fields(one_line(a, prefix)), fields(one_line(b, prefix))
        assert abs(float(la["val_loss"]) - float(lb["val_loss"])) <= TOL + 1e-4, (prefix, la, lb)
        assert la.get("val_tokens") == lb.get("val_tokens")
    ma = json.load(open(e2e.path("logs", "e2e.submission.json")))
    mb = json.load(open(e2e_2proc.path("logs", "e2e2.submission.json")))
    for k in ("roundtrip_flat_val_bpb", "roundtrip_sliding_val_bpb", "prequant_val_bpb"):
        assert abs(ma[k] - mb[k]) <= TOL, (k, ma[k], mb[k])
    assert mb["world_size"] == 2


def test_two_processes_match_one_process_ttt_loss(e2e, e2e_2proc):
    """The headline score (final_ttt) must not depend on the world size either: each document's adapters see only
    that document, so splitting documents over ranks changes nothing but float rounding."""
    assert e2e.rc == 0 and e2e_2proc.rc == 0
    la, lb = fields(one_line(e2e.log, "final_ttt ")), fields(one_line(e2e_2proc.log, "final_ttt "))
    assert la["val_tokens"] == lb["val_tokens"]
    ma = json.load(open(e2e.path("logs", "e2e.submission.json")))
    mb = json.load(open(e2e_2proc.path("logs", "e2e2.submission.json")))
    assert abs(ma["roundtrip_ttt_val_bpb"] - mb["roundtrip_ttt_val_bpb"]) <= TOL, (la, lb)


def test_ttt_scores_do_not_depend_on_world_size(e2e, synth, tiny_env):
    """In-process, on the e2e artifact: score-first TTT over 1 rank vs the same documents split over 2 ranks, from the
    same RNG state. Each document's adapters are its own, so every target's nll must agree up to float rounding."""
    assert e2e.rc == 0, e2e.explain()
    h = tg.Hyperparameters()
    model = tg.GPT(h)
    model.load_state_dict(tg.unpack(open(e2e.artifact, "rb").read())[2])
    val = torch.tensor(synth["val_tokens"][:3001], dtype=torch.int32)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for ws in (1, 2):
            nll = torch.zeros(val.numel() - 1, dtype=torch.float64)
            for r in range(ws):
                torch.manual_seed(h.seed)  # every rank starts from the same RNG state, as in a real run
                nll += tg.score_ttt(model, val, h, r, ws)[0]
            runs[ws] = nll
    finally:
        torch.set_num_threads(n)
    diff = (runs[1] - runs[2]).abs()
    assert float(diff.max()) <= 1e-4, (f"per-target TTT nll differs between world sizes 1 and 2: max {float(diff.max()):.2e}, "
                                       f"mean loss {float(runs[1].mean()):.6f} vs {float(runs[2].mean()):.6f}")


def test_two_processes_log_the_global_batch_train_loss(e2e, e2e_2proc):
    """train_loss is the loss of the global batch, whatever the world size (not rank 0's half of it)."""
    assert e2e.rc == 0 and e2e_2proc.rc == 0
    la, lb = train_losses(e2e.log), train_losses(e2e_2proc.log)
    assert la.keys() == lb.keys() == set(range(1, 7))
    bad = {s: (la[s], lb[s]) for s in la if abs(float(la[s]) - float(lb[s])) > TOL + 1e-4}
    assert not bad, f"train_loss differs between 1 and 2 processes (step: (1proc, 2proc)): {bad}"


# ----------------------------------------------------------------------------- 4. checkpoint / resume

def test_checkpointing_does_not_change_training(e2e, ckrun):
    assert ckrun.rc == 0, ckrun.explain()
    assert train_losses(ckrun.log) == train_losses(e2e.log)
    for prefix in ("step:6/6 val_loss:", "final_int5_zstd_roundtrip_exact "):
        assert fields(one_line(ckrun.log, prefix))["val_loss"] == fields(one_line(e2e.log, prefix))["val_loss"]
    kept = sorted(os.listdir(ckrun.path("checkpoints", "ck")))
    assert kept == ["step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]
    for s in (2, 4, 6):
        assert f"checkpoint:checkpoints/ck/step_{s:07d}.pt step:{s}" in ckrun.log


@pytest.mark.parametrize("k", [2, 4])
def test_resume_is_bit_identical(ckrun, base_env, k):
    """Resume from the step-k checkpoint (k=2: before QAT and EMA; k=4: QAT on since step 3 and EMA started at
    step 4) under a new RUN_ID: the rest of training, the step-6 state and the artifact are bit-identical."""
    assert ckrun.rc == 0, ckrun.explain()
    src = ckrun.path("checkpoints", "ck", f"step_{k:07d}.pt")
    ck = torch.load(src, map_location="cpu", weights_only=True)
    assert ck["step"] == k
    if k == 4:
        assert ck["ema"] is not None and ck["ema_step"] == 4, "the case needs EMA started before the checkpoint"
        assert ckrun.log.index("qat:on step:2") < ckrun.log.index("checkpoint:checkpoints/ck/step_0000004.pt")
    else:
        assert ck["ema"] is None and "qat:on step:2" in ckrun.log

    rid = f"res{k}"
    r = launch(base_env, ckrun.cwd, rid, RESUME_FROM=src, CHECKPOINT_EVERY="2", CHECKPOINT_KEEP="3", **QUIET)
    assert r.rc == 0, r.explain()
    assert f"resumed_from:{src} step:{k}" in r.log
    if k == 4:
        # QAT (its switch and its scales) is training state: restored, not switched on again
        assert "qat:on" not in r.log and not re.search(r"^ema_start", r.log, re.M)
    want = {s: v for s, v in train_losses(ckrun.log).items() if s > k}
    assert train_losses(r.log) == want
    for prefix in ("step:6/6 val_loss:", "final_prequant ", "final_int5_zstd_roundtrip_exact "):
        assert fields(one_line(r.log, prefix))["val_loss"] == fields(one_line(ckrun.log, prefix))["val_loss"], prefix
    a = torch.load(ckrun.path("checkpoints", "ck", "step_0000006.pt"), map_location="cpu", weights_only=True)
    b = torch.load(r.path("checkpoints", rid, "step_0000006.pt"), map_location="cpu", weights_only=True)
    for key in ("train_ms", "digest"):  # wall-clock time (and anything derived from it) legitimately differs
        a.pop(key, None), b.pop(key, None)
    same_tree(a, b)
    assert open(r.artifact, "rb").read() == open(ckrun.artifact, "rb").read()


def test_resuming_an_older_checkpoint_deletes_the_newer_ones(ckrun, base_env, tmp_path):
    """Resuming step 2 abandons the timeline of steps 4 and 6: their checkpoints are deleted, so a later
    RESUME_FROM=latest cannot pick them up (this resume writes none: CHECKPOINT_EVERY=0)."""
    assert ckrun.rc == 0, ckrun.explain()
    ckdir = tmp_path / "checkpoints" / "older"
    shutil.copytree(ckrun.path("checkpoints", "ck"), ckdir)
    assert sorted(os.listdir(ckdir)) == [f"step_{k:07d}.pt" for k in (2, 4, 6)]
    r = launch(base_env, tmp_path, "older", RESUME_FROM=str(ckdir / "step_0000002.pt"), CHECKPOINT_EVERY="0", **QUIET)
    assert r.rc == 0, r.explain()
    assert sorted(os.listdir(ckdir)) == ["step_0000002.pt"]


class FakeClock:
    """`time` for train_gpt.py whose perf_counter advances only in train_step, by `step_s` per step: the training
    clock then reads exactly steps x step_s (1/128 s: exact in binary), so tests of the wallclock cap and of
    resumed clocks are exact."""

    def __init__(self, monkeypatch, step_s=1 / 128):
        self.now = 0.0
        real = tg.Trainer.train_step

        def train_step(trainer, clock):
            out = real(trainer, clock)
            self.now += step_s
            return out

        monkeypatch.setattr(tg.Trainer, "train_step", train_step)
        monkeypatch.setattr(tg, "time", self)

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):  # time.time, time.sleep, ...: the real ones
        return getattr(time, name)


def test_resume_continues_the_training_clock_and_the_learning_rate_multiplier(tiny_env, monkeypatch, tmp_path):
    """A checkpoint's train_ms and lr_mult (halved by a rollback) carry on: the step-4 checkpoint edited to 1000 ms
    and x0.5 resumes to a step-6 checkpoint at 1015.625 ms (two 7.8125 ms steps) and x0.5, and the step-6 loss
    (after a step at half the learning rate) differs from the unedited run's."""
    FakeClock(monkeypatch)
    monkeypatch.chdir(tmp_path)

    def run(rid, **over):
        for k, v in dict(RUN_ID=rid, CHECKPOINT_EVERY="2", WARMUP_STEPS="0", **QUIET, **over).items():
            monkeypatch.setenv(k, v)
        assert tg.train_and_evaluate(tg.Hyperparameters()) == 0
        ck = tg.load_checkpoint(tg.Hyperparameters(), f"checkpoints/{rid}/step_0000006.pt")[1]
        return train_losses(open(f"logs/{rid}.txt").read()), ck

    losses, ck6 = run("base")
    assert (ck6["train_ms"], ck6["lr_mult"]) == (46.875, 1.0)
    h = tg.Hyperparameters()
    ck = tg.load_checkpoint(h, "checkpoints/base/step_0000004.pt")[1]
    assert ck["train_ms"] == 31.25
    ck.update(train_ms=1000.0, lr_mult=0.5)
    h.checkpoint_dir = str(tmp_path / "edited")
    os.makedirs(h.checkpoint_dir)
    edited = tg.save_checkpoint(h, ck)
    resumed, ck6 = run("resumed", RESUME_FROM=edited)
    assert f"resumed_from:{edited} step:4 train_time:1000ms" in open("logs/resumed.txt").read()
    assert (ck6["train_ms"], ck6["lr_mult"]) == (1015.625, 0.5)
    assert resumed[5] == losses[5] and resumed[6] != losses[6]


# ----------------------------------------------------------------------------- 5. SIGTERM

def _children(pid):
    try:
        return [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except FileNotFoundError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_two_processes_checkpoints_and_resumes(base_env, tiny_env, tmp_path):
    rid = "sig"
    env = dict(base_env, RUN_ID=rid, ITERATIONS="5000", **QUIET)
    full = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    full.update(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT],
                         cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    log_path = tmp_path / "logs" / f"{rid}.txt"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None:
            if log_path.exists() and "step:3/" in log_path.read_text():
                break
            time.sleep(0.1)
        assert p.poll() is None, "the run ended before it could be signalled:\n" + p.stderr.read()[-3000:]
        workers = _children(p.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)  # one worker only: the ranks must agree to stop at the same step
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode != 0
    assert not any(_alive(w) for w in workers), "a worker outlived torchrun"
    # both ranks stop themselves (exit 128 + SIGTERM); torchrun SIGTERMs the slower one once the first has exited,
    # which can land during its interpreter shutdown (default handlers again): -15 there is torchrun's doing
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", err))
    assert codes.keys() == {"0", "1"} and set(codes.values()) <= {"143", "-15"} and "143" in codes.values(), err[-3000:]
    log = log_path.read_text()
    m = re.search(r"^stopped_by_signal step:(\d+)$", log, re.M)
    assert m, log[-2000:]
    n = int(m.group(1))
    assert n >= 3
    rel = f"checkpoints/{rid}/step_{n:07d}.pt"
    assert f"checkpoint:{rel} step:{n}" in log
    assert max(train_losses(log)) == n
    ck = torch.load(tmp_path / rel, map_location="cpu", weights_only=True)
    assert ck["step"] == n and ck["config"] == tg.run_config(tg.Hyperparameters())
    assert all(torch.isfinite(t).all() for t in ck["model"].values())
    # resumable: the latest checkpoint, same RUN_ID (its log is appended to), on one process, 2 more steps
    r = launch(base_env, tmp_path, rid, RESUME_FROM="latest", ITERATIONS=str(n + 2), **QUIET)
    assert r.rc == 0, r.explain()
    assert f"resumed_from:{rel} step:{n}" in r.log
    assert "stopped_by_signal" in r.log  # appended, not truncated
    assert set(train_losses(r.log)) == set(range(1, n + 3))
    one_line(r.log, "final_int5_zstd_roundtrip_exact ")


def test_sigterm_during_the_final_validation_checkpoints_and_resumes(tiny_env, monkeypatch, tmp_path):
    """A signal that arrives during the final validation (after the last step's flags were read) was lost: the
    run went on to export. Now it checkpoints, logs stopped_by_signal and exits 143, with the caller's handlers
    back; the resumed run validates again and finishes."""
    real = tg.Trainer.validate

    def validate(self):
        if self.step == self.h.iterations:
            os.kill(os.getpid(), signal.SIGTERM)
        real(self)

    monkeypatch.chdir(tmp_path)
    for k, v in dict(RUN_ID="fin", **QUIET).items():
        monkeypatch.setenv(k, v)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    monkeypatch.setattr(tg.Trainer, "validate", validate)
    assert tg.train_and_evaluate(tg.Hyperparameters()) == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    n, log = int(TINY["ITERATIONS"]), (tmp_path / "logs" / "fin.txt").read_text()
    rel = os.path.join("checkpoints", "fin", f"step_{n:07d}.pt")
    assert f"step:{n}/{n} val_loss:" in log and f"checkpoint:{rel} step:{n}" in log, log[-2000:]
    assert log.rstrip().endswith(f"stopped_by_signal step:{n}") and "final_" not in log
    monkeypatch.setattr(tg.Trainer, "validate", real)
    monkeypatch.setenv("RESUME_FROM", "latest")
    assert tg.train_and_evaluate(tg.Hyperparameters()) == 0
    log = (tmp_path / "logs" / "fin.txt").read_text()
    assert f"resumed_from:{rel} step:{n}" in log and log.count(f"step:{n}/{n} val_loss:") == 2
    one_line(log, "final_int5_zstd_roundtrip_exact ")


# ----------------------------------------------------------------------------- 6. refused checkpoints

def test_truncated_checkpoint_refused_subprocess(ckrun, base_env, tmp_path):
    assert ckrun.rc == 0, ckrun.explain()
    data = open(ckrun.path("checkpoints", "ck", "step_0000004.pt"), "rb").read()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    r = launch(base_env, tmp_path, "trunc", RESUME_FROM=str(bad), **QUIET)
    assert_single_error(r, str(bad))
    assert not os.path.exists(r.artifact)


@pytest.fixture
def ck4(ckrun):
    assert ckrun.rc == 0, ckrun.explain()
    return ckrun.path("checkpoints", "ck", "step_0000004.pt")


def test_corrupted_checkpoints_refused(ck4, tiny_env, tmp_path):
    h = tg.Hyperparameters()
    data = open(ck4, "rb").read()
    path, ck = tg.load_checkpoint(h, ck4)  # the intact file loads
    assert path == ck4 and ck["step"] == 4

    cases = {"truncated_tail": data[:-64], "garbage_head": bytes(256) + data[256:], "empty": b""}
    for name, blob in cases.items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(blob)
        with pytest.raises(tg.UserError, match=re.escape(str(p))):
            tg.load_checkpoint(h, str(p))
    p = tmp_path / "plain.pt"  # a torch file without the sha256 trailer
    torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(tg.UserError, match=re.escape(str(p))):
        tg.load_checkpoint(h, str(p))
    p = tmp_path / "other.pt"  # intact, but not ours
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buf)
    p.write_bytes(buf.getvalue() + hashlib.sha256(buf.getvalue()).digest())
    with pytest.raises(tg.UserError, match="not a train_gpt.py checkpoint"):
        tg.load_checkpoint(h, str(p))
    with pytest.raises(tg.UserError, match="no checkpoint"):
        h.checkpoint_dir = str(tmp_path / "empty_dir")
        tg.load_checkpoint(h, "latest")


def test_bit_flipped_checkpoint_refused(ck4, tiny_env, tmp_path):
    """A checkpoint whose model weights were silently corrupted (one flipped bit in tok_emb's bytes; the zip
    structure stays valid) must not be resumed from."""
    h = tg.Hyperparameters()
    data = bytearray(open(ck4, "rb").read())
    ck = torch.load(ck4, map_location="cpu", weights_only=True)
    raw = ck["model"]["tok_emb.weight"].numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0
    data[at + len(raw) // 2] ^= 0x40
    p = tmp_path / "flipped.pt"
    p.write_bytes(bytes(data))
    try:
        _, loaded = tg.load_checkpoint(h, str(p))
    except tg.UserError as e:
        assert str(p) in str(e)
        return
    differs = not torch.equal(loaded["model"]["tok_emb.weight"], ck["model"]["tok_emb.weight"])
    pytest.fail(f"corrupted checkpoint accepted (weights silently different: {differs})")


@pytest.mark.parametrize("over,needle", [(dict(MODEL_DIM="64"), "model_dim"), (dict(NUM_LAYERS="5"), "num_layers"),
                                         (dict(TRAIN_SEQ_LEN="32"), "train_seq_len")])
def test_checkpoint_from_other_config_refused(ck4, tiny_env, monkeypatch, over, needle):
    for k, v in over.items():
        monkeypatch.setenv(k, v)
    h = tg.Hyperparameters()
    with pytest.raises(tg.UserError) as ei:
        tg.load_checkpoint(h, ck4)
    msg = str(ei.value)
    assert ck4 in msg and needle in msg and "\n" not in msg
    # only the differing settings are named
    assert msg.count("(now") == 1


# ----------------------------------------------------------------------------- 7. overwrite guard

def test_same_run_id_refused_and_first_log_untouched(e2e, base_env):
    assert e2e.rc == 0, e2e.explain()
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in (e2e.log_path, e2e.artifact)}
    r = launch(base_env, e2e.cwd, "e2e", **QUIET)
    assert_single_error(r, "logs/e2e.txt", "OVERWRITE")
    assert r.stdout == ""
    for p, (mtime, data) in before.items():
        assert os.stat(p).st_mtime_ns == mtime and open(p, "rb").read() == data, p


def test_overwrite_replaces_the_log(ckrun):
    assert ckrun.rc == 0, ckrun.explain()
    assert "OLD RUN SENTINEL" not in ckrun.log
    assert ckrun.log.startswith("run_id:ck ")
    assert len(re.findall(r"^run_id:", ckrun.log, re.M)) == 1


# ----------------------------------------------------------------------------- 8. divergence

# Muon steps of size 1e8: activations overflow within 2-3 steps. QAT off: its grid (fp16 scales) would clamp the
# exploded weights and keep the forward finite until the export's checks
DIVERGE = dict(MATRIX_LR="1e8", QAT_START_FRAC="1", **QUIET)


def test_divergence_stops_with_step_and_no_checkpoint(base_env, tmp_path):
    r = launch(base_env, tmp_path, "div", **DIVERGE)
    line = assert_single_error(r, "non-finite", "last good checkpoint: none")
    step = int(re.search(r"at step (\d+)", line).group(1))
    assert max(train_losses(r.log)) == step - 1  # the bad step is not logged as a loss
    assert not os.path.exists(r.artifact)


def test_divergence_rolls_back_then_fails(base_env, tmp_path):
    r = launch(base_env, tmp_path, "div2", CHECKPOINT_EVERY="1", DIVERGENCE_RETRIES="1", **DIVERGE)
    m = re.search(r"^divergence at step:(\d+): rolled back to (\S+) \(step (\d+)\) with learning rates x0\.5$",
                  r.log or "", re.M)
    assert m, r.explain()
    bad, ckpt, back = int(m.group(1)), m.group(2), int(m.group(3))
    assert back == bad - 1 and ckpt == f"checkpoints/div2/step_{back:07d}.pt"
    # lr x0.5 of 1e8 still diverges: the second time there is no retry left
    assert_single_error(r, "non-finite", f"at step {bad};", f"last good checkpoint: {ckpt}")
    assert torch.load(os.path.join(tmp_path, ckpt), map_location="cpu", weights_only=True)["step"] == back
    assert not os.path.exists(r.artifact)


def test_divergence_rollback_two_processes(base_env, tmp_path):
    """With 2 processes every rank must take the same decision: roll back together, then stop together with the
    same message naming the checkpoint (no rank dying of a broken collective)."""
    r = launch(base_env, tmp_path, "div3", nproc=2, CHECKPOINT_EVERY="1", DIVERGENCE_RETRIES="1", **DIVERGE)
    assert r.rc != 0
    assert re.search(r"^divergence at step:\d+: rolled back to ", r.log or "", re.M), r.explain()
    errs = [l for l in r.stderr.splitlines() if "non-finite loss" in l]
    assert errs, r.explain()
    assert all("checkpoints/div3/step_" in l for l in errs), errs
    assert "Connection closed by peer" not in r.stderr and "[rank0]:" not in r.stderr, r.stderr[-3000:]


def test_stale_checkpoint_dir_refused_before_anything_is_written(tiny_env, monkeypatch, tmp_path):
    """A fresh run pointed at a folder holding another run's checkpoints would prune its own new checkpoints
    against them and resume from them later: refused unless RESUME_FROM or OVERWRITE=1."""
    monkeypatch.chdir(tmp_path)
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    (ckdir / "step_0000100.pt").write_bytes(b"old run")
    monkeypatch.setenv("RUN_ID", "fresh")
    monkeypatch.setenv("CHECKPOINT_DIR", str(ckdir))
    with pytest.raises(tg.UserError, match="holds another run's checkpoints"):
        tg.train_and_evaluate(tg.Hyperparameters())
    assert sorted(os.listdir(tmp_path)) == ["ck"] and os.listdir(ckdir) == ["step_0000100.pt"]


def test_warmup_steps_do_not_train(tiny_env, monkeypatch, tmp_path):
    """Warmup steps compile and warm the kernels, then put weights, optimizer state, data position and RNG back:
    a run with 3 of them trains and scores exactly as one with none."""
    def run(rid, warmup):
        for k, v in dict(RUN_ID=rid, WARMUP_STEPS=warmup, **QUIET).items():
            monkeypatch.setenv(k, v)
        assert tg.train_and_evaluate(tg.Hyperparameters()) == 0
        log = open(tmp_path / "logs" / f"{rid}.txt").read()
        return train_losses(log), one_line(log, "final_int5_zstd_roundtrip_exact ")

    monkeypatch.chdir(tmp_path)
    warm, cold = run("warm", "3"), run("cold", "0")
    assert warm == cold and len(warm[0]) == int(TINY["ITERATIONS"])


def test_the_wallclock_cap_ends_the_last_step_within_it(tiny_env, monkeypatch, tmp_path):
    """With 7.8125 ms steps and a 160 ms cap the run stops after step 20 (156 ms: step 21 would end at 164), then
    validates and exports. The flags are read a step late: the old rule, without the projected lead, ran to step
    22 (172 ms)."""
    FakeClock(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for k, v in dict(RUN_ID="cap", MAX_WALLCLOCK_SECONDS="0.16", ITERATIONS="40", TRAIN_LOG_EVERY="1000",
                     WARMUP_STEPS="0", **QUIET).items():
        monkeypatch.setenv(k, v)
    assert tg.train_and_evaluate(tg.Hyperparameters()) == 0
    log = open("logs/cap.txt").read()
    assert fields(one_line(log, "step:20/40 val_loss:"))["train_time"] == "156ms"
    assert "step:21/" not in log and "final_int5_zstd_roundtrip_exact " in log


def test_training_steps_never_wait_for_the_device(tiny_env, monkeypatch, tmp_path):
    """Steps 3 to 8 (optimizer state made; QAT on from step 3, EMA from step 5) and their EMA updates read no
    device value on the host: loss, gradient norm and clipping stay on the device. Allowed: Adam's step counters
    (on the CPU without fused Adam; fused Adam on a GPU keeps them on the device and does not read them)."""
    monkeypatch.chdir(tmp_path)
    for k, v in dict(RUN_ID="nosync", ITERATIONS="8", GRAD_CLIP_NORM="1.0", **QUIET).items():
        monkeypatch.setenv(k, v)
    found, real = [], {name: getattr(tg.Trainer, name) for name in ("train_step", "update_ema")}

    def watched(name):
        def call(self, *args):
            if self.step < 2:
                return real[name](self, *args)
            counters = {id(s["step"]) for o in self.opts for s in o.state.values() if torch.is_tensor(s.get("step"))}
            with HostReads(lambda t: id(t) in counters) as reads:
                out = real[name](self, *args)
            found.extend(reads.found)
            return out
        return call

    for name in real:
        monkeypatch.setattr(tg.Trainer, name, watched(name))
    assert tg.train_and_evaluate(tg.Hyperparameters()) == 0
    log = open("logs/nosync.txt").read()
    assert "qat:on step:3" in log and "ema_start step:5" in log
    assert found == []


def test_qat_refreshes_the_clip_fractions_every_qat_refresh_every_steps(tiny_env, monkeypatch, tmp_path):
    """QAT on from step 1 (its clip fractions set then), QAT_REFRESH_EVERY=2, a checkpoint after every step: the
    fractions after step n are the exporter's rule applied to the weights after the last even step before n (the
    refresh runs before a step); they change during the run, so the check is not vacuous."""
    monkeypatch.chdir(tmp_path)
    for k, v in dict(RUN_ID="refresh", ITERATIONS="8", QAT_START_FRAC="0.1", QAT_REFRESH_EVERY="2",
                     CHECKPOINT_EVERY="1", CHECKPOINT_KEEP="8", WARMUP_STEPS="0", **QUIET).items():
        monkeypatch.setenv(k, v)
    h = tg.Hyperparameters()
    assert tg.train_and_evaluate(h) == 0
    assert "qat:on step:1" in open("logs/refresh.txt").read()
    cks = {n: tg.load_checkpoint(h, f"checkpoints/refresh/step_{n:07d}.pt")[1] for n in range(1, 9)}
    model = tg.GPT(h)
    fq = [m for m in model.modules() if isinstance(m, tg.FakeQuant)]

    def rule(n):  # the exporter's clip fractions for the weights after step n
        model.load_state_dict(cks[n]["model"])
        tg.refresh_qclips(model)
        return [m.qclip.clone() for m in fq]

    for n in range(2, 9):
        want = rule(1 if n == 2 else 2 * ((n - 1) // 2))
        assert all(torch.equal(a, b) for a, b in zip(cks[n]["qclips"], want)), f"step {n}"
    assert not all(torch.equal(a, b) for a, b in zip(rule(2), rule(6)))


OOM_IN_BACKWARD = """import sys
sys.path.insert(0, {root!r})
import torch, train_gpt as tg
real, init = tg.Block.forward, tg.GPT.__init__


class Boom(torch.autograd.Function):  # raises in the backward of the first block, after the later blocks' gradients
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise torch.cuda.OutOfMemoryError("simulated")


def forward(self, x, x0, ctx):
    y = real(self, x, x0, ctx)
    return Boom.apply(y) if torch.is_grad_enabled() and x.size(0) > 2 and self is FIRST[-1] else y


FIRST = []
tg.Block.forward = forward
tg.GPT.__init__ = lambda self, h: (init(self, h), FIRST.append(self.blocks[0]))[0]
tg.main()
"""


def test_cuda_oom_in_the_backward_under_ddp_halves_the_micro_batch(base_env, e2e_2proc, tmp_path):
    """2 gloo processes, a simulated CUDA out-of-memory error in the backward (first block, micro-batches over 2):
    DDP's reducer then waits for a reduction that never finished, and reusing it failed ("Expected to have finished
    reduction in the prior iteration"). The warmup rebuilds DDP: the run halves 8 -> 4 -> 2 on both ranks and trains
    as the 2-process run without the error (float rounding apart: 4 micro-batches instead of 1)."""
    script = tmp_path / "oom_in_backward.py"
    script.write_text(OOM_IN_BACKWARD.format(root=os.path.dirname(SCRIPT)))
    os.makedirs(tmp_path / "run")
    r = Run(run_script(dict(base_env, RUN_ID="oom2", **QUIET), str(tmp_path / "run"), nproc=2, script=str(script)),
            str(tmp_path / "run"), "oom2")
    assert r.rc == 0, r.explain()
    assert re.findall(r"^micro_batch_seqs:(\d+) ", r.log, re.M) == ["4", "2"]
    assert e2e_2proc.rc == 0, e2e_2proc.explain()
    la, lb = train_losses(r.log), train_losses(e2e_2proc.log)
    assert la.keys() == lb.keys() and all(abs(float(la[s]) - float(lb[s])) <= TOL + 1e-4 for s in la), (la, lb)
    va, vb = (float(fields(one_line(x.log, "final_int5_zstd_roundtrip_exact "))["val_loss"]) for x in (r, e2e_2proc))
    assert abs(va - vb) <= TOL, (va, vb)


def test_cuda_oom_in_warmup_halves_the_micro_batch(tiny_env, monkeypatch, tmp_path):
    """A simulated CUDA out-of-memory error for micro-batches over 2 sequences: the warmup halves MICRO_BATCH_SEQS
    (8 -> 4 -> 2), logs it, rolls back, and the run trains exactly as a run configured with 2 from the start."""
    real = tg.GPT.forward

    def forward(self, x, y, reduction="mean"):
        if torch.is_grad_enabled() and x.size(0) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x, y, reduction)

    def run(rid, **env):
        for k, v in dict(RUN_ID=rid, TTT_ENABLED="0", EVAL_STRIDE="0", WARMUP_STEPS="2", **env).items():
            monkeypatch.setenv(k, v)
        assert tg.train_and_evaluate(tg.Hyperparameters()) == 0
        return open(tmp_path / "logs" / f"{rid}.txt").read()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tg.GPT, "forward", forward)
    log = run("oom")
    assert re.findall(r"^micro_batch_seqs:(\d+) ", log, re.M) == ["4", "2"]
    monkeypatch.setattr(tg.GPT, "forward", real)
    ref = run("ref", MICRO_BATCH_SEQS="2")
    assert train_losses(log) == train_losses(ref) and len(train_losses(ref)) == int(TINY["ITERATIONS"])
    def no_memory(self, x, y, reduction="mean"):
        if torch.is_grad_enabled():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x, y, reduction)

    monkeypatch.setattr(tg.GPT, "forward", no_memory)
    with pytest.raises(tg.UserError, match="one sequence of TRAIN_SEQ_LEN=64 does not fit in GPU memory"):
        run("none")


def test_eval_max_seconds_bounds_the_whole_evaluation(base_env, tmp_path):
    """A bound too short for sliding + TTT: the flat roundtrip still runs, the sliding pass is skipped (it would
    leave TTT no time to score plainly), TTT stops adapting at once and scores the rest frozen or plain, and
    every target is still scored exactly once."""
    bound = 1.0
    r = launch(base_env, tmp_path, "bound", EVAL_MAX_SECONDS=str(bound), TTT_BATCH_DOCS="2")
    assert r.rc == 0, r.explain()
    assert re.search(r"^final_sliding_window skipped: it needs about \S+s \(\+\S+s kept for TTT\)", r.log, re.M)
    assert "ttt_time_guard: EVAL_MAX_SECONDS would be exceeded" in r.log
    ttt = fields(one_line(r.log, "final_ttt "))
    n = int(fields(one_line(r.log, "final_int5_zstd_roundtrip "))["val_tokens"])
    assert int(ttt["val_tokens"]) == n  # checked exactly once by finish()
    frozen, plain = int(ttt["ttt_frozen_tokens"]), int(ttt["ttt_plain_tokens"])
    assert frozen > 0 and plain > 0 and frozen + plain < n
    meta = json.load(open(r.path("logs", "bound.submission.json")))
    assert meta["val_bpb_mode"] == "roundtrip_ttt" and "roundtrip_sliding_val_bpb" not in meta
    assert (meta["ttt_frozen_tokens"], meta["ttt_plain_tokens"]) == (frozen, plain)
    # (here the bound is below what even plain scoring needs; test_ttt_guard_ends_within_the_deadline checks
    # on a model clock that a feasible bound is kept)
