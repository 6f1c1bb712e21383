"""tools/preflight.py on the synthetic data with the tiny configuration (COMPILE=0, one process): every stage's
report and figures, the over-budget exit, the deadline, and a bad DATA_PATH that fails the data stage only."""
import difflib
import json
import os

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
