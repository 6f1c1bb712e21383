"""tools/sweep.py: a tiny sweep of train_gpt.py (2 configurations x 2 seeds) with resume, an external script
that writes the challenge baseline's log lines (parsing, failures, reference statistics, resume), the one-line
message without matplotlib, and the one-line config errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "tools", "sweep.py")
_spec = importlib.util.spec_from_file_location("sweep", SWEEP)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None

# prints and logs (appending, as the baseline does) the challenge baseline's lines, including two lines of the
# code it echoes into its log; OFFSET shifts val_bpb, STEP_MS sets step_avg, FAIL=1 crashes
FAKE = r'''
import os, sys
rid, seed = os.environ["RUN_ID"], int(os.environ["SEED"])
if os.environ.get("FAIL"):
    print("Traceback: simulated crash")
    sys.exit(3)
bpb, ms = 1.2 + float(os.environ.get("OFFSET", "0")) + 0.001 * seed, float(os.environ.get("STEP_MS", "100"))
code = ['            f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "',
        '    log0(f"final_int8_zlib_roundtrip_exact val_loss:{q_val_loss:.8f} val_bpb:{q_val_bpb:.8f}")']
lines = [f"step:0/4 val_loss:6.9000 val_bpb:4.0000 train_time:0ms step_avg:0.01ms",
         f"step:1/4 train_loss:6.9000 train_time:{ms:.0f}ms step_avg:{ms:.2f}ms",
         f"step:2/4 val_loss:3.0000 val_bpb:2.5000 train_time:{2 * ms:.0f}ms step_avg:{ms:.2f}ms",
         f"step:4/4 train_loss:2.9000 train_time:{4 * ms:.0f}ms step_avg:{ms:.2f}ms",
         f"step:4/4 val_loss:2.0000 val_bpb:{bpb - 0.01:.4f} train_time:{4 * ms:.0f}ms step_avg:{ms:.2f}ms",
         "Serialized model: 67224983 bytes", "Code size: 47642 bytes", "Total submission size: 67272625 bytes",
         "Serialized model int8+zlib: 15815847 bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)",
         "Total submission size int8+zlib: 15863489 bytes",
         f"final_int8_zlib_roundtrip val_loss:2.0100 val_bpb:{bpb:.4f} eval_time:1000ms",
         f"final_int8_zlib_roundtrip_exact val_loss:2.01000000 val_bpb:{bpb:.8f}"]
os.makedirs("logs", exist_ok=True)
with open(f"logs/{rid}.txt", "a") as f:
    f.write("\n".join(code + lines) + "\n")
print(f"logs/{rid}.txt\n" + "\n".join(lines))
'''


def sweep_cli(*args, cwd, pre=""):
    """Run tools/sweep.py; `pre` is Python run before it in the same process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    code = f"import runpy, sys\n{pre}\nsys.argv = {[SWEEP, *map(str, args)]!r}\nrunpy.run_path({SWEEP!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def mtimes(cwd):
    logs = os.path.join(cwd, "logs")
    return {f: os.stat(os.path.join(logs, f)).st_mtime_ns for f in os.listdir(logs) if f.endswith(".out")}


def test_sweep_of_train_gpt_and_resume(synth, tmp_path):
    (tmp_path / "sweep.txt").write_text("# two tiny configurations\n\nbase: MATRIX_LR=0.04\nlow_lr: MATRIX_LR=0.02  # half\n")
    common = dict(TINY, DATA_PATH=synth["data_path"], TOKENIZER_PATH=synth["tokenizer_path"], ITERATIONS="2",
                  VAL_LOSS_EVERY="1", WARMDOWN_ITERS="1", EVAL_STRIDE="0", TTT_ENABLED="0")
    args = ["sweep.txt", "--seeds", "1,2", "--reference", "base", "--out", "out.json", "--cwd", tmp_path,
            "--common", " ".join(f"{k}={v}" for k, v in common.items()), "--plots", tmp_path / "plots"]
    r = sweep_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    assert sorted(data["runs"]) == ["sweep_base_s1", "sweep_base_s2", "sweep_low_lr_s1", "sweep_low_lr_s2"]
    for rid, run in data["runs"].items():
        assert run["status"] == "ok" and run["returncode"] == 0 and run["attempts"] == 1
        meta = json.loads((tmp_path / "logs" / f"{rid}.submission.json").read_text())
        assert run["seed"] == meta["seed"] and run["steps"] == 2 and run["bytes"] == meta["bytes_total"]
        assert run["scores"]["roundtrip"]["val_bpb"] == meta["roundtrip_flat_val_bpb"]
        assert run["scores"]["prequant"]["val_bpb"] == meta["prequant_val_bpb"]
        assert run["gap"] == pytest.approx(meta["roundtrip_flat_val_bpb"] - meta["prequant_val_bpb"], abs=1e-4)
        assert run["ms_per_step"] > 0 and [p[0] for p in run["curve"]] == [1, 2]
        if "final_qat_forward " in (tmp_path / "logs" / f"{rid}.txt").read_text():
            assert run["scores"]["qat_forward"]["val_bpb"] > 0
    base, low = data["summary"]
    assert base["config"] == "base" and base["n"] == 2 and base["metric"] == "roundtrip"
    vals = [data["runs"][f"sweep_low_lr_s{s}"]["scores"]["roundtrip"]["val_bpb"] for s in (1, 2)]
    assert low["val_bpb_mean"] == pytest.approx(sum(vals) / 2)
    assert low["diff_vs_ref"] == pytest.approx(low["val_bpb_mean"] - base["val_bpb_mean"])
    assert 0 <= low["p_value"] <= 1 and low["ms_ratio"] > 0
    table = r.stdout.splitlines()
    assert table[0].startswith("| config | n | score | val_bpb |") and table[2].startswith("| base | 2 | roundtrip |")
    assert table[3].startswith("| low_lr | 2 | roundtrip |") and " ± " in table[3]
    if HAVE_MPL:
        assert sorted(os.listdir(tmp_path / "plots")) == ["val_bpb_vs_step.png", "val_bpb_vs_time.png"]

    before = mtimes(tmp_path)  # resume: the same command launches nothing
    r2 = sweep_cli(*args, cwd=tmp_path)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert mtimes(tmp_path) == before and r2.stderr.count("finished before, skipped") == 4
    assert all(run["attempts"] == 1 for run in json.loads((tmp_path / "out.json").read_text())["runs"].values())
    assert r2.stdout == r.stdout


def test_external_script_failures_reference_and_resume(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE)
    (tmp_path / "sweep.txt").write_text("ref: script=fake.py\nbetter: script=fake.py OFFSET=-0.01 STEP_MS=150\n"
                                        "bad: script=fake.py FAIL=1\n")
    args = ["sweep.txt", "--seeds", "1,2,3", "--reference", "ref", "--out", "out.json", "--cwd", tmp_path]
    r = sweep_cli(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr  # some runs failed
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    ref = runs["sweep_ref_s2"]
    assert ref["status"] == "ok" and ref["steps"] == 4 and ref["ms_per_step"] == 100 and ref["bytes"] == 15863489
    assert ref["scores"] == {"roundtrip": {"val_loss": 2.01, "val_bpb": 1.202},
                             "prequant": {"val_loss": 2.0, "val_bpb": 1.192}}  # the echoed code lines are ignored
    assert ref["gap"] == pytest.approx(0.01) and ref["curve"] == [[0, 0, 4.0], [2, 200, 2.5], [4, 400, 1.192]]
    bad = runs["sweep_bad_s1"]
    assert bad["status"] == "failed" and bad["returncode"] == 3 and "Traceback: simulated crash" in bad["tail"]

    summary = {s["config"]: s for s in json.loads((tmp_path / "out.json").read_text())["summary"]}
    b = summary["better"]
    assert b["n"] == 3 and b["val_bpb_mean"] == pytest.approx(1.192) and b["val_bpb_std"] == pytest.approx(0.001)
    assert b["diff_vs_ref"] == pytest.approx(-0.01) and b["ms_ratio"] == pytest.approx(1.5)
    t = -0.01 / (2 * 0.001 ** 2 / 3) ** 0.5  # Welch with equal variances and n: df = 2n - 2
    assert b["p_value"] == pytest.approx(sweep.ar.t_cdf(t, 4), rel=1e-4) and b["p_value"] < 1e-3
    assert summary["bad"]["n"] == 0 and summary["bad"]["failed"] == 3
    assert "| bad | 0 (3 failed) |" in r.stdout and "| ref | 3 | roundtrip |" in r.stdout

    before = mtimes(tmp_path)  # resume: only the failed runs run again
    r2 = sweep_cli(*args, cwd=tmp_path)
    assert r2.returncode == 1
    after, runs = mtimes(tmp_path), json.loads((tmp_path / "out.json").read_text())["runs"]
    assert sorted(f for f in after if after[f] != before[f]) == [f"sweep_bad_s{s}.out" for s in (1, 2, 3)]
    assert runs["sweep_bad_s1"]["attempts"] == 2 and runs["sweep_ref_s1"]["attempts"] == 1

    r3 = sweep_cli(*args, "--plots", tmp_path / "plots", cwd=tmp_path, pre="sys.modules['matplotlib'] = None")
    lines = [l for l in (r3.stdout + r3.stderr).splitlines() if "matplotlib" in l]
    assert lines == ["plots: matplotlib is not installed (pip install matplotlib); no plots drawn"]
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("text,extra,message", [
    ("a: X=1\na: X=2\n", [], "sweep.txt:2: duplicate configuration name 'a'"),
    ("a: X=1\nX=2\n", [], "sweep.txt:2: malformed line, want 'name: KEY=VAL ...': X=2"),
    ("a: X=1 oops\n", [], "sweep.txt:1: 'oops' is not KEY=VAL"),
    ("a: SEED=3\n", [], "sweep.txt:1: SEED is set by the sweep"),
    ("a: script=missing.py\n", [], "does not exist"),
    ("a: X=1\n", ["--reference", "b"], "--reference: no configuration named 'b' in sweep.txt"),
    ("a: X=1\n", ["--seeds", "1,x"], "--seeds: '1,x' is not a comma-separated list of integers"),
])
def test_config_errors(tmp_path, text, extra, message):
    (tmp_path / "sweep.txt").write_text(text)
    r = sweep_cli("sweep.txt", "--out", "out.json", "--cwd", tmp_path, *extra, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "logs").exists()
