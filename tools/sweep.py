"""Run named configurations x seeds of train_gpt.py (or of an external script, e.g. the challenge's baseline)
one after another, record every run in one JSON file and print a Markdown table: mean ± sample std of val_bpb
per configuration, ms/step, and a one-sided t-test against a reference row. Standard library only; with
matplotlib installed, --plots also draws the validation curves.

Config file: one configuration a line, `name: KEY=VAL KEY=VAL ...` (values quoted as in a shell; `#` starts
a comment; blank lines are ignored). `script=PATH` (relative to the config file's folder) runs that script
instead of train_gpt.py, read as a challenge-baseline log:

    ours:     NUM_LAYERS=4 MODEL_DIM=128
    baseline: script=/work/baseline/train_gpt.py NUM_LAYERS=4 MODEL_DIM=128

    python tools/sweep.py sweep.txt --seeds 1,2,3 --reference baseline --out sweep.json \
        --common "ITERATIONS=300 MAX_WALLCLOCK_SECONDS=0" --plots plots/

Each run gets RUN_ID=sweep_<name>_s<seed> and SEED=<seed> on top of the current environment, --common and
its row (row wins), runs as `python SCRIPT` in the repo root (or --cwd) with stdout+stderr in
logs/<RUN_ID>.out there, and is written to --out as soon as it ends. Rerunning the same command skips the runs
recorded as finished with the same script and settings (--common and row); failed runs (exit code and
output tail recorded) run again. Exit status: 0 when every run finished, 1 when some failed, 2 for a bad
config or argument.
"""
import argparse, json, math, os, re, shlex, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import aggregate_runs as ar  # noqa: E402  (fields, aggregate, one_sided_p, t_cdf)

OURS = os.path.join(ROOT, "train_gpt.py")
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
STEP = re.compile(r"step:(\d+)/\d+$")
TOTAL = re.compile(r"Total submission size(?: int8\+zlib)?: (\d+) bytes")  # the baseline's int8+zlib line comes last
PREFIX = {**{v: k for k, v in ar.SCORES.items()}, "final_int8_zlib_roundtrip_exact": "roundtrip",
          "final_qat_forward": "qat_forward"}
SUBMISSION = {"prequant": "prequant_val_bpb", "roundtrip": "roundtrip_flat_val_bpb",  # 8-decimal bpb of our runs
              "sliding": "roundtrip_sliding_val_bpb", "ttt": "roundtrip_ttt_val_bpb"}


class ConfigError(Exception):
    pass


def parse_env(tokens, where):
    env = {}
    for tok in tokens:
        key, eq, val = tok.partition("=")
        if not eq or not KEY.match(key):
            raise ConfigError(f"{where}: '{tok}' is not KEY=VAL")
        if key in ("RUN_ID", "SEED"):
            raise ConfigError(f"{where}: {key} is set by the sweep")
        env[key] = val
    return env


def read_config(path):
    """[(name, script or None, env)] in file order."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    rows, run_ids = [], {}
    for i, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{i}"
        name, colon, rest = line.partition(":")
        name = name.strip()
        try:
            if not shlex.split(line, comments=True):
                continue
            toks = shlex.split(rest, comments=True)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not colon or not name or any(c.isspace() or c in "=#" for c in name):
            raise ConfigError(f"{where}: malformed line, want 'name: KEY=VAL ...': {line.strip()}")
        script = None
        for tok in [t for t in toks if t.startswith("script=")]:
            script = os.path.join(os.path.dirname(os.path.abspath(path)), tok[len("script="):])
            if not os.path.isfile(script):
                raise ConfigError(f"{where}: script {script} does not exist")
            toks.remove(tok)
        if any(name == r[0] for r in rows):
            raise ConfigError(f"{where}: duplicate configuration name '{name}'")
        rid = run_id(name, 0)
        if rid in run_ids:
            raise ConfigError(f"{where}: '{name}' and '{run_ids[rid]}' give the same RUN_ID")
        run_ids[rid] = name
        rows.append((name, script, parse_env(toks, where)))
    if not rows:
        raise ConfigError(f"{path}: no configurations")
    return rows


def run_id(name, seed):
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"sweep_{name}_s{seed}")


def parse_log(lines):
    """Step lines, final_* scores, gap and artifact size: the fields both scripts' logs share."""
    out = {"steps": None, "ms_per_step": None, "scores": {}, "gap": None, "bytes": None, "curve": []}
    last_val = None
    for line in lines:
        head, kv = line.split(" ", 1)[0], ar.fields(line)
        try:
            m = STEP.match(head)
            if m:
                out["steps"] = max(out["steps"] or 0, int(m.group(1)))
                if "step_avg" in kv:
                    out["ms_per_step"] = float(kv["step_avg"].rstrip("ms"))
                if "val_bpb" in kv:
                    last_val = {"val_loss": float(kv["val_loss"]), "val_bpb": float(kv["val_bpb"])}
                    out["curve"].append([int(m.group(1)), float(kv["train_time"].rstrip("ms")), last_val["val_bpb"]])
            elif head in PREFIX:
                out["scores"][PREFIX[head]] = {"val_loss": float(kv["val_loss"]), "val_bpb": float(kv["val_bpb"])}
            elif head == "quant_gap":
                out["gap"] = float(kv["gap"])
            elif TOTAL.match(line):
                out["bytes"] = int(TOTAL.match(line).group(1))
        except (KeyError, ValueError):
            pass  # a line that only looks like a log line (e.g. the baseline's own code echoed into its log)
    if "prequant" not in out["scores"] and last_val:  # the baseline: its last validation, before quantization
        out["scores"]["prequant"] = last_val
    s = out["scores"]
    if out["gap"] is None and "roundtrip" in s and "prequant" in s:
        out["gap"] = round(s["roundtrip"]["val_bpb"] - s["prequant"]["val_bpb"], 8)
    return out


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def launch(name, script, env, seed, cwd, rec):
    """Run one configuration and seed; returns its record (status 'ok' or 'failed')."""
    rid, ours = run_id(name, seed), script is None
    logs = os.path.join(cwd, "logs")
    os.makedirs(logs, exist_ok=True)
    log, sub, outfile = (os.path.join(logs, f"{rid}{ext}") for ext in (".txt", ".submission.json", ".out"))
    for stale in (log, sub):  # the baseline appends to its log; a stale submission.json must not count
        if os.path.exists(stale):
            os.remove(stale)
    full = dict(os.environ, **env, RUN_ID=rid, SEED=str(seed), PYTHONUNBUFFERED="1", **({"OVERWRITE": "1"} if ours else {}))
    t = time.time()
    with open(outfile, "w") as f:
        rc = subprocess.run([sys.executable, script or OURS], cwd=cwd, env=full, stdout=f, stderr=subprocess.STDOUT).returncode
    rec = dict(rec, returncode=rc, wall_s=round(time.time() - t, 1), output=outfile, attempts=rec.get("attempts", 0) + 1)
    rec.update(parse_log(read_lines(log) or read_lines(outfile)))
    if ours and os.path.exists(sub):
        with open(sub) as f:
            meta = json.load(f)
        for score, key in SUBMISSION.items():
            if score in rec["scores"] and meta.get(key) is not None:
                rec["scores"][score]["val_bpb"] = meta[key]
        rec["steps"], rec["bytes"] = meta.get("steps", rec["steps"]), meta.get("bytes_total", rec["bytes"])
    done = rc == 0 and (os.path.exists(sub) if ours else "roundtrip" in rec["scores"])
    rec["status"] = "ok" if done else "failed"
    if not done:
        rec["tail"] = read_lines(outfile)[-20:] + ([] if rc else [f"(exit 0 but no {'submission.json' if ours else 'final roundtrip line'})"])
    return rec


def welch_p(a, b):
    """One-sided p of 'mean(a) < mean(b)': Welch's t-test; a one-sample t-test of a against b when b has one value."""
    if len(b) == 1:
        return ar.one_sided_p(a, b[0])[1]
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return float(diff >= 0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return ar.t_cdf(diff / math.sqrt(va + vb), df)


def summarise(rows, runs, seeds, metric, reference):
    def stats(name):
        ok = [runs[r] for r in (run_id(name, s) for s in seeds) if runs.get(r, {}).get("status") == "ok"]
        agg = ar.aggregate([{"path": r["output"], "seed": r["seed"], "scores": {k: (v["val_loss"], v["val_bpb"])
                            for k, v in r["scores"].items()}} for r in ok])["scores"]
        score = metric if agg.get(metric, {}).get("n") == len(ok) else "prequant"
        vals = [r["scores"][score]["val_bpb"] for r in ok if score in r["scores"]]
        ms = [r["ms_per_step"] for r in ok if r.get("ms_per_step")]
        return {"config": name, "n": len(ok), "failed": len(seeds) - len(ok), "metric": score, "values": vals,
                "val_bpb_mean": agg.get(score, {}).get("val_bpb_mean"), "val_bpb_std": agg.get(score, {}).get("val_bpb_std"),
                "prequant_mean": agg.get("prequant", {}).get("val_bpb_mean"), "prequant_std": agg.get("prequant", {}).get("val_bpb_std"),
                "ms_per_step": statistics.fmean(ms) if ms else None}
    out = [stats(name) for name, _, _ in rows]
    ref = next((s for s in out if s["config"] == reference), None)
    for s in out:
        if ref and s is not ref and s["values"] and ref["values"] and s["metric"] == ref["metric"]:
            s["diff_vs_ref"] = s["val_bpb_mean"] - ref["val_bpb_mean"]
            s["p_value"] = welch_p(s["values"], ref["values"])
        if ref and s["ms_per_step"] and ref["ms_per_step"]:
            s["ms_ratio"] = s["ms_per_step"] / ref["ms_per_step"]
    return out


def markdown(summary, reference):
    f = lambda x, fmt=".4f": "n/a" if x is None else format(x, fmt)
    pm = lambda m, s: "n/a" if m is None else f"{m:.4f} ± {f(s)}"
    head = ["config", "n", "score", "val_bpb", "prequant val_bpb", "ms/step"] + (["Δ vs ref", "p (one-sided)", "ms/step ÷ ref"] if reference else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        row = [s["config"], str(s["n"]) + (f" ({s['failed']} failed)" if s["failed"] else ""), s["metric"],
               pm(s["val_bpb_mean"], s["val_bpb_std"]), pm(s["prequant_mean"], s["prequant_std"]), f(s["ms_per_step"], ".1f")]
        if reference:
            ref = s["config"] == reference
            row += ["ref" if ref else f(s.get("diff_vs_ref"), "+.4f"), "ref" if ref else f(s.get("p_value"), ".3g"), f(s.get("ms_ratio"), ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("\nmean ± sample std (n - 1) over seeds; score: the val_bpb shown (prequant where a run lacks the asked one).")
    if reference:
        lines.append(f"p: one-sided Welch t-test of 'mean val_bpb < {reference}'s' (one-sample t-test when {reference} has one run).")
    return "\n".join(lines)


def plot(runs, names, folder):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed (pip install matplotlib); no plots drawn", file=sys.stderr)
        return
    os.makedirs(folder, exist_ok=True)
    for x, label, fname in ((0, "step", "val_bpb_vs_step.png"), (1, "training time (s)", "val_bpb_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, name in enumerate(names):
            curves = [r["curve"] for r in runs if r["name"] == name and r["status"] == "ok" and r["curve"]]
            for j, c in enumerate(curves):
                ax.plot([p[0] if x == 0 else p[1] / 1000 for p in c], [p[2] for p in c], marker=".",
                        color=f"C{i % 10}", alpha=0.8, label=None if j else name)
        ax.set(xlabel=label, ylabel="val_bpb")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, fname), dpi=120)
        plt.close(fig)


def save(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="config file: lines 'name: KEY=VAL ...' (see the module docstring)")
    ap.add_argument("--seeds", default="1337", help="comma-separated seeds (default 1337)")
    ap.add_argument("--reference", help="the configuration the others are compared with")
    ap.add_argument("--out", default="sweep.json", help="results JSON, also the resume ledger (default sweep.json)")
    ap.add_argument("--common", default="", help="'KEY=VAL ...' applied to every row (a row's own values win)")
    ap.add_argument("--metric", default="roundtrip", choices=list(ar.SCORES), help="headline score (default roundtrip)")
    ap.add_argument("--plots", help="folder for val_bpb curves (needs matplotlib)")
    ap.add_argument("--cwd", default=ROOT, help="where runs execute and write logs/ (default: the repo root)")
    args = ap.parse_args(argv)
    try:
        rows = read_config(args.config)
        common = parse_env(shlex.split(args.common), "--common")
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds: '{args.seeds}' is not a comma-separated list of integers") from None
        if len(set(seeds)) < len(seeds):
            raise ConfigError(f"--seeds: {args.seeds} repeats a seed")
        if args.reference and args.reference not in [r[0] for r in rows]:
            raise ConfigError(f"--reference: no configuration named '{args.reference}' in {args.config}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = {"runs": {}}
    if os.path.exists(args.out):
        try:
            with open(args.out) as f:
                data = json.load(f)
            assert isinstance(data.get("runs"), dict)
        except (ValueError, AssertionError):
            print(f"error: {args.out} exists but is not a sweep results file", file=sys.stderr)
            return 2
    runs, cwd, todo = data["runs"], os.path.abspath(args.cwd), [(r, s) for r in rows for s in seeds]
    try:
        for i, ((name, script, env), seed) in enumerate(todo, 1):
            rid, env = run_id(name, seed), {**common, **env}
            old = runs.get(rid, {})
            if old.get("status") == "ok" and old.get("env") == env and old.get("script") == script:
                print(f"[{i}/{len(todo)}] {rid}: finished before, skipped", file=sys.stderr)
                continue
            print(f"[{i}/{len(todo)}] {rid}: running", file=sys.stderr, flush=True)
            base = {"name": name, "seed": seed, "run_id": rid, "script": script, "env": env, "attempts": old.get("attempts", 0)}
            runs[rid] = r = launch(name, script, env, seed, cwd, base)
            print(f"[{i}/{len(todo)}] {rid}: {r['status']} (exit {r['returncode']}, {r['wall_s']} s)", file=sys.stderr, flush=True)
            save(args.out, data)
    except KeyboardInterrupt:
        save(args.out, data)
        print(f"interrupted: finished runs are in {args.out}; rerun the same command to continue", file=sys.stderr)
        return 130
    data["summary"] = summarise(rows, runs, seeds, args.metric, args.reference)
    data["reference"], data["metric"], data["seeds"] = args.reference, args.metric, seeds
    save(args.out, data)
    print(markdown(data["summary"], args.reference))
    if args.plots:
        plot([runs[run_id(n, s)] for n, _, _ in rows for s in seeds], [r[0] for r in rows], args.plots)
    return 1 if any(s["failed"] for s in data["summary"]) else 0


if __name__ == "__main__":
    sys.exit(main())
