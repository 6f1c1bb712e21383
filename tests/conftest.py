"""Shared fixtures: a small synthetic challenge-format dataset with its own SentencePiece tokenizer,
a tiny model configuration, and a helper that runs train_gpt.py as a subprocess."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "train_gpt.py")
VOCAB = 320  # 256 byte pieces + 4 specials + 60 merged pieces

WORDS = ("the of and to in is was for on that with as by at from it an be this are or which not have had one "
         "river court law train model cafe naïve über 東京 données über straße").split()


def write_shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def make_docs(rng, n_docs):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) for _ in range(n_docs)]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny matmuls on a busy 2-core machine run far faster on one intra-op thread; restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """dict(root, data_path, tokenizer_path, val_text, n_val_tokens): train/val shards of BOS-led documents."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("synth")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(make_docs(rng, 400)), encoding="utf-8")
    prefix = str(root / "tok")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, model_type="bpe", vocab_size=VOCAB, byte_fallback=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.9995, split_digits=True,
        normalization_rule_name="identity", minloglevel=2, hard_vocab_limit=True)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    data = root / "datasets" / "synth"
    data.mkdir(parents=True)

    def encode(docs):
        out = []
        for d in docs:
            out += [1] + sp.encode(d)
        return out

    train = encode(make_docs(rng, 1500))
    val_docs = make_docs(rng, 60)
    val = encode(val_docs)
    write_shard(data / "fineweb_train_000000.bin", train[: len(train) // 2])
    write_shard(data / "fineweb_train_000001.bin", train[len(train) // 2:])
    write_shard(data / "fineweb_val_000000.bin", val)
    return {"root": root, "data_path": str(data), "tokenizer_path": prefix + ".model", "val_docs": val_docs,
            "val_tokens": val, "train_tokens": train}


TINY = dict(VOCAB_SIZE=str(VOCAB), NUM_LAYERS="4", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
            ATTN_POSITIONS="1", NUM_OSCILLATORS="16", BIGRAM_VOCAB_SIZE="256", BIGRAM_DIM="16", TRAIN_SEQ_LEN="64",
            TRAIN_BATCH_TOKENS="1024", MICRO_BATCH_SEQS="8", ITERATIONS="6", WARMDOWN_ITERS="2", WARMUP_STEPS="1",
            MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", VAL_BATCH_SIZE="2048",
            EVAL_SEQ_LEN="64", EVAL_STRIDE="16", EVAL_BATCH_SEQS="16", TTT_CHUNK="16", TTT_BATCH_DOCS="8",
            EMA_START_FRAC="0.5", QAT_START_FRAC="0.3", COMPILE="0")


@pytest.fixture
def tiny_env(synth, monkeypatch):
    """Environment for a tiny run on the synthetic data; also applied to this process for in-process tests."""
    env = dict(TINY, DATA_PATH=synth["data_path"], TOKENIZER_PATH=synth["tokenizer_path"])
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def run_script(env, cwd, nproc=1, timeout=300, script=SCRIPT):
    """Run train_gpt.py (under torchrun with gloo when nproc > 1) with only `env` on top of a clean environment."""
    full = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    full.update(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def real_data():
    """The challenge's real data kit, when PG_DATA_DIR names one; else the test is skipped."""
    root = os.environ.get("PG_DATA_DIR", "")
    data = os.path.join(root, "datasets", "fineweb10B_sp1024")
    tok = os.path.join(root, "tokenizers", "fineweb_1024_bpe.model")
    if not (root and os.path.isdir(data) and os.path.isfile(tok)):
        pytest.skip("PG_DATA_DIR does not point at the challenge data kit")
    return {"data_path": data, "tokenizer_path": tok}


class HostReads(TorchDispatchMode):
    """Records the ops that need a tensor's values on the host: on a GPU each makes the host wait for the device
    (`.item()`, `bool(t)`, `torch.equal`, `nonzero`, `masked_select`, `unique`, `repeat_interleave` by a tensor,
    indexing or assigning with a boolean mask). Not seen: `.tolist()` and `.numpy()` of a CPU tensor (no op is
    dispatched). Tensors for which `allowed(t)` holds are not recorded (an optimizer's step counters)."""

    READS = {getattr(torch.ops.aten, op).default for op in
             ("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
              "unique_consecutive")} | {torch.ops.aten.repeat_interleave.Tensor}
    MASKABLE = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}

    def __init__(self, allowed=lambda t: False):
        super().__init__()
        self.allowed, self.found = allowed, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        read = func in self.READS or func in self.MASKABLE and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if read and not self.allowed(args[0]):
            self.found.append(f"{func}{tuple(args[0].shape)}")
        return func(*args, **(kwargs or {}))
