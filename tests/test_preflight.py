"""tools/preflight.py on the synthetic data with the tiny configuration (COMPILE=0, one process unless named): every
stage's report and figures, the over-budget exit, the deadline, a bad DATA_PATH that fails the data stage only, two
processes, a killed preflight's partial report, a missing sentencepiece, and MODEL_TYPE=transformer."""
import difflib
import json
import os
import re
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, TINY, run_script

PREFLIGHT = os.path.join(ROOT, "tools", "preflight.py")
HEADINGS = ["## 1. Environment", "## 1. Data", "## 1. All-reduce", "## 2. Size", "## 3. Parity", "## 4. Memory",
            "## 5. Speed", "## 6. Evaluation", "## 7. Scan"]


def _preflight(env, cwd, run_id, **over):
    r = run_script(dict(env, RUN_ID=run_id, **over), cwd, timeout=120, script=PREFLIGHT)
    r.explain = f"rc={r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    md, js = (os.path.join(cwd, "logs", f"preflight_{run_id}.{ext}") for ext in ("md", "json"))
    assert os.path.isfile(md) and os.path.isfile(js), r.explain
    assert open(md).read() == r.stdout, "the report file differs from stdout"
    r.report, r.figs = r.stdout, json.load(open(js))
    r.stages = r.figs["stages"]
    return r


@pytest.fixture(scope="module")
def base_env(synth):
    return dict(TINY, DATA_PATH=synth["data_path"], TOKENIZER_PATH=synth["tokenizer_path"])


def test_preflight_setting_is_not_taken_for_a_typo(tiny_env):
    tg.Hyperparameters()
    assert difflib.get_close_matches("PREFLIGHT_SECONDS", tg.SETTINGS, cutoff=0.8) == []


def test_tiny_cpu_preflight_reports_every_stage(base_env, synth, tmp_path):
    r = _preflight(base_env, tmp_path, "tiny")
    assert r.returncode == 0, r.explain
    for heading in HEADINGS:
        assert heading in r.report, heading
    for field in ("torch ", "SDPA flash backend", "zstandard", "sentencepiece", "validation bytes:", "params total:",
                  "estimated artifact", "margin", "fit_budget logged: `quant_bits", "parity: pass", "tolerance",
                  "largest micro-batch", "max RSS", "| hybrid |", "| transformer |", "hybrid/transformer =",
                  "recompiles_after_warmup", "steps", "8 processes", "| flat |", "| sliding (stride 16) |", "| ttt |",
                  "EVAL_MAX_SECONDS", "bandwidth lower bound", "ours/lower bound"):
        assert field in r.report, field
    assert r.figs["exit_code"] == 0 and r.figs["pass"]
    st = r.stages
    assert [k for k, v in st.items() if v["status"] != "ok"] == ["allreduce"], {k: v["status"] for k, v in st.items()}
    assert st["allreduce"]["status"].startswith("skipped: one process")
    data = st["data"]["figures"]
    assert data["val_targets"] == len(synth["val_tokens"]) - 1 and data["train_tokens"] == len(synth["train_tokens"])
    assert data["val_bytes"] == sum(len(d.encode("utf-8")) for d in synth["val_docs"])
    size = st["size"]["figures"]
    assert size["total_bytes"] == size["code_bytes"] + size["model_bytes"] <= int(TINY.get("BUDGET_BYTES", 16_000_000))
    assert size["code_bytes"] == os.path.getsize(tg.__file__) and sum(size["params"].values()) > 0
    par = st["parity"]["figures"]
    assert par["parity_pass"] and set(par["parity_worst"]) == {"loss", "embed", "matrix", "scalar"}
    assert st["memory"]["figures"]["micro_batch_fits"] == int(TINY["MICRO_BATCH_SEQS"])
    speed = st["speed"]["figures"]
    assert all(speed["step_ms"][m] > 0 for m in ("hybrid", "transformer")) and speed["ratio"] > 0
    proj = speed["projection"]
    assert set(proj) == {"1", "8"} and proj["8"]["step_ms"] < proj["1"]["step_ms"]
    ev = st["eval"]["figures"]
    assert set(ev["eval_tokens_per_s"]) == {"flat", "sliding (stride 16)", "ttt"}
    assert all(v > 0 for v in ev["eval_projected_s"]["1"].values())
    assert st["scan"]["figures"]["scan_ours_over_bound"] > 0


def test_transformer_preflight_times_the_runs_model_first(base_env, tmp_path):
    """MODEL_TYPE=transformer passes, and the speed stage times the transformer first, reusing the memory stage's
    trainer, so that model is freed before the hybrid is built (before, both were held on the GPU at once)."""
    r = _preflight(base_env, tmp_path, "tf", MODEL_TYPE="transformer")
    assert r.returncode == 0, r.explain
    assert r.report.index("| transformer |") < r.report.index("| hybrid |")
    assert r.stages["speed"]["figures"]["step_ms"]["transformer"] > 0


def test_over_budget_fails_and_deadline_skips(base_env, tmp_path):
    """PREFLIGHT_SECONDS=16 leaves room for the size stage (guess 5 s here), never for speed, evaluation, scan (20+ s)."""
    r = _preflight(base_env, tmp_path, "over", BUDGET_BYTES="1000", PREFLIGHT_SECONDS="16")
    assert r.returncode == 1, r.explain
    assert "over budget: estimated artifact" in r.report and "> BUDGET_BYTES=1,000" in r.report
    assert r.stages["size"]["status"] == "FAIL" and not r.figs["pass"]
    assert r.stages["size"]["figures"]["margin_bytes"] < 0
    for key in ("speed", "eval", "scan"):
        assert r.stages[key]["status"].startswith("skipped: deadline"), r.stages[key]
    assert "- skipped: deadline (guess 30 s" in r.report.split("## 6. Evaluation")[1]
    for heading in HEADINGS:
        assert heading in r.report, heading


def test_bad_data_path_fails_the_data_stage_only(base_env, tmp_path):
    r = _preflight(base_env, tmp_path, "nodata", DATA_PATH=str(tmp_path / "missing"), PREFLIGHT_SECONDS="16")
    assert r.returncode == 2, r.explain
    assert r.stages["data"]["status"] == "FAIL"
    fails = r.stages["data"]["failures"]
    assert fails and all(f.startswith("input error: DATA_PATH=") for f in fails), fails
    assert f"**failed** input error: DATA_PATH={tmp_path / 'missing'} is not a directory" in r.report
    assert "- tokenizer: 320 pieces" in r.report  # the parts that can be checked still are
    assert r.stages["size"]["status"] == "ok" and r.stages["parity"]["status"] == "ok"
    assert "random ids" in r.report  # parity ran without validation tokens
    assert r.stages["eval"]["status"].startswith("skipped:")


def test_two_processes_report_every_rank_and_exit_alike(base_env, tmp_path):
    """Under torchrun a rank that failed used to exit first, and torchrun stopped rank 0 before it wrote anything.
    Now rank 0's report names rank 1's failure too, and both ranks exit 2 (the worst status)."""
    missing = str(tmp_path / "missing")
    r = run_script(dict(base_env, RUN_ID="two", DATA_PATH=missing, PREFLIGHT_SECONDS="16"), tmp_path, nproc=2,
                   timeout=120, script=PREFLIGHT)
    md = tmp_path / "logs" / "preflight_two.md"
    assert md.is_file(), r.stderr[-3000:]
    figs = json.load(open(tmp_path / "logs" / "preflight_two.json"))
    assert figs["exit_code"] == 2 and figs["complete"] and figs["world_size"] == 2
    others = figs["other_ranks_failures"]
    assert [m.split(":")[:2] for m in others] == [["rank 1", " Data"]], others
    assert f"- rank 1: Data: input error: DATA_PATH={missing} is not a directory" in md.read_text()
    # torchrun SIGTERMs the slower rank once the first has exited, which can land in its shutdown (-15)
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr))
    assert "2" in codes and codes <= {"2", "-15"}, r.stderr[-3000:]


def test_a_killed_preflight_keeps_the_stages_it_finished(base_env, tmp_path):
    """The report is rewritten after every stage: killed as the speed stage starts, the first six are on disk."""
    full = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    full.update(base_env, RUN_ID="killed", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, PREFLIGHT], cwd=tmp_path, env=full, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if line.startswith("preflight: 5. Speed"):
                p.kill()
                break
    finally:
        p.kill()
        p.wait(timeout=60)
    figs = json.load(open(tmp_path / "logs" / "preflight_killed.json"))
    assert figs["exit_code"] is None and not figs["complete"] and not figs["pass"]
    assert list(figs["stages"]) == ["environment", "data", "allreduce", "size", "parity", "memory"], list(figs["stages"])
    text = (tmp_path / "logs" / "preflight_killed.md").read_text()
    assert text.startswith("# Preflight\n\n**INCOMPLETE** (6 of 9 stages done; killed, or still running)"), text[:300]


def test_missing_sentencepiece_still_loads_the_validation_data(base_env, tmp_path):
    """An ImportError in the tokenizer part escaped the per-part loop, so the validation data was never loaded."""
    (tmp_path / "block" / "sentencepiece").mkdir(parents=True)
    (tmp_path / "block" / "sentencepiece" / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    r = _preflight(base_env, tmp_path, "nospm", PYTHONPATH=str(tmp_path / "block"), PREFLIGHT_SECONDS="16")
    assert r.returncode == 2, r.explain
    assert "input error: blocked by the test" in r.stages["data"]["failures"]
    assert r.stages["data"]["figures"]["val_targets"] > 0 and "random ids" not in r.report


def test_the_runs_own_refusals_fail_the_data_stage(base_env, tmp_path):
    """What setup_run refuses at once (an existing log of RUN_ID, RESUME_FROM without a checkpoint) fails preflight
    with the run's own message, instead of a PASS for a run that cannot start."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "taken.txt").write_text("an earlier run\n")
    r = _preflight(base_env, tmp_path, "taken", PREFLIGHT_SECONDS="16")
    assert r.returncode == 2, r.explain
    assert r.stages["data"]["failures"] == [f"input error: {os.path.join('logs', 'taken.txt')} exists: pick another "
                                            "RUN_ID, or set OVERWRITE=1 or RESUME_FROM"], r.stages["data"]
    r = _preflight(base_env, tmp_path, "fresh", RESUME_FROM="latest", PREFLIGHT_SECONDS="16")
    assert r.returncode == 2, r.explain
    ckdir = os.path.join("checkpoints", "fresh")
    assert r.stages["data"]["failures"] == [f"input error: RESUME_FROM=latest: no checkpoint in CHECKPOINT_DIR={ckdir}"]
    assert _preflight(base_env, tmp_path, "taken", OVERWRITE="1", PREFLIGHT_SECONDS="16").returncode == 0
