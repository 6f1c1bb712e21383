"""The top-level train.log and submission.json come from one real run of the shipped train_gpt.py
(tools/reference_run.sh): they agree with each other and with the code."""
import json
import os
import re

import train_gpt as tg
from conftest import ROOT, SCRIPT

LOG = open(os.path.join(ROOT, "train.log"), encoding="utf-8").read()
META = json.load(open(os.path.join(ROOT, "submission.json")))


def test_bytes_code_is_the_shipped_script():
    assert META["bytes_code"] == os.path.getsize(SCRIPT), "rerun tools/reference_run.sh"
    m = re.search(r"^Total submission size: (\d+) bytes \(code:(\d+) model:(\d+)\)", LOG, re.M)
    assert m and int(m.group(2)) == META["bytes_code"] and int(m.group(1)) == META["bytes_total"]


def test_headline_is_the_logs_final_score():
    prefix = {"roundtrip_flat": "final_int5_zstd_roundtrip_exact", "roundtrip_sliding": "final_sliding_window",
              "roundtrip_ttt": "final_ttt"}[META["val_bpb_mode"]]
    last = [l for l in LOG.splitlines() if l.startswith(prefix + " ")][-1]
    assert abs(float(re.search(r"val_bpb:(\S+)", last).group(1)) - META["val_bpb"]) < 5e-9
    assert META["run_id"] in LOG.splitlines()[0] and META["steps"] == int(re.findall(r"^step:(\d+)/", LOG, re.M)[-1])


def test_log_config_is_this_scripts():
    config = next(l for l in LOG.splitlines() if l.startswith("config "))
    keys = set(re.findall(r"(?:^config | )([a-z_0-9]+):", config))
    assert keys == set(vars(tg.Hyperparameters())), "the log's settings are not this script's: rerun tools/reference_run.sh"


def test_labelled_honestly():
    assert META["track"] == "non_record_16mb" and META["hardware"] in LOG.splitlines()[0]
    assert "CPU" in META["name"] and "fineweb_mini" in META["blurb"] and META["within_budget"] is True
