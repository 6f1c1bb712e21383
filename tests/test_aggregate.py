"""tools/aggregate_runs.py on synthetic logs, its Student t CDF against known values, and a smoke run of
tests/bench_speed.py --tiny."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("aggregate_runs", os.path.join(ROOT, "tools", "aggregate_runs.py"))
agg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agg)


def write_log(path, seed, loss, bpb, ttt=True, stride=64, drop=()):
    """A log shaped like train_gpt.py's, with the given roundtrip scores (the others offset from them)."""
    lines = [f"run_id:r{seed} world_size:8 device:NVIDIA H100 80GB HBM3 torch:2.9.0",
             f"config blurb:TRN hybrid, int5 eval_seq_len:1024 eval_stride:{stride} seed:{seed} "
             f"ttt_enabled:{'true' if ttt else 'false'} ttt_targets:[\"head\",\"attn\"]",
             "step:100/100 val_loss:2.1000 val_bpb:1.2400 val_tokens:100 val_bytes:250 train_time:1000ms",
             f"final_prequant val_loss:{loss - 0.01:.4f} val_bpb:{bpb - 0.005:.4f}",
             f"final_int5_zstd_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} val_tokens:100 val_bytes:250 eval_time:1ms",
             f"final_int5_zstd_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
             f"final_sliding_window val_loss:{loss - 0.02:.4f} val_bpb:{bpb - 0.01:.4f} stride:{stride} val_tokens:100 eval_time:1ms",
             f"final_ttt val_loss:{loss - 0.03:.4f} val_bpb:{bpb - 0.02:.4f} val_tokens:100 eval_time:1ms"]
    keep = [l for l in lines if l.split(" ", 1)[0] not in drop]
    if not ttt:
        keep = [l for l in keep if not l.startswith("final_ttt")]
    path.write_text("\n".join(keep) + "\n")
    return str(path)


LOSSES, BPBS = [2.0, 2.01, 2.03], [1.20, 1.21, 1.25]


@pytest.fixture
def logs(tmp_path):
    return [write_log(tmp_path / f"s{i}.txt", 1000 + i, l, b) for i, (l, b) in enumerate(zip(LOSSES, BPBS))]


def sample_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_means_and_stds(logs):
    out = agg.aggregate([agg.parse_log(p) for p in logs])
    assert [r["seed"] for r in out["runs"]] == [1000, 1001, 1002]
    for name, off_loss, off_bpb in (("roundtrip", 0, 0), ("prequant", 0.01, 0.005), ("sliding", 0.02, 0.01), ("ttt", 0.03, 0.02)):
        s = out["scores"][name]
        assert s["n"] == 3
        assert s["val_loss_mean"] == pytest.approx(sum(LOSSES) / 3 - off_loss, abs=1e-9)
        assert s["val_bpb_mean"] == pytest.approx(sum(BPBS) / 3 - off_bpb, abs=1e-9)
        assert s["val_loss_std"] == pytest.approx(sample_std(LOSSES), abs=1e-9)
        assert s["val_bpb_std"] == pytest.approx(sample_std(BPBS), abs=1e-9)


@pytest.mark.parametrize("t,df,p_upper", [
    (2.0, 5, 0.05097), (3.0, 2, 0.04773),  # one-sided upper tails, 5 digits
])
def test_t_cdf_known_tails(t, df, p_upper):
    assert 1 - agg.t_cdf(t, df) == pytest.approx(p_upper, abs=5e-6)
    assert agg.t_cdf(-t, df) == pytest.approx(p_upper, abs=5e-6)


@pytest.mark.parametrize("q,df,t", [  # quantiles t_{q, df} from standard tables (scipy.stats.t.ppf)
    (0.975, 5, 2.5705818366147395), (0.95, 20, 1.7247182429207857), (0.99, 30, 2.4572615424005915),
    (0.975, 10, 2.2281388519649385), (0.995, 1, 63.65674116287399), (0.9, 3, 1.6377443536962102),
])
def test_t_cdf_table_quantiles(q, df, t):
    assert agg.t_cdf(t, df) == pytest.approx(q, abs=1e-6)
    assert agg.t_cdf(-t, df) == pytest.approx(1 - q, abs=1e-6)


@pytest.mark.parametrize("t", [-40.0, -3.0, -0.7, 0.0, 0.2, 1.5, 9.0])
def test_t_cdf_closed_forms(t):
    assert agg.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)  # Cauchy
    assert agg.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)
    assert agg.t_cdf(t, 1e7) == pytest.approx(0.5 * math.erfc(-t / math.sqrt(2)), abs=1e-6)  # -> normal


def test_p_value_direction_and_value():
    xs = [1.0, 1.1, 0.9]  # mean 1.0, sd 0.1, n 3
    t, p = agg.one_sided_p(xs, 1.1)
    assert t == pytest.approx(-0.1 / (0.1 / math.sqrt(3)))
    assert p == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)  # df = 2 closed form
    assert agg.one_sided_p(xs, 2.0)[1] < 0.01  # far below the threshold: strong evidence (t = -17.3)
    assert agg.one_sided_p(xs, 0.5)[1] > 0.99  # above it: none
    assert agg.one_sided_p([1.0], 2.0) == (None, None)


def test_cli_reference(logs, capsys):
    # mean roundtrip loss 2.01333 (sd 0.0153): reference 2.1 - 0.005 -> clearly better; 2.0 - 0.005 -> not
    assert agg.main(logs + ["--reference-loss", "2.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == pytest.approx(2.095)
    good = out["scores"]["roundtrip"]["p_value"]
    assert agg.main(logs + ["--reference-loss", "2.0", "--min-improvement", "0.005", "--json"]) == 0
    bad = json.loads(capsys.readouterr().out)["scores"]["roundtrip"]["p_value"]
    assert good < 0.01 and bad > 0.9  # t = -9.3 and t = +2.1 with df = 2
    assert agg.main(logs + ["--reference-loss", "2.1"]) == 0
    md = capsys.readouterr().out
    assert "| score | n | val_loss mean | val_loss std | val_bpb mean | val_bpb std | t | p (one-sided) |" in md
    assert "| roundtrip | 3 | 2.0133 |" in md


@pytest.mark.parametrize("drop", ["final_ttt", "final_sliding_window", "final_int5_zstd_roundtrip_exact", "final_prequant", "config"])
def test_refuses_incomplete_log(logs, tmp_path, capsys, drop):
    bad = write_log(tmp_path / "bad.txt", 7, 2.0, 1.2, drop=(drop,))
    assert agg.main(logs + [bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.txt" in err and "\n" not in err


def test_optional_scores_follow_config(tmp_path, capsys):
    # TTT disabled and no sliding stride: those lines are not expected, the rest aggregates
    paths = [write_log(tmp_path / f"n{i}.txt", i, 2.0 + i / 100, 1.2, ttt=False, stride=0) for i in range(2)]
    assert agg.main(paths + ["--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["scores"]) == {"roundtrip", "sliding", "prequant"}
    paths = [write_log(tmp_path / f"m{i}.txt", i, 2.0, 1.2, ttt=False, stride=0, drop=("final_sliding_window",)) for i in range(2)]
    assert agg.main(paths + ["--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["scores"]) == {"roundtrip", "prequant"}


def test_bench_speed_tiny_runs():
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env["OMP_NUM_THREADS"] = "1"  # as conftest.run_script: no thread oversubscription when tests run side by side
    cmd = [sys.executable, os.path.join(ROOT, "tests", "bench_speed.py"), "--tiny", "--runs", "2"]
    import torch
    if torch.cuda.is_available():
        cmd.append("--no-compile")  # keep this smoke test fast where a GPU would trigger torch.compile
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for header in ("### Speed benchmark:", "| implementation | ms (median) | x faster than seed-style | peak MiB |",
                   "| ours (`kogge_stone_scan`), eager |", "| previous doubling scan (before the blocked one), eager |",
                   "straight after the reference: 5 rounds, seed-style/ours median", "again, warm: 5 rounds",
                   "| repeat | seed-style ms | ours ms | ratio of medians | paired, straight after | paired, warm |",
                   "Over 2 repeats, ratio of medians: median", "Over 2 repeats, paired, straight after: median",
                   "Over 2 repeats, paired, warm: median",
                   "#### One block, forward + backward", "TRN/attention block = ", "#### Muon step over the",
                   "train_gpt.Muon / torch.optim.Muon = ", "| model | ms/step | tokens/s | peak GiB |", "| hybrid |",
                   "| transformer |", "hybrid/transformer ms per step"):
        assert header in r.stdout
    repeats = [row.strip("| ").split(" | ") for row in r.stdout.split("| repeat |")[1].split("\n\n")[0].splitlines()[2:]]
    assert [row[0] for row in repeats] == ["1", "2"]
    for _, ref_ms, ours_ms, ratio, *_ in repeats:  # the ratio is the row's own reference over ours
        assert abs(float(ratio) - float(ref_ms) / float(ours_ms)) <= 0.06 + 0.01 * float(ratio)
    lo, hi = sorted((row[3] for row in repeats), key=float)  # the summary: the rows' range, a median inside it
    med = re.search(rf"ratio of medians: median ([0-9.]+)x \(range {re.escape(lo)}-{re.escape(hi)}x\)", r.stdout)
    assert med and float(lo) - 0.05 <= float(med[1]) <= float(hi) + 0.05
    bad = subprocess.run(cmd[:2] + ["--runs", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--runs must be at least 1, got 0" in bad.stderr
