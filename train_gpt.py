"""TRN/attention hybrid for OpenAI's Parameter Golf, in one file.

Pipeline: config -> data -> metric -> model -> optimizers -> quantization/export -> evaluation
-> checkpoints -> main. Everything is configured by environment variables (see README.md).
Run: `torchrun --standalone --nproc_per_node=8 train_gpt.py`, or `python train_gpt.py` for one process.
"""
from __future__ import annotations

import copy, datetime, difflib, glob, hashlib, io, json, math, os, signal, sys, time, uuid
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- config

class UserError(Exception):
    """Bad input: main() prints it as one line and exits non-zero."""


SETTINGS = set()  # every variable Hyperparameters reads, recorded as it reads them, for the typo check


def env(name, default, cast=str, ok=None, need=""):
    SETTINGS.add(name)
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        val = cast(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a valid {cast.__name__}") from None
    if ok is not None and not ok(val):
        raise UserError(f"{name}={raw!r}: must be {need}")
    return val


def flag(name, default):
    return bool(env(name, int(default), int, lambda v: v in (0, 1), "0 or 1"))


def pos(name, default, cast=int):
    return env(name, default, cast, lambda v: v > 0, "> 0")


def nonneg(name, default, cast=int):
    return env(name, default, cast, lambda v: v >= 0, ">= 0")


def frac(name, default):
    return env(name, default, float, lambda v: 0 <= v <= 1, "in [0, 1]")


def int_list(name, default):
    SETTINGS.add(name)
    raw = os.environ.get(name, default)  # set but empty means an empty list
    try:
        return [int(s) for s in raw.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{name}={raw!r} must be comma-separated integers") from None


SYSTEM_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "ROLE_", "MASTER_", "TORCH", "PYTORCH", "OMP_", "CUDA_",
                   "NCCL_", "KMP_", "MKL_", "OPENBLAS_", "PYTHON", "TRITON_", "NVIDIA_", "LD_", "PG_")


def refuse_typos():
    """A variable that closely resembles a setting (ITERATION for ITERATIONS) stops the run: it would be ignored."""
    for name in sorted(os.environ):
        if name in SETTINGS or name.startswith(SYSTEM_PREFIXES):
            continue
        if close := difflib.get_close_matches(name.upper(), SETTINGS, n=1, cutoff=0.8):
            raise UserError(f"{name} is not a setting; did you mean {close[0]}? (rename or unset it)")


QUANT_GROUPS = ("embed", "bigram", "attn", "mlp", "trn_in", "trn_out", "trn_ctrl")


class Hyperparameters:
    def __init__(self):
        e = self
        # data and run
        e.data_path = env("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        e.tokenizer_path = env("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
        e.run_id = env("RUN_ID", "", str, lambda v: all(c.isalnum() or c in "._-" for c in v),
                       "letters, digits, '.', '_', '-'")
        e.seed = env("SEED", 1337, int)
        e.overwrite = flag("OVERWRITE", 0)
        # model
        e.vocab_size = pos("VOCAB_SIZE", 1024)
        e.bos_id = nonneg("BOS_ID", 1)
        e.model_type = env("MODEL_TYPE", "hybrid", str, lambda v: v in ("hybrid", "transformer"),
                           "hybrid or transformer")
        e.num_layers = pos("NUM_LAYERS", 10)
        e.model_dim = pos("MODEL_DIM", 512)
        e.num_heads = pos("NUM_HEADS", 8)
        e.num_kv_heads = pos("NUM_KV_HEADS", 4)
        e.mlp_mult = pos("MLP_MULT", 2.5, float)  # 2.5 keeps the default model inside 16 MB at QUANT_BITS
        e.attn_positions = int_list("ATTN_POSITIONS", "2,5,8")
        e.num_oscillators = pos("NUM_OSCILLATORS", 256)
        e.bigram_vocab_size = nonneg("BIGRAM_VOCAB_SIZE", 10240)
        e.bigram_dim = pos("BIGRAM_DIM", 128)
        e.use_token_shift = flag("USE_TOKEN_SHIFT", 1)
        e.reset_at_bos = flag("RESET_AT_BOS", 1)
        e.logit_softcap = pos("LOGIT_SOFTCAP", 30.0, float)
        e.rope_base = pos("ROPE_BASE", 10000.0, float)
        e.qk_gain_init = pos("QK_GAIN_INIT", 1.5, float)
        e.tied_embed_init_std = pos("TIED_EMBED_INIT_STD", 0.005, float)
        # training
        e.train_seq_len = pos("TRAIN_SEQ_LEN", 1024)
        e.train_batch_tokens = pos("TRAIN_BATCH_TOKENS", 524_288)
        e.micro_batch_seqs = pos("MICRO_BATCH_SEQS", 64)
        e.iterations = pos("ITERATIONS", 20_000)
        e.warmdown_iters = nonneg("WARMDOWN_ITERS", 1200)
        e.warmdown_frac = frac("WARMDOWN_FRAC", 0.25)
        e.warmup_steps = nonneg("WARMUP_STEPS", 20)
        e.max_wallclock_seconds = nonneg("MAX_WALLCLOCK_SECONDS", 600.0, float)
        e.val_loss_every = nonneg("VAL_LOSS_EVERY", 1000)
        e.train_log_every = pos("TRAIN_LOG_EVERY", 200)
        e.val_batch_size = pos("VAL_BATCH_SIZE", 524_288)
        e.matrix_lr = nonneg("MATRIX_LR", 0.04, float)
        e.scalar_lr = nonneg("SCALAR_LR", 0.04, float)
        e.tied_embed_lr = nonneg("TIED_EMBED_LR", 0.05, float)
        e.muon_momentum = frac("MUON_MOMENTUM", 0.95)
        e.muon_momentum_warmup_start = frac("MUON_MOMENTUM_WARMUP_START", 0.85)
        e.muon_momentum_warmup_steps = nonneg("MUON_MOMENTUM_WARMUP_STEPS", 500)
        e.muon_backend_steps = pos("MUON_BACKEND_STEPS", 5)
        e.beta1 = frac("BETA1", 0.9)
        e.beta2 = frac("BETA2", 0.95)
        e.adam_eps = pos("ADAM_EPS", 1e-8, float)
        e.weight_decay = nonneg("WEIGHT_DECAY", 0.04, float)
        e.grad_clip_norm = nonneg("GRAD_CLIP_NORM", 0.0, float)
        e.compile = flag("COMPILE", torch.cuda.is_available())
        # quantization, EMA, export
        e.qat_start_frac = frac("QAT_START_FRAC", 0.15)
        e.qat_refresh_every = pos("QAT_REFRESH_EVERY", 50)
        e.quant_bits = self._bits(env("QUANT_BITS", "embed:8,bigram:6,attn:6,mlp:5,trn_in:6,trn_out:6,trn_ctrl:8"))
        e.budget_bytes = pos("BUDGET_BYTES", 16_000_000)
        e.ema_window_frac = env("EMA_WINDOW_FRAC", 0.05, float, lambda v: 0 < v <= 1, "in (0, 1]")
        e.ema_start_frac = frac("EMA_START_FRAC", 0.5)
        # evaluation
        e.eval_seq_len = pos("EVAL_SEQ_LEN", e.train_seq_len)
        e.eval_stride = nonneg("EVAL_STRIDE", 64)
        e.eval_batch_seqs = pos("EVAL_BATCH_SEQS", 32)
        e.ttt_enabled = flag("TTT_ENABLED", 1)
        e.ttt_rank = pos("TTT_RANK", 8)
        e.ttt_lr = nonneg("TTT_LR", 0.01, float)
        e.ttt_chunk = pos("TTT_CHUNK", 256)
        e.ttt_batch_docs = pos("TTT_BATCH_DOCS", 32)
        e.ttt_targets = env("TTT_TARGETS", "head,attn,trn_out").split(",")
        e.eval_max_seconds = pos("EVAL_MAX_SECONDS", 600.0, float)
        # checkpoints and robustness
        e.checkpoint_every = nonneg("CHECKPOINT_EVERY", 0)
        e.checkpoint_dir = env("CHECKPOINT_DIR", "")  # default checkpoints/<RUN_ID>, set once RUN_ID is agreed
        e.checkpoint_keep = pos("CHECKPOINT_KEEP", 2)
        e.resume_from = env("RESUME_FROM", "")
        e.divergence_retries = nonneg("DIVERGENCE_RETRIES", 0)
        # submission metadata
        e.author, e.github_id = env("AUTHOR", "unknown"), env("GITHUB_ID", "unknown")
        e.run_name = env("RUN_NAME", "TRN hybrid")
        e.blurb = env("BLURB", "TRN oscillator recurrence + causal attention hybrid, int5/6/8 QAT, zstd-22")
        self._check()
        refuse_typos()

    @staticmethod
    def _bits(spec):
        bits = {}
        for item in spec.split(","):
            name, _, b = item.partition(":")
            if name not in QUANT_GROUPS or not b.isdigit() or not 2 <= int(b) <= 8:
                raise UserError(f"QUANT_BITS item {item!r}: want group:bits with group in {','.join(QUANT_GROUPS)} and bits 2..8")
            bits[name] = int(b)
        if missing := set(QUANT_GROUPS) - bits.keys():
            raise UserError(f"QUANT_BITS lacks {','.join(sorted(missing))}")
        return bits

    def _check(self):
        e, hybrid = self, self.model_type == "hybrid"  # a transformer has attention everywhere
        pos = [p for p in e.attn_positions if hybrid and not 0 <= p < e.num_layers] + [None]
        ttt = ",".join(sorted(set(self.ttt_targets) - {"head", *QUANT_GROUPS}))
        for broken, msg in (  # (condition, the line that says what to fix)
                (e.model_dim % e.num_heads or (e.model_dim // e.num_heads) % 2,
                 f"MODEL_DIM={e.model_dim} must be divisible by NUM_HEADS={e.num_heads} into an even head size"),
                (e.num_heads % e.num_kv_heads, f"NUM_HEADS={e.num_heads} must be divisible by NUM_KV_HEADS={e.num_kv_heads}"),
                (pos[0] is not None, f"ATTN_POSITIONS index {pos[0]} is out of range for NUM_LAYERS={e.num_layers}"),
                (e.train_batch_tokens % e.train_seq_len,
                 f"TRAIN_BATCH_TOKENS={e.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={e.train_seq_len}"),
                (e.bos_id >= e.vocab_size, f"BOS_ID={e.bos_id} must be < VOCAB_SIZE={e.vocab_size}"),
                (e.eval_stride > e.eval_seq_len, f"EVAL_STRIDE={e.eval_stride} must be <= EVAL_SEQ_LEN={e.eval_seq_len}"),
                (e.resume_from == "latest" and not (e.run_id or e.checkpoint_dir),
                 "RESUME_FROM=latest needs the RUN_ID (or CHECKPOINT_DIR) of the run to resume"),
                (ttt, f"TTT_TARGETS has unknown {ttt}; choose from head,{','.join(QUANT_GROUPS)}")):
            if broken:
                raise UserError(msg)

    @property
    def attn_layers(self):
        return set(range(self.num_layers)) if self.model_type == "transformer" else set(self.attn_positions)

    def arch(self):
        """The settings that fix the parameter shapes: stored in checkpoints and artifacts, checked on load."""
        keys = ("vocab_size", "model_type", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                "num_oscillators", "bigram_vocab_size", "bigram_dim", "use_token_shift", "reset_at_bos", "bos_id",
                "logit_softcap", "rope_base")
        return {k: getattr(self, k) for k in keys} | {"attn_layers": sorted(self.attn_layers)}


# ----------------------------------------------------------------------------- data

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
DOWNLOAD_HINT = "get it with `python tools/get_data.py` (this repo) or the challenge's `data/cached_challenge_fineweb.py`"


def shard_files(data_path, split):
    if not os.path.isdir(data_path):
        raise UserError(f"DATA_PATH={data_path} is not a directory; {DOWNLOAD_HINT}")
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise UserError(f"DATA_PATH={data_path} has no fineweb_{split}_*.bin shards; {DOWNLOAD_HINT}")
    total = sum(shard_len(f) for f in files)
    if total < 2:
        raise UserError(f"DATA_PATH={data_path}: its fineweb_{split}_*.bin shards hold {total} tokens; {DOWNLOAD_HINT}")
    return files


def shard_len(path):
    """Validate a shard's header and exact size; return its token count."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"{path}: bad shard header (want magic {SHARD_MAGIC}, version {SHARD_VERSION})")
    n, size = int(header[2]), os.path.getsize(path)
    if size != 4 * HEADER_INTS + 2 * n:
        raise UserError(f"{path}: {size} bytes but the header promises {n} tokens ({4 * HEADER_INTS + 2 * n} bytes): truncated or corrupt")
    return n


def load_shard(path, vocab_size):
    tokens = np.fromfile(path, dtype="<u2", count=shard_len(path), offset=4 * HEADER_INTS)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise UserError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    return tokens


class TokenStream:
    """Endless deterministic stream over the shards in name order; (shard, offset) is its whole state."""

    def __init__(self, files, vocab_size):
        self.files, self.vocab_size = files, vocab_size
        self.shard, self.offset, self.tokens = 0, 0, load_shard(files[0], vocab_size)

    def state(self):
        return {"shard": self.shard, "offset": self.offset}

    def restore(self, st):
        if st["shard"] != self.shard:
            self.tokens = load_shard(self.files[st["shard"]], self.vocab_size)
        self.shard, self.offset = st["shard"], st["offset"]

    def take(self, n):
        parts = []
        while n > 0:
            if self.offset == len(self.tokens):
                self.restore({"shard": (self.shard + 1) % len(self.files), "offset": 0})
                continue
            k = min(n, len(self.tokens) - self.offset)
            parts.append(self.tokens[self.offset:self.offset + k])
            self.offset, n = self.offset + k, n - k
        return np.concatenate(parts)


class TrainLoader:
    """Every rank reads the same global batch and keeps its own rows, so the batch is the same for any world size."""

    def __init__(self, h, rank, world_size, device):
        self.stream = TokenStream(shard_files(h.data_path, "train"), h.vocab_size)
        self.seq_len, self.n_seqs = h.train_seq_len, h.train_batch_tokens // h.train_seq_len
        if self.n_seqs % world_size:
            raise UserError(f"TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN = {self.n_seqs} sequences cannot be split over {world_size} processes")
        self.rows = slice(rank * self.n_seqs // world_size, (rank + 1) * self.n_seqs // world_size)
        self.micro, self.device = h.micro_batch_seqs, device

    def next_batch(self):
        """Yields (x, y, weight) micro-batches; weights sum to 1 over the rank's rows."""
        chunk = self.stream.take(self.n_seqs * self.seq_len + 1)
        self.stream.offset -= 1  # the last target is the next batch's first input
        t = torch.from_numpy(chunk[self.rows.start * self.seq_len:self.rows.stop * self.seq_len + 1].astype(np.int64))
        t = (t.pin_memory() if self.device.type == "cuda" else t).to(self.device, non_blocking=True)
        x, y = t[:-1].view(-1, self.seq_len), t[1:].view(-1, self.seq_len)
        return [(x[i:i + self.micro], y[i:i + self.micro], len(x[i:i + self.micro]) / len(x))
                for i in range(0, len(x), self.micro)]


# ----------------------------------------------------------------------------- metric

def byte_luts(sp, vocab_size):
    """Per-token UTF-8 byte counts exactly as the challenge counts them."""
    if sp.vocab_size() != vocab_size:
        raise UserError(f"tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise UserError("tokenizer has no '\u2581' piece: not a SentencePiece tokenizer this metric understands")
    base, space = np.zeros(vocab_size, np.int16), np.zeros(vocab_size, np.bool_)
    boundary = np.ones(vocab_size, np.bool_)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return tuple(torch.from_numpy(a) for a in (base, space, boundary))


def target_bytes(tokens, luts):
    """Bytes of each target tokens[1:], given the previous token tokens[:-1]."""
    base, space, boundary = (a.to(tokens.device) for a in luts)
    prev, tgt = tokens[:-1].long(), tokens[1:].long()
    return base[tgt].double() + (space[tgt] & ~boundary[prev]).double()


# ----------------------------------------------------------------------------- model

def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


class _Scan(torch.autograd.Function):
    """h_t = a_t h_{t-1} + b_t along dim 1; saves only a and h: the b-gradient is the same scan backwards in time."""

    @staticmethod
    def forward(ctx, a, b):
        h = _blocked_scan(a, b, reverse=False)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, g):
        a, h = ctx.saved_tensors
        gb = _blocked_scan(a, g.contiguous(), reverse=True)
        ga = (gb[:, 1:] * h[:, :-1]).sum_to_size(a[:, 1:].shape)
        return F.pad(ga, (0, 0) * (ga.dim() - 2) + (1, 0)), gb


def _shift(x, d, reverse, fill=0.0):
    """x moved d steps later along dim 1 (reverse: earlier); the steps left empty hold `fill`."""
    x = x[:, d:] if reverse else x[:, :-d]
    return F.pad(x, (0, 0) * (x.dim() - 2) + ((0, d) if reverse else (d, 0)), value=fill)


def _kogge_stone(a, b, reverse):
    """Inclusive scan of the affine maps (a_t, b_t) along dim 1 in ceil(log2 n) doubling steps, out of place
    (in place on copies took 2.3x longer compiled)."""
    n, d = b.size(1), 1
    while d < n:
        b, a = b + a * _shift(b, d, reverse), a * _shift(a, d, reverse, 1.0)
        d *= 2
    return b


def _blocked_scan(a, b, reverse, C=32):
    """Blocks of C steps (8..128 timed, 32 kept): each block's end state and decay product (unrolled), Kogge-Stone
    over the blocks for the state entering each, each block rerun. Reverse is the adjoint: step t decays by a_{t+1},
    indexed in the blocks (inductor saved a shifted copy of a, and of h, for backward: 20 MB written, not 8)."""
    T = b.size(1)
    C, nb = min(C, T), -(-T // min(C, T))
    if nb * C != T:  # zero padding at the end is inert both ways (a = b = 0)
        a, b = (F.pad(x, (0, 0) * (x.dim() - 2) + (0, nb * C - T)) for x in (a, b))
    a, b = a.unflatten(1, (nb, C)), b.unflatten(1, (nb, C))
    dec = [a[:, :, i] for i in range(reverse, C)] + ([_shift(a[:, :, 0], 1, True)] if reverse else [])
    steps = range(C - 1, -1, -1) if reverse else range(C)
    s, p = b[:, :, steps[0]], dec[steps[0]]
    for i in steps[1:]:
        s, p = b[:, :, i] + dec[i] * s, dec[i] * p
    c, hs = _shift(_kogge_stone(p, s, reverse), 1, reverse), [None] * C
    for i in steps:
        hs[i] = c = b[:, :, i] + dec[i] * c
    return torch.stack(hs, 2).flatten(1, 2)[:, :T]


def kogge_stone_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1 (h_{-1} = 0); a has b's shape or broadcasts over it."""
    return _Scan.apply(a, b)


def quant_codes(w, scale, bits):
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


def fake_quant(w, scale, bits):
    """Quantize-dequantize on the export grid: the codes and per-row fp16 scales the artifact stores."""
    return quant_codes(w, scale, bits) * scale


def clip_scale(w, clip, bits):
    """Per-row scales (fp16 values, never 0 or inf) that put `clip` of each row's largest |w| at the top code.
    Rounded to fp16 by integer ops: inductor drops a .half().float() pair, and compiled QAT trained unrounded
    scales (63,049 of 65,536 fake-quantized weights off the export's, a 6-bit test)."""
    s = (w.detach().abs().amax(1, keepdim=True) * clip / (2 ** (bits - 1) - 1)).clamp(2 ** -24, 65504.0)
    i = s.view(torch.int32)  # normal: 13 of fp32's 23 mantissa bits dropped, to nearest even; subnormal: 2^-24 steps
    normal = ((i + 0xFFF + ((i >> 13) & 1)) & -0x2000).view(torch.float32)
    return torch.where(s < 2 ** -14, torch.round(s * 2 ** 24) / 2 ** 24, normal)


def lora(x, y, ab):
    return y if ab is None else y + (x @ ab[0].to(x.dtype)) @ ab[1].to(x.dtype)


class FakeQuant:
    """A `weight` the export quantizes (group `group`). With QAT on, `qweight()` is exactly what the artifact
    dequantizes to (straight-through): scales from the current weight and the exporter's clip fractions `qclip`
    (fixed scales let weights drift past a stale grid: 3.68 bpb instead of 3.00). Buffers: never recompiles."""
    qbits = 0

    def init_quant(self, group):
        self.group = group
        self.register_buffer("qat", torch.zeros(()), persistent=False)
        self.register_buffer("qclip", torch.ones(self.weight.size(0), 1), persistent=False)

    def qweight(self):
        w = self.weight
        if not self.qbits:
            return w
        return w + self.qat * (fake_quant(w, clip_scale(w, self.qclip, self.qbits), self.qbits) - w).detach()


class CastedLinear(FakeQuant, nn.Linear):
    """fp32 master weight, compute in the autocast dtype; `lora` holds TTT adapters."""

    def __init__(self, fan_in, fan_out, group, zero=False):
        super().__init__(fan_in, fan_out, bias=False)
        self.init_quant(group)
        self.lora = None
        if zero:
            nn.init.zeros_(self.weight)

    def forward(self, x):
        return lora(x, F.linear(x, self.qweight().to(x.dtype)), self.lora)


class QEmbedding(FakeQuant, nn.Embedding):
    def __init__(self, n, dim, group):
        super().__init__(n, dim)
        self.init_quant(group)

    def forward(self, ids):
        return F.embedding(ids, self.qweight())


class MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        hidden = int(h.mlp_mult * h.model_dim)
        self.fc = CastedLinear(h.model_dim, hidden, "mlp")
        self.proj = CastedLinear(hidden, h.model_dim, "mlp", zero=True)

    def forward(self, x):
        y = F.leaky_relu(self.fc(x), 0.5)
        return self.proj(y * y)  # not square(): it is pow, which CUDA autocast runs in fp32


class Rotary(nn.Module):
    def __init__(self, dim, base):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dim, 2).float() / dim), persistent=False)

    def forward(self, T, device):
        f = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.inv_freq)
        return f.cos()[None, None], f.sin()[None, None]


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), -1).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and RMS-normed q, k; SDPA picks flash on GPU."""

    def __init__(self, h):
        super().__init__()
        self.nh, self.nkv, self.hd = h.num_heads, h.num_kv_heads, h.model_dim // h.num_heads
        self.q = CastedLinear(h.model_dim, h.model_dim, "attn")
        self.kv = CastedLinear(h.model_dim, 2 * self.nkv * self.hd, "attn")
        self.proj = CastedLinear(h.model_dim, h.model_dim, "attn", zero=True)
        self.rotary = Rotary(self.hd, h.rope_base)
        self.q_gain = nn.Parameter(torch.full((self.nh,), h.qk_gain_init))  # per-head logit scale on unit q, k

    def forward(self, x, ctx):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.nkv, self.hd).transpose(1, 3).unbind(2)
        cos, sin = self.rotary(T, x.device)
        g = self.q_gain[:, None, None]  # folded into q's rotation (linear): no extra pass over q
        q, k = apply_rotary(rms_norm(q), cos * g, sin * g), apply_rotary(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TRN(nn.Module):
    """K complex oscillators: r_t = a_t r_{t-1} + (1 - a_t) A_t exp(j theta_t), theta_t = w_t log(1+t) + p_t, output
    silu(gate) * (r_t exp(-j theta_t)). Control matmul bf16 (fp32 cost more than all other matmuls); the rest fp32."""

    def __init__(self, h):
        super().__init__()
        D, K = h.model_dim, h.num_oscillators
        self.K = K
        self.ctrl = CastedLinear(D, 3 * K, "trn_ctrl")  # frequency, phase, decay
        self.inp = CastedLinear(D, 2 * K, "trn_in")  # amplitude, output gate
        self.out = CastedLinear(2 * K, D, "trn_out", zero=True)
        nn.init.normal_(self.ctrl.weight, std=0.1 / math.sqrt(D))
        # time constants 2..T tokens, frequencies over two decades, as logs: an Adam step is a relative change
        tau = torch.logspace(math.log10(2), math.log10(max(h.train_seq_len, 4)), K)
        self.decay_logit = nn.Parameter(torch.log(tau - 1))
        self.log_freq = nn.Parameter(torch.linspace(-1.5, 0.5, K) * math.log(10))
        self.shift_mix = nn.Parameter(torch.full((D,), 0.5)) if h.use_token_shift else None

    def forward(self, x, ctx):
        keep, logpos = ctx  # keep: 0 at a document start (state reset), (B, T, 1)
        if self.shift_mix is not None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0)) * keep.to(x.dtype)
            x = x + self.shift_mix.to(x.dtype) * (prev - x)
        w, p, d = self.ctrl(x).float().unflatten(-1, (3, self.K)).unbind(-2)
        amp, gate = self.inp(x).float().unflatten(-1, (2, self.K)).unbind(-2)
        a = torch.sigmoid(d + self.decay_logit)
        theta = (w + self.log_freq.exp()) * logpos + p
        rot = torch.stack((theta.cos(), theta.sin()), -2)  # (B, T, 2, K): K innermost, so the scan vectorizes
        # a document start drops the old state and enters like a sequence start: r = (1 - a) A exp(j theta)
        r = kogge_stone_scan((a * keep).unsqueeze(-2), ((1 - a) * amp).unsqueeze(-2) * rot)
        c, s = rot.unbind(-2)
        re, im = r.unbind(-2)
        y = torch.stack((re * c + im * s, im * c - re * s), -1) * F.silu(gate).unsqueeze(-1)
        return self.out(y.flatten(-2).to(x.dtype))


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token); a document start has no previous token."""

    def __init__(self, h):
        super().__init__()
        self.n, self.none = h.bigram_vocab_size, h.vocab_size
        self.emb = QEmbedding(self.n, h.bigram_dim, "bigram")
        nn.init.zeros_(self.emb.weight)
        self.proj = CastedLinear(h.bigram_dim, h.model_dim, "bigram")
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids, keep):
        prev = torch.where(keep.squeeze(-1) > 0, F.pad(ids[:, :-1], (1, 0), value=self.none), self.none)
        return self.scale * self.proj(self.emb((prev * 1_000_003 + ids) % self.n))


class Block(nn.Module):
    def __init__(self, h, attn):
        super().__init__()
        D = h.model_dim
        self.mixer = Attention(h) if attn else TRN(h)
        self.mlp = MLP(h)
        self.mix_scale, self.mlp_scale = nn.Parameter(torch.ones(D)), nn.Parameter(torch.ones(D))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(D), torch.zeros(D))))

    def forward(self, x, x0, ctx):
        x = self.resid_mix[0].to(x.dtype) * x + self.resid_mix[1].to(x.dtype) * x0
        x = x + self.mix_scale.to(x.dtype) * self.mixer(rms_norm(x), ctx)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h, self.lora = h, None  # lora: TTT adapters of the output head
        self.tok_emb = QEmbedding(h.vocab_size, h.model_dim, "embed")  # also the output head
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        self.bigram = BigramHash(h) if h.bigram_vocab_size else None
        self.blocks = nn.ModuleList(Block(h, i in h.attn_layers) for i in range(h.num_layers))
        self.n_enc = h.num_layers // 2  # U-Net: encoder outputs feed the mirrored decoder layers
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, h.num_layers - self.n_enc), h.model_dim))
        for m in self.modules():
            if isinstance(m, FakeQuant):
                m.qbits = h.quant_bits[m.group]

    def forward_logits(self, ids):
        h = self.h
        t = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
        keep = torch.ones_like(ids, dtype=torch.float32)
        if h.reset_at_bos:  # the recurrences and positions restart at a document start (attention still sees back)
            keep = (ids != h.bos_id).float()
            t = t - torch.where(keep > 0, 0, t).cummax(1).values
        ctx = (keep.unsqueeze(-1), torch.log1p(t.float()).unsqueeze(-1))
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids, keep)
        x = x0 = rms_norm(x)
        skips = []
        for i, block in enumerate(self.blocks):
            j = i - (h.num_layers - len(self.skip_weights))
            if j >= 0:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = block(x, x0, ctx)
            if i < len(self.skip_weights):
                skips.append(x)
        x = rms_norm(x)
        logits = lora(x, F.linear(x, self.tok_emb.qweight().to(x.dtype)), self.lora).float()
        return h.logit_softcap * torch.tanh(logits / h.logit_softcap)

    def forward(self, input_ids, target_ids, reduction="mean"):
        logits = self.forward_logits(input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction=reduction)
        return loss.view_as(target_ids) if reduction == "none" else loss


def set_qat(model, on):
    for m in model.modules():
        if isinstance(m, FakeQuant):
            m.qat.fill_(float(on))


def param_groups(model):
    """Name -> tensors by role, for logging and for the optimizers."""
    groups = {"embed": [], "matrix": [], "scalar": []}
    for name, p in model.named_parameters():
        if name.endswith("emb.weight"):
            groups["embed"].append(p)
        elif p.ndim == 2 and "skip_weights" not in name and "resid_mix" not in name:
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


# ----------------------------------------------------------------------------- optimizers

class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update, bit-identical on CPU, batched per shape and shared over ranks (160 ops, not 1466)."""

    def __init__(self, params, lr, momentum, weight_decay, ns_steps):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @staticmethod
    def orthogonalize(x, steps):
        """(n, rows, cols) bf16, rows <= cols: X <- aX + (bG + cG^2)X with G = XX^T, from Frobenius norm <= 1."""
        x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True).clamp(min=1e-7)
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
        return x

    @torch.no_grad()
    def step(self):
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr, m, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, [p.grad for p in params], 1 - m)  # every rank: keeps the state identical
            upds = torch._foreach_lerp([p.grad for p in params], bufs, m)
            shapes, work = {}, []  # in parameter order, so every rank issues the same collectives
            for i, p in enumerate(params):
                shapes.setdefault(tuple(p.shape), []).append(i)
            for (rows, cols), idx in shapes.items():
                k = -(-len(idx) // world)  # rank r owns matrices [r*k, (r+1)*k), zero-padded (zero stays zero)
                mine = [upds[i] for i in idx[rank * k:(rank + 1) * k]]
                x = torch.stack(mine + [torch.zeros_like(upds[idx[0]])] * (k - len(mine))).bfloat16()
                x = self.orthogonalize(x.mT if rows > cols else x, group["ns_steps"])  # the smaller Gram matrix
                handle = None
                if world > 1:  # asynchronous: one shape's gather overlaps the next shape's Newton-Schulz
                    out = x.new_empty((world * k, *x.shape[1:]))
                    handle, x = dist.all_gather_into_tensor(out, x.contiguous(), async_op=True), out
                work.append((handle, idx, x.mT if rows > cols else x, rows, cols))
            for handle, idx, x, rows, cols in work:
                if handle is not None:
                    handle.wait()
                ps = [params[i] for i in idx]
                if wd:
                    torch._foreach_mul_(ps, 1 - lr * wd)
                upd = x[:len(idx)].to(torch.float32, memory_format=torch.contiguous_format)
                torch._foreach_add_(ps, list(upd.unbind(0)), alpha=-lr * math.sqrt(max(1, rows / cols)))


def make_optimizers(model, h):
    g = param_groups(model)
    muon = Muon(g["matrix"], lr=h.matrix_lr, momentum=h.muon_momentum, weight_decay=h.weight_decay,
                ns_steps=h.muon_backend_steps)
    adam = torch.optim.Adam([{"params": g["embed"], "lr": h.tied_embed_lr}, {"params": g["scalar"], "lr": h.scalar_lr}],
                            betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=torch.cuda.is_available())
    for opt in (muon, adam):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [muon, adam]


def lr_scale(h, step, elapsed_ms):
    """1, then linear to 0 over the last WARMDOWN_ITERS steps or the last WARMDOWN_FRAC of the wallclock."""
    s = (h.iterations - step) / h.warmdown_iters if h.warmdown_iters else 1.0
    if h.max_wallclock_seconds and h.warmdown_frac:
        s = min(s, (1 - elapsed_ms / (1000 * h.max_wallclock_seconds)) / h.warmdown_frac)
    return min(max(s, 0.0), 1.0)


def progress(h, step, elapsed_ms):
    clock = elapsed_ms / (1000 * h.max_wallclock_seconds) if h.max_wallclock_seconds else 0.0
    return min(max(step / h.iterations, clock), 1.0)


# ----------------------------------------------------------------------------- quantization and export

def quant_groups(model):
    """Parameter name -> quantization group; everything else is stored as float."""
    return {name + ".weight": m.group for name, m in model.named_modules() if isinstance(m, FakeQuant)}


def row_clips(w, bits, clips=(1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)):
    """Each row's clip fraction (of its largest |w|), chosen from `clips` to minimise its squared error."""
    w = w.float()
    best_err, best_c = w.new_full((w.size(0), 1), math.inf), w.new_ones(w.size(0), 1)
    for c in clips:  # ties keep the earlier clip
        err = (fake_quant(w, clip_scale(w, c, bits), bits) - w).square().sum(1, keepdim=True)
        best_c, best_err = torch.where(err < best_err, c, best_c), torch.minimum(err, best_err)
    return best_c


def quantize(w, bits, clip=None):
    """Codes (int8 storage) and fp16 row scales; `clip`: the clip fractions QAT trained with, else row_clips."""
    w = w.float()
    scale = clip_scale(w, row_clips(w, bits) if clip is None else clip.float(), bits)
    return quant_codes(w, scale, bits).to(torch.int8), scale.half()


@torch.no_grad()
def refresh_qclips(model):
    """Set every fake-quantized weight's clip fractions by the exporter's rule: QAT trains the grid that ships."""
    for m in model.modules():
        if isinstance(m, FakeQuant) and m.qbits:
            m.qclip.copy_(row_clips(m.weight, m.qbits))


def code_entropy_bytes(q):
    counts = torch.bincount((q.flatten().long() + 128), minlength=256).double()
    p = counts[counts > 0] / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8


def zstd():
    try:
        import zstandard
    except ImportError:
        raise UserError("the export needs the zstandard package: pip install zstandard") from None
    return zstandard


def pack(state, qgroups, bits, arch, prune=0, clips={}):
    """Self-describing blob: arch, integer codes one per byte, fp16 row scales (by `clips`), float tensors."""
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if name in qgroups:
            q, s = quantize(t, bits[qgroups[name]], clips.get(name))
            if prune:
                q = torch.where(q.abs() <= prune, torch.zeros_like(q), q)
            tensors[name] = {"q": q.contiguous(), "s": s.contiguous()}
        else:
            tensors[name] = t.float().contiguous()
    buf = io.BytesIO()
    torch.save({"arch": arch, "bits": dict(bits), "tensors": tensors}, buf)
    return buf.getvalue()


def unpack(blob):
    obj = torch.load(io.BytesIO(zstd().ZstdDecompressor().decompress(blob)), map_location="cpu", weights_only=True)
    state = {name: (t["q"].float() * t["s"].float() if isinstance(t, dict) else t)
             for name, t in obj["tensors"].items()}
    return obj["arch"], obj["bits"], state


def fit_budget(state, qgroups, h, code_bytes, log, clips={}):
    """Per-group widths (QUANT_BITS down to 4; 6 for embed and trn_ctrl), then light pruning, so code + blob fits
    BUDGET_BYTES: each dropped bit costs least error per byte saved; kept widths store the `clips` QAT trained."""
    bits, prune, calib = dict(h.quant_bits), 0, 1.0
    trained = lambda g, b: {n: clips[n] for n in clips if qgroups[n] == g and b == h.quant_bits[g]}
    floor = {g: min(b, 6 if g in ("embed", "trn_ctrl") else 4) for g, b in bits.items()}  # head, frequencies: fine
    names, cache = {g: [n for n in qgroups if qgroups[n] == g] for g in sorted(set(qgroups.values()))}, {}

    def stats(g, b):  # (estimated bytes, summed relative squared error) of group g at b bits
        if (g, b) not in cache:
            size = err = 0.0
            for n in names[g]:
                w = state[n].float()
                q, s = quantize(w, b, trained(g, b).get(n))
                size += code_entropy_bytes(q) + 2 * s.numel()
                err += float((q.float() * s.float() - w).square().sum() / w.square().sum().clamp_min(1e-20))
            cache[g, b] = (size, err)
        return cache[g, b]

    def harm_per_byte(g):
        (s1, e1), (s0, e0) = stats(g, bits[g]), stats(g, bits[g] - 1)
        return (e0 - e1) / max(s1 - s0, 1.0)

    float_bytes = sum(4 * t.numel() for n, t in state.items() if n not in qgroups)
    estimate = lambda: float_bytes + sum(stats(g, bits[g])[0] for g in names)
    limit = h.budget_bytes - code_bytes
    for _ in range(8):
        while calib * estimate() > limit and any(bits[g] > floor[g] for g in names):
            g = min((g for g in names if bits[g] > floor[g]), key=harm_per_byte)
            bits[g] -= 1
        kept = {n: s for g in names for n, s in trained(g, bits[g]).items()}
        blob = zstd().ZstdCompressor(level=22).compress(pack(state, qgroups, bits, h.arch(), prune, kept))
        if len(blob) <= limit:
            break
        if any(bits[g] > floor[g] for g in names):
            calib = max(calib, len(blob) / estimate()) * 1.002  # the estimate was optimistic: plan again
        elif prune < 2:
            prune += 1
        else:
            break
    log(f"quant_bits {' '.join(f'{g}:{bits[g]}' for g in names)} prune:{prune}")
    lowered = [f"{g}:{h.quant_bits[g]}->{bits[g]}" for g in names if bits[g] < h.quant_bits[g]]
    if lowered or prune:
        log(f"quant_mismatch: the budget fit moved off the grid QAT trained ({' '.join(lowered)} prune:{prune}); "
            "final_qat_forward no longer predicts the roundtrip score")
    return blob


# ----------------------------------------------------------------------------- evaluation
def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")



def eval_windows(n_targets, seq_len, stride):
    """Windows (start, first scored offset): each target scored exactly once, with >= seq_len - stride tokens
    of context after the first window; the last window ends at the last target."""
    L = min(seq_len, n_targets)
    ends = np.append(np.arange(L, n_targets, stride), n_targets)
    starts = ends - L
    return starts, np.concatenate(([0], ends[:-1])) - starts


def my_share(n, rank, world_size):
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


@torch.no_grad()
def score_windows(model, val, seq_len, stride, batch_seqs, rank=0, world_size=1):
    """Per-target nll and score counts for this rank's share of the windows (summed over ranks by finish())."""
    n, dev = val.numel() - 1, val.device
    nll, cnt = torch.zeros(n, dtype=torch.float64, device=dev), torch.zeros(n, dtype=torch.int32, device=dev)
    starts, offsets = eval_windows(n, seq_len, stride)
    share = my_share(len(starts), rank, world_size)
    starts, offsets = torch.as_tensor(starts[share], device=dev), torch.as_tensor(offsets[share], device=dev)
    L = min(seq_len, n)
    ar = torch.arange(L, device=dev)
    for i in range(0, len(starts), batch_seqs):
        rows = torch.arange(i, i + batch_seqs, device=dev).clamp_max(len(starts) - 1)  # full batches: one shape
        idx = starts[rows, None] + ar
        with autocast(val.device):
            loss = model(val[idx].long(), val[idx + 1].long(), reduction="none")
        mask = ((ar >= offsets[rows, None]) & (rows >= i + torch.arange(len(rows), device=dev))[:, None]).flatten()
        nll.index_add_(0, idx.flatten(), torch.where(mask, loss.flatten().double(), 0.0))  # boolean indexing
        cnt.index_add_(0, idx.flatten(), mask.int())  # made the host wait 3 times a batch; masked: add 0
    return nll, cnt


def finish(nll, cnt, tbytes):
    """All-reduce per-target scores, insist every target was scored exactly once, return (loss, bpb, tokens, bytes)."""
    if dist.is_initialized():
        dist.all_reduce(nll)
        dist.all_reduce(cnt)
    if not bool((cnt == 1).all()):
        raise RuntimeError(f"evaluation bug: {(cnt == 0).sum()} targets unscored, {(cnt > 1).sum()} scored twice")
    loss = float(nll.sum()) / nll.numel()
    return loss, float(nll.sum()) / math.log(2) / float(tbytes.sum()), nll.numel(), int(tbytes.sum())


def doc_spans(val, bos_id):
    """Target ranges [s, e) of the documents (the last target is the next BOS, as flat scoring has it)."""
    n = val.numel() - 1
    starts = torch.nonzero(val[:n] == bos_id).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [n]))


def ttt_batches(val, h, rank=0, world_size=1):
    """This rank's TTT documents, longest first, in batches padded with empty documents: [(starts, lengths)]."""
    docs, nb = sorted(doc_spans(val, h.bos_id)[rank::world_size], key=lambda se: se[0] - se[1]), h.ttt_batch_docs
    docs += [(0, 0)] * (-len(docs) % nb)
    return [([s for s, _ in docs[i:i + nb]], [e - s for s, e in docs[i:i + nb]]) for i in range(0, len(docs), nb)]


def score_ttt(model, val, h, rank=0, world_size=1, deadline=None, log=print, fwd=None):
    """Legal score-first LoRA TTT, fresh adapters per document: score each chunk, then one Adam step on it. `fwd`
    is the compiled model; windows are padded to a multiple of TTT_CHUNK (extra positions lie after the chunk,
    unseen by a causal model), so a few shapes serve every chunk. Adaptation stops once one more chunk plus the
    calls left (each timed as the last forward) would end after `deadline`: the rest of the batch keeps frozen
    adapters, later batches get none. Returns nll, counts, and the tokens scored frozen and plain."""
    n, C, L, dev = val.numel() - 1, h.ttt_chunk, max(h.eval_seq_len, h.ttt_chunk), val.device
    L, nb, fwd = -(-L // C) * C, h.ttt_batch_docs, model if fwd is None else fwd
    nll, cnt = torch.zeros(n, dtype=torch.float64, device=dev), torch.zeros(n, dtype=torch.int32, device=dev)
    batches = ttt_batches(val, h, rank, world_size)
    owners = [(m, m.weight) for m in model.modules() if isinstance(m, CastedLinear) and m.group in h.ttt_targets]
    owners += [(model, model.tok_emb.weight)] * ("head" in h.ttt_targets)  # the tied output head
    frozen = [p.requires_grad_(False) for p in model.parameters() if p.requires_grad]
    adapt, counts, total = True, [0, 0], sum(sum(lens) for _, lens in batches)
    left, calls = total, sum(-(-max(lens) // C) for _, lens in batches)

    def adapters(gens, fan_in, fan_out):  # seeded per document: scores do not depend on ranks or batching
        A = torch.stack([torch.randn(fan_in, h.ttt_rank, generator=g) for g in gens]).to(dev) / math.sqrt(fan_in)
        B = torch.zeros(len(gens), h.ttt_rank, fan_out, device=dev, requires_grad=True)  # B = 0: no change yet
        return A.requires_grad_(), B

    for bi, (starts, lens) in enumerate(batches):
        if adapt:
            gens = [torch.Generator().manual_seed(h.seed * 1_000_003 + s) for s in starts]
            for m, w in owners:
                m.lora = adapters(gens, w.size(1), w.size(0))
            opt = torch.optim.Adam([t for m, _ in owners for t in m.lora], lr=h.ttt_lr, betas=(0.9, 0.95))
        lens_t, starts = torch.tensor(lens, device=dev), torch.tensor(starts, device=dev)
        for c0 in range(0, max(lens), C):
            t = time.time()
            lo = max(0, c0 + C - L)
            rel = torch.arange(lo, lo + -(-(min(c0 + C, max(lens)) - lo) // C) * C, device=dev)
            valid = rel[None] < lens_t[:, None]
            idx = torch.where(valid, starts[:, None] + rel, 0)
            with torch.set_grad_enabled(adapt), autocast(dev):
                loss = fwd(val[idx].long(), val[idx + 1].long(), reduction="none")
            if dev.type == "cuda":
                torch.cuda.synchronize()  # to time the call (one sync per chunk; the evaluation is not training)
            call_s, calls = time.time() - t, calls - 1
            mask = valid & ((rel >= c0) & (rel < c0 + C))[None]
            nll.index_add_(0, idx.flatten(), torch.where(mask, loss.detach(), 0.0).flatten().double())
            cnt.index_add_(0, idx.flatten(), mask.flatten().int())
            k = sum(max(0, min(l, c0 + C) - c0) for l in lens)  # targets scored now, known without a sync
            left -= k
            if not adapt:
                counts[bi > stop_batch] += k
            elif c0 + C < max(lens):
                opt.zero_grad(set_to_none=True)
                ((loss * mask).sum(1) / mask.sum(1).clamp_min(1)).sum().backward()
                opt.step()
            now = time.time()
            if adapt and deadline is not None and left and now + (now - t) + calls * call_s > deadline:
                adapt, stop_batch = False, bi
                log(f"ttt_time_guard: EVAL_MAX_SECONDS would be exceeded; rank {rank} scores its last {left} of {total} tokens without further adaptation")
        if not adapt and bi == stop_batch:  # later batches: B = 0 in place, the plain model through the frozen
            for m, _ in owners:  # adapters' graphs (new zero tensors, without requires_grad, compiled once more each)
                m.lora[1].detach().zero_()
    for m, _ in owners:
        m.lora = None
    for p in frozen:
        p.requires_grad_(True)
    return nll, cnt, counts


def warm_ttt(model, h, fwd):
    """Compiles every window shape of score_ttt, adapting and with its deadline already passed."""
    C = h.ttt_chunk
    L = -(-max(h.eval_seq_len, C) // C) * C
    n = h.ttt_batch_docs * (L + C) + C + 1  # a batch of documents of L + C tokens, then one of C tokens
    docs = torch.full((n,), (h.bos_id + 1) % h.vocab_size, dtype=torch.int32, device=model.tok_emb.weight.device)
    docs[torch.arange(h.ttt_batch_docs + 1) * (L + C)] = h.bos_id
    for deadline in (None, 0):
        score_ttt(model, docs, h, deadline=deadline, log=lambda m: None, fwd=fwd)


# ----------------------------------------------------------------------------- checkpoints and outputs

def atomic_write(path, data):
    """Temporary file, fsync, rename: a reader sees the old file or the whole new one, never a part."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_config(h):
    return h.arch() | {"train_seq_len": h.train_seq_len, "train_batch_tokens": h.train_batch_tokens}


def save_checkpoint(h, state):
    path = os.path.join(h.checkpoint_dir, f"step_{state['step']:07d}.pt")
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue() + hashlib.sha256(buf.getvalue()).digest())  # trailer: detects any corruption
    for old in sorted(glob.glob(os.path.join(h.checkpoint_dir, "step_*.pt")))[:-h.checkpoint_keep]:
        os.remove(old)
    return path


def load_checkpoint(h, path):
    if path == "latest":
        found = sorted(glob.glob(os.path.join(h.checkpoint_dir, "step_*.pt")))
        if not found:
            raise UserError(f"RESUME_FROM=latest: no checkpoint in CHECKPOINT_DIR={h.checkpoint_dir}")
        path = found[-1]
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
            raise ValueError("its sha256 trailer does not match its contents")
        ck = torch.load(io.BytesIO(raw[:-32]), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or "config" not in ck:
        raise UserError(f"checkpoint {path} is not a train_gpt.py checkpoint")
    diff = [f"{k}={ck['config'].get(k)!r} (now {v!r})" for k, v in run_config(h).items() if ck["config"].get(k) != v]
    if diff:
        raise UserError(f"checkpoint {path} was made with different settings: {', '.join(diff)}")
    return path, ck


# ----------------------------------------------------------------------------- run setup

class Run:
    """Where this process runs (rank, world, device) and the log, which rank 0 alone writes."""

    def __init__(self):
        self.distributed = "RANK" in os.environ
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.master, self.cuda = self.rank == 0, torch.cuda.is_available()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if self.cuda else torch.device("cpu")
        self.logfile = None

    def log(self, msg):
        if self.master:
            print(msg, flush=True)
            with open(self.logfile, "a") as f:
                f.write(msg + "\n")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce(self, t, op="SUM"):
        if self.distributed:
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t

    def gpu_name(self):
        return torch.cuda.get_device_name(self.device) if self.cuda else "cpu"


def setup_run(h):
    """Start the process group, agree on RUN_ID, refuse to overwrite anything; returns (run, resume checkpoint)."""
    run = Run()
    if run.cuda:
        torch.cuda.set_device(run.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls, as the baseline
    if run.distributed:
        __import__("torch._dynamo")  # imported after init, torch 2.13 keeps gloo's group: its threads can abort exit
        dist.init_process_group("nccl" if run.cuda else "gloo", device_id=run.device if run.cuda else None,
                                timeout=datetime.timedelta(minutes=30))  # rank 0 alone fits the budget at export
    run_id = [h.run_id or uuid.uuid4().hex[:12]]
    if run.distributed:
        dist.broadcast_object_list(run_id, src=0)
    h.run_id = run_id[0]
    h.checkpoint_dir = h.checkpoint_dir or os.path.join("checkpoints", h.run_id)
    run.logfile = os.path.join("logs", f"{h.run_id}.txt")
    if os.path.exists(run.logfile) and not (h.overwrite or h.resume_from):
        raise UserError(f"{run.logfile} exists: pick another RUN_ID, or set OVERWRITE=1 or RESUME_FROM")
    if glob.glob(os.path.join(h.checkpoint_dir, "step_*.pt")) and not (h.overwrite or h.resume_from):
        raise UserError(f"CHECKPOINT_DIR={h.checkpoint_dir} holds another run's checkpoints: "
                        "set RESUME_FROM, or OVERWRITE=1 to delete them")
    resume = load_checkpoint(h, h.resume_from) if h.resume_from else None  # before any work
    run.barrier()  # every rank has checked before rank 0 writes
    return run, resume


def load_inputs(h, run, resume):
    """Tokenizer, validation tokens and their bytes, training loader; then (every input checked) the log starts."""
    import sentencepiece as spm
    if not os.path.isfile(h.tokenizer_path):
        raise UserError(f"TOKENIZER_PATH={h.tokenizer_path} does not exist; {DOWNLOAD_HINT}")
    try:
        sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    except Exception:
        raise UserError(f"TOKENIZER_PATH={h.tokenizer_path} is not a SentencePiece model") from None
    luts = byte_luts(sp, h.vocab_size)
    if h.reset_at_bos and sp.bos_id() != h.bos_id:
        raise UserError(f"BOS_ID={h.bos_id} but the tokenizer's BOS id is {sp.bos_id()}")
    val = np.concatenate([load_shard(f, h.vocab_size) for f in shard_files(h.data_path, "val")])
    val = torch.from_numpy(val.astype(np.int32)).to(run.device)
    loader = TrainLoader(h, run.rank, run.world_size, run.device)
    if run.master:
        os.makedirs("logs", exist_ok=True)
        if not h.resume_from:
            open(run.logfile, "w").close()
        for f in glob.glob(os.path.join(h.checkpoint_dir, "step_*.pt")):
            # OVERWRITE: the old run's; resuming an older checkpoint: the future it replaces
            if not resume or int(os.path.basename(f)[5:-3]) > resume[1]["step"]:
                os.remove(f)
    run.log(f"run_id:{h.run_id} world_size:{run.world_size} device:{run.gpu_name()} torch:{torch.__version__}")
    run.log("config " + " ".join(f"{k}:{v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                                 for k, v in sorted(vars(h).items())))
    return val, target_bytes(val, luts), loader


# ----------------------------------------------------------------------------- training

class Trainer:
    """The training state (what checkpoints, resume and both rollbacks save and restore) and its steps."""

    def __init__(self, h, run, loader, val, tbytes):
        self.h, self.run, self.loader, self.val, self.tbytes = h, run, loader, val, tbytes
        torch.manual_seed(h.seed)
        self.base = GPT(h).to(run.device)
        self.qgroups = quant_groups(self.base)
        counts = {}
        for name, p in self.base.named_parameters():
            counts[self.qgroups.get(name, "float")] = counts.get(self.qgroups.get(name, "float"), 0) + p.numel()
        run.log(f"params total:{sum(counts.values())} " + " ".join(f"{g}:{n}" for g, n in sorted(counts.items())))
        self.compiled = torch.compile(self.base, dynamic=False) if h.compile else self.base
        torch._dynamo.config.cache_size_limit = 32  # training + flat + sliding + TTT window shapes: one graph each
        self.model = self.wrap()
        self.opts = make_optimizers(self.base, h)
        self.params = list(self.base.parameters())
        self.flat_batch = max(1, h.val_batch_size // (h.train_seq_len * run.world_size))
        self.step, self.train_ms, self.lr_mult, self.ema, self.ema_step, self.qat_on = 0, 0.0, 1.0, None, None, False
        self.fq = [m for m in self.base.modules() if isinstance(m, FakeQuant)]
        self.last_ckpt, self.t0, self.retries = None, None, h.divergence_retries

    def wrap(self):
        """DDP around the compiled model; new after an out-of-memory error (the old awaits an unfinished reduction)."""
        return self.compiled if not self.run.distributed else nn.parallel.DistributedDataParallel(
            self.compiled, device_ids=[self.run.device] if self.run.cuda else None, broadcast_buffers=False)

    def state_dict(self):
        return {"config": run_config(self.h), "step": self.step, "train_ms": self.train_ms, "lr_mult": self.lr_mult,
                "model": self.base.state_dict(), "opts": [o.state_dict() for o in self.opts], "ema": self.ema,
                "ema_step": self.ema_step, "qat_on": self.qat_on, "qclips": [m.qclip for m in self.fq],
                "loader": self.loader.stream.state(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.run.device) if self.run.cuda else None}

    def load_state_dict(self, ck):
        self.base.load_state_dict(ck["model"])
        for o, s in zip(self.opts, ck["opts"]):
            o.load_state_dict(s)
        self.loader.stream.restore(ck["loader"])
        torch.set_rng_state(ck["rng"])
        if self.run.cuda and ck["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], self.run.device)
        self.ema = None if ck["ema"] is None else [t.to(self.run.device) for t in ck["ema"]]
        torch._foreach_copy_([m.qclip for m in self.fq], ck["qclips"])
        self.qat_on = ck["qat_on"]
        set_qat(self.base, self.qat_on)
        self.step, self.train_ms, self.lr_mult, self.ema_step = map(ck.get, ("step", "train_ms", "lr_mult", "ema_step"))

    def train_step(self, clock):
        """One optimizer step over the global batch at training time `clock` (ms); returns (loss, grad norm)."""
        h = self.h
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * self.lr_mult * lr_scale(h, self.step, clock)
        w = min(self.step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps else 1.0
        self.opts[0].param_groups[0]["momentum"] = (1 - w) * h.muon_momentum_warmup_start + w * h.muon_momentum
        micro = self.loader.next_batch()
        total = torch.zeros((), device=self.run.device)
        for i, (x, y, weight) in enumerate(micro):
            if self.run.distributed:
                self.model.require_backward_grad_sync = i == len(micro) - 1
            with autocast(self.run.device):
                loss = self.model(x, y)
            (loss * weight).backward()
            total += loss.detach() * weight
        gnorm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if h.grad_clip_norm:
            nn.utils.clip_grads_with_norm_(self.params, h.grad_clip_norm, gnorm)
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total, gnorm

    def update_ema(self, p):
        if self.ema is None:
            self.ema, self.ema_step = [t.detach().clone() for t in self.params], self.step
            self.run.log(f"ema_start step:{self.step}")
        else:  # a window of EMA_WINDOW_FRAC of the run ((step - 1) / p steps), a running mean until that is slower
            rate = min(1.0, max(p / (self.h.ema_window_frac * (self.step - 1)), 1 / (self.step - self.ema_step + 1)))
            torch._foreach_lerp_(self.ema, [t.detach() for t in self.params], rate)

    def warmup(self):
        """Compile and warm the kernels, then put the initial state back: warmup steps do not train."""
        h = self.h
        if not h.warmup_steps:
            return
        snapshot, done = copy.deepcopy(self.state_dict()), 0
        while done < h.warmup_steps:
            try:
                self.train_step(0.0)
                done += 1
            except torch.cuda.OutOfMemoryError:  # halve the micro-batch: accumulation keeps the global batch
                if self.loader.micro == 1:
                    raise UserError(f"one sequence of TRAIN_SEQ_LEN={h.train_seq_len} does not fit in GPU memory: "
                                    "shrink the model or the sequence") from None
                self.loader.micro, done, self.model = self.loader.micro // 2, 0, self.wrap()
                self.load_state_dict(snapshot)
                for p in self.params:
                    p.grad = None
                torch.cuda.empty_cache()
                self.run.log(f"micro_batch_seqs:{self.loader.micro} (CUDA out of memory at twice that: halved)")
        self.load_state_dict(snapshot)
        if h.compile:  # the evaluation graphs too, so neither training nor the timed evaluation compiles again
            for shape in {(self.flat_batch, h.train_seq_len), (h.eval_batch_seqs, h.eval_seq_len)}:
                with torch.no_grad(), autocast(self.run.device):
                    ids = torch.zeros(shape, dtype=torch.long, device=self.run.device)
                    self.compiled(ids, ids.clone(), reduction="none")  # distinct tensors, as in evaluation
            if h.ttt_enabled:
                warm_ttt(self.base, h, self.compiled)
        self.run.log(f"warmup_steps:{h.warmup_steps} done (weights, optimizer state and data position restored)")

    def evaluate(self, seq_len, stride, batch_seqs):
        """(loss, bpb, targets, bytes) of the current weights over the whole validation split."""
        run = self.run
        nll, cnt = score_windows(self.compiled, self.val, seq_len, stride, batch_seqs, run.rank, run.world_size)
        return finish(nll, cnt, self.tbytes)

    def validate(self):
        """Flat validation, off the training clock."""
        self.pause()
        loss, bpb, ntok, nbytes = self.evaluate(self.h.train_seq_len, self.h.train_seq_len, self.flat_batch)
        self.run.log(f"step:{self.step}/{self.h.iterations} val_loss:{loss:.4f} val_bpb:{bpb:.4f} val_tokens:{ntok} "
                     f"val_bytes:{nbytes} train_time:{self.train_ms:.0f}ms")
        self.run.sync()
        self.t0 = time.perf_counter()

    def pause(self):
        """Stop the training clock (it restarts when t0 is set again)."""
        self.run.sync()
        self.train_ms += 1000 * (time.perf_counter() - self.t0)

    def elapsed(self):
        return self.train_ms + 1000 * (time.perf_counter() - self.t0)

    def checkpoint(self):
        self.pause()
        if self.run.master:
            self.run.log(f"checkpoint:{save_checkpoint(self.h, self.state_dict())} step:{self.step}")
        self.run.barrier()
        self.last_ckpt = os.path.join(self.h.checkpoint_dir, f"step_{self.step:07d}.pt")  # every rank rolls back alike
        self.t0 = time.perf_counter()

    def rollback(self, bad_step, elapsed):
        """After a non-finite loss: back to the last checkpoint with halved learning rates; False if not allowed."""
        if not (self.retries and self.last_ckpt):
            return False
        self.load_state_dict(load_checkpoint(self.h, self.last_ckpt)[1])
        self.retries, self.lr_mult, self.train_ms = self.retries - 1, self.lr_mult * 0.5, elapsed  # lost time counts
        self.run.log(f"divergence at step:{bad_step}: rolled back to {self.last_ckpt} (step {self.step}) "
                     f"with learning rates x{self.lr_mult}")
        self.t0 = time.perf_counter()
        return True


def queue_flags(flags, distributed):
    """All-reduce a step's flags (max over ranks), queue their copy to the host: (host tensor, event)."""
    if distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True).wait()  # on CUDA the stream waits, not the host
    if not flags.is_cuda:
        return flags, None
    host, done = torch.empty(flags.shape, pin_memory=True), torch.cuda.Event()
    host.copy_(flags, non_blocking=True)
    done.record()
    return host, done


def read_flags(pending, keep):
    """The queued flags but the newest `keep`: (clock, signalled, first bad step or 0, clock's step), or None."""
    got = None
    while len(pending) > keep:
        host, done = pending.pop(0)
        if done is not None:
            done.synchronize()
        clock, signalled, step, bad = host.tolist()
        got = (clock, signalled, got[2] if got and got[2] else int(step) * (bad > 0), int(step))
    return got


def train(h, tr):
    """The loop to ITERATIONS or MAX_WALLCLOCK_SECONDS (ending within it at the mean step); flags read a step late;
    an exit code if a signal stopped it (also in the final validation: all-reduced after it, every rank or none)."""
    run, got_signal, pending, cap = tr.run, [], [], 1000 * h.max_wallclock_seconds
    capped = lambda ms, n: bool(cap) and ms + (2 + 2 * run.cuda) * ms / max(n, 1) > cap  # steps ending after it
    grab = lambda signum, frame: got_signal.append(signum)
    handlers = {s: signal.signal(s, grab) for s in (signal.SIGTERM, signal.SIGINT)}  # restored after the loop
    run.sync()
    tr.t0 = time.perf_counter()
    stop_after, clock = capped(tr.train_ms, tr.step), tr.train_ms  # clock: agreed by all ranks, so they schedule alike
    while True:
        last = tr.step >= h.iterations or stop_after
        if last or (h.val_loss_every and tr.step % h.val_loss_every == 0 and tr.step):
            tr.validate()
        if last:
            break
        p = progress(h, tr.step, clock)
        if tr.qat_on != (p >= h.qat_start_frac):
            tr.qat_on = not tr.qat_on
            set_qat(tr.base, tr.qat_on)
            refresh_qclips(tr.base)
            run.log(f"qat:{'on' if tr.qat_on else 'off'} step:{tr.step}")
        elif tr.qat_on and tr.step % h.qat_refresh_every == 0:
            refresh_qclips(tr.base)  # the exporter's clip rule follows the weights
        loss, gnorm = tr.train_step(clock)
        tr.step += 1
        if p >= h.ema_start_frac:
            tr.update_ema(p)
        bad = (~(torch.isfinite(loss) & torch.isfinite(gnorm))).float().view(1)
        host = torch.tensor((tr.elapsed(), float(bool(got_signal)), tr.step), pin_memory=run.cuda)  # not new_tensor:
        flags = torch.cat((host.to(loss.device, non_blocking=True), bad))  # its blocking copy waited for the GPU
        pending.append(queue_flags(flags, run.distributed))
        logged = tr.step % h.train_log_every == 0 or tr.step <= 10
        ckpt_due = h.checkpoint_every and tr.step % h.checkpoint_every == 0
        got = read_flags(pending, 0 if logged or ckpt_due or tr.step >= h.iterations else 1)
        if got is None:
            continue
        if (got[1] or capped(got[0], got[3])) and not got[2]:
            got = read_flags(pending, 0) or got  # stopping: this step's flags too, so no bad state is kept
        clock, signalled, bad, at = got  # clock: training time agreed by all ranks (their max) after step `at`
        if bad:
            pending.clear()
            if tr.rollback(bad, clock):
                continue
            raise UserError(f"non-finite loss or gradient norm at step {bad}; last good checkpoint: "
                            f"{tr.last_ckpt or 'none (set CHECKPOINT_EVERY)'}; "
                            "lower MATRIX_LR/SCALAR_LR or set GRAD_CLIP_NORM, then RESUME_FROM it")
        if logged:
            loss = run.all_reduce(loss) / run.world_size  # the global batch's (only when logged: off the hot path)
            run.log(f"step:{tr.step}/{h.iterations} train_loss:{loss.item():.4f} train_time:{clock:.0f}ms "
                    f"step_avg:{clock / tr.step:.2f}ms")
        if signalled:
            break
        if ckpt_due:
            tr.checkpoint()
        stop_after = capped(clock, at)
    for s, f in handlers.items():
        signal.signal(s, f)
    signalled = run.all_reduce(torch.tensor(float(bool(got_signal)), device=run.device), "MAX").item()
    if signalled or h.checkpoint_every and tr.step % h.checkpoint_every:
        tr.checkpoint()  # a run preempted during export or evaluation resumes here, not at an older checkpoint
    if signalled:
        run.log(f"stopped_by_signal step:{tr.step}")
        return 128 + (got_signal[0] if got_signal else signal.SIGTERM)
    return None


# ----------------------------------------------------------------------------- export and final evaluation

def export(h, tr):
    """EMA weights, their scores, budget fit, artifact, model reloaded: (prequant bpb, code, total, path)."""
    run = tr.run
    if tr.ema is not None:
        with torch.no_grad():
            torch._foreach_copy_(tr.params, tr.ema)
    run.log(f"export: EMA weights (window {h.ema_window_frac:g} of the run, from step {tr.ema_step})"
            if tr.ema is not None else "export: live weights (EMA did not start)")
    set_qat(tr.base, False)
    pre_loss, pre_bpb, _, _ = tr.evaluate(h.train_seq_len, h.train_seq_len, tr.flat_batch)
    run.log(f"final_prequant val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f}")
    refresh_qclips(tr.base)  # the grid of these weights, which the export reuses
    set_qat(tr.base, True)
    q_loss, q_bpb, _, _ = tr.evaluate(h.train_seq_len, h.train_seq_len, tr.flat_batch)
    set_qat(tr.base, False)
    run.log(f"final_qat_forward val_loss:{q_loss:.4f} val_bpb:{q_bpb:.4f}")
    code_bytes = len(open(__file__, "rb").read())
    state = {k: v.cpu() for k, v in tr.base.state_dict().items()}
    clips = {n: tr.base.get_submodule(n[:-7]).qclip.cpu() for n in tr.qgroups}  # n[:-7]: the module of n.weight
    blob = [fit_budget(state, tr.qgroups, h, code_bytes, run.log, clips) if run.master else None]
    if run.distributed:
        dist.broadcast_object_list(blob, src=0)
    blob = blob[0]
    artifact = os.path.join("logs", f"{h.run_id}.model.ptz")
    if run.master:
        atomic_write(artifact, blob)
    total = code_bytes + len(blob)
    run.log(f"Total submission size: {total} bytes (code:{code_bytes} model:{len(blob)}) artifact:{artifact}")
    arch, _, state = unpack(blob)
    if arch != h.arch():
        raise RuntimeError(f"artifact architecture {arch} differs from the model's {h.arch()}")
    tr.base.load_state_dict(state, strict=True)
    return pre_bpb, code_bytes, total, artifact


def evaluate_artifact(h, tr, pre_bpb, artifact):
    """Flat, sliding, TTT scores of the artifact within EVAL_MAX_SECONDS: (scores, TTT counts, start)."""
    run, t_eval = tr.run, time.time()
    loss, bpb, ntok, nbytes = tr.evaluate(h.train_seq_len, h.train_seq_len, tr.flat_batch)
    flat_s = time.time() - t_eval
    run.log(f"final_int5_zstd_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} val_tokens:{ntok} val_bytes:{nbytes} "
            f"eval_time:{1000 * flat_s:.0f}ms")
    run.log(f"final_int5_zstd_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    if not math.isfinite(loss):
        raise UserError(f"the reloaded artifact scores val_loss {loss}: its weights are not finite (files kept: {artifact})")
    run.log(f"quant_gap prequant_val_bpb:{pre_bpb:.4f} roundtrip_val_bpb:{bpb:.4f} gap:{bpb - pre_bpb:+.4f}")
    scores, counts, deadline = {"roundtrip_flat": (loss, bpb)}, None, t_eval + h.eval_max_seconds
    if 0 < h.eval_stride < h.eval_seq_len:
        # plain TTT scoring, projected per call from the flat pass's time per call (x tokens per call if more)
        flat_calls = -(-len(eval_windows(ntok, h.train_seq_len, h.train_seq_len)[0]) // run.world_size // tr.flat_batch)
        ttt_tokens = h.ttt_batch_docs * -(-max(h.eval_seq_len, h.ttt_chunk) // h.ttt_chunk) * h.ttt_chunk
        call_s = flat_s / flat_calls * max(1.0, ttt_tokens / (tr.flat_batch * h.train_seq_len))
        keep = h.ttt_enabled * call_s * sum(-(-max(lens) // h.ttt_chunk) for _, lens in
                                            ttt_batches(tr.val, h, run.rank, run.world_size))
        need = flat_s * h.eval_seq_len / h.eval_stride
        skip = torch.tensor(float(time.time() + need + keep > deadline), device=run.device)
        run.all_reduce(skip, "MAX")  # every rank takes the same decision
        if skip:
            run.log(f"final_sliding_window skipped: it needs about {need:.1f}s (+{keep:.1f}s kept for TTT), "
                    f"{deadline - time.time():.1f}s of EVAL_MAX_SECONDS={h.eval_max_seconds:g} are left")
        else:
            t = time.time()
            s_loss, s_bpb, s_ntok, _ = tr.evaluate(h.eval_seq_len, h.eval_stride, h.eval_batch_seqs)
            scores["roundtrip_sliding"] = (s_loss, s_bpb)
            run.log(f"final_sliding_window val_loss:{s_loss:.4f} val_bpb:{s_bpb:.4f} stride:{h.eval_stride} "
                    f"val_tokens:{s_ntok} eval_time:{1000 * (time.time() - t):.0f}ms")
    if h.ttt_enabled:
        t = time.time()
        say = run.log if run.master else (lambda m: print(m, flush=True))  # a guard firing on any rank is reported
        nll, cnt, counts = score_ttt(tr.base, tr.val, h, run.rank, run.world_size, deadline, say, tr.compiled)
        t_loss, t_bpb, t_ntok, _ = finish(nll, cnt, tr.tbytes)
        counts = run.all_reduce(torch.tensor(counts, device=run.device)).tolist()
        scores["roundtrip_ttt"] = (t_loss, t_bpb)
        note = f" ttt_frozen_tokens:{counts[0]} ttt_plain_tokens:{counts[1]}" if any(counts) else ""
        run.log(f"final_ttt val_loss:{t_loss:.4f} val_bpb:{t_bpb:.4f} val_tokens:{t_ntok} "
                f"eval_time:{1000 * (time.time() - t):.0f}ms{note}")
    return scores, counts, t_eval


def write_submission(h, tr, scores, counts, pre_bpb, code_bytes, total, t_eval):
    """logs/<RUN_ID>.submission.json; headline: the last (most thorough) evaluation of the reloaded artifact."""
    run, mode = tr.run, list(scores)[-1]
    record = run.cuda and run.world_size == 8 and 0 < h.max_wallclock_seconds <= 600 and "H100" in run.gpu_name()
    meta = {"author": h.author, "github_id": h.github_id, "name": h.run_name, "blurb": h.blurb,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "track": "10min_16mb" if record else "non_record_16mb",
            "val_loss": round(scores[mode][0], 8), "val_bpb": round(scores[mode][1], 8), "val_bpb_mode": mode,
            "bytes_total": total, "bytes_code": code_bytes, "prequant_val_bpb": round(pre_bpb, 8),
            **{f"{k}_val_bpb": round(v[1], 8) for k, v in scores.items()}, "steps": tr.step,
            "train_time_ms": round(tr.train_ms), "eval_time_ms": round(1000 * (time.time() - t_eval)),
            "hardware": run.gpu_name(), "ttt_frozen_tokens": counts and counts[0],
            "ttt_plain_tokens": counts and counts[1], "world_size": run.world_size,
            "torch": torch.__version__, "seed": h.seed, "run_id": h.run_id, "within_budget": total <= h.budget_bytes}
    if run.master:
        atomic_write(os.path.join("logs", f"{h.run_id}.submission.json"), (json.dumps(meta, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------- main

def train_and_evaluate(h):
    """The pipeline: set up, build, train, export, evaluate the artifact, write submission.json; the exit code."""
    run, resume = setup_run(h)
    val, tbytes, loader = load_inputs(h, run, resume)
    tr = Trainer(h, run, loader, val, tbytes)
    tr.warmup()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if resume:
        tr.last_ckpt = resume[0]
        tr.load_state_dict(resume[1])
        del resume
        run.log(f"resumed_from:{tr.last_ckpt} step:{tr.step} train_time:{tr.train_ms:.0f}ms")
    stopped = train(h, tr)
    if stopped is not None:
        return stopped
    if run.cuda:
        run.log(f"peak memory allocated:{torch.cuda.max_memory_allocated() // 2**20}MiB "
                f"reserved:{torch.cuda.max_memory_reserved() // 2**20}MiB")
    pre_bpb, code_bytes, total, artifact = export(h, tr)
    scores, counts, t_eval = evaluate_artifact(h, tr, pre_bpb, artifact)
    if h.compile:  # training, export and the timed evaluation: each compile would cost time there
        run.log(f"recompiles_after_warmup:{torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs}")
    write_submission(h, tr, scores, counts, pre_bpb, code_bytes, total, t_eval)
    if total > h.budget_bytes:
        raise UserError(f"artifact is {total} bytes, over BUDGET_BYTES={h.budget_bytes}: "
                        f"lower QUANT_BITS or shrink the model (files kept: {artifact})")
    return 0


def main():
    try:
        code = train_and_evaluate(Hyperparameters())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
