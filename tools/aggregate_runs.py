"""Aggregate the final scores of several train_gpt.py runs (logs/<RUN_ID>.txt): count, mean and sample standard
deviation of val_loss and val_bpb per evaluation, and, given --reference-loss, a one-sided one-sample t-test of
"mean val_loss < reference - min_improvement". Standard library only.

    python tools/aggregate_runs.py logs/seed1.txt logs/seed2.txt logs/seed3.txt --reference-loss 2.0727
    python tools/aggregate_runs.py seed1 seed2 seed3 --json      # bare RUN_IDs are looked up as logs/<RUN_ID>.txt
"""
import argparse, json, math, os, statistics, sys

# score name -> log line prefix (the roundtrip score is read at full precision from its _exact line)
SCORES = {"roundtrip": "final_int5_zstd_roundtrip_exact", "sliding": "final_sliding_window",
          "ttt": "final_ttt", "prequant": "final_prequant"}


class LogError(Exception):
    pass


def fields(line):
    """'name k:v k:v ...' -> {k: v}."""
    return dict(tok.split(":", 1) for tok in line.split()[1:] if ":" in tok)


def parse_log(path):
    """{'path', 'seed', 'scores': {score: (val_loss, val_bpb)}}; LogError when a final line the config calls for is missing."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LogError(f"{path}: cannot read ({e.strerror})") from None
    config = next((fields(l) for l in lines if l.startswith("config ")), None)
    if config is None:
        raise LogError(f"{path}: no 'config' line: not a train_gpt.py log")
    scores = {}
    for name, prefix in SCORES.items():
        for line in lines:
            if line.split(" ", 1)[0] == prefix:
                kv = fields(line)
                try:
                    scores[name] = (float(kv["val_loss"]), float(kv["val_bpb"]))
                except (KeyError, ValueError):
                    raise LogError(f"{path}: malformed line: {line.strip()}") from None
    stride, seq_len = int(config.get("eval_stride", 0)), int(config.get("eval_seq_len", 0))
    expected = ["prequant", "roundtrip"] + (["sliding"] if 0 < stride < seq_len else []) \
        + (["ttt"] if config.get("ttt_enabled", "").lower() in ("true", "1") else [])
    missing = [SCORES[s] for s in expected if s not in scores]
    if missing:
        raise LogError(f"{path}: no {', '.join(missing)} line: the run is incomplete (crashed, killed or still running)")
    seed = config.get("seed")
    return {"path": path, "seed": int(seed) if seed and seed.lstrip("-").isdigit() else seed, "scores": scores}


# ----------------------------------------------------------------------------- Student t distribution

def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b): continued fraction (modified Lentz), relative accuracy ~1e-14."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the continued fraction converges fast on this side only
        return 1.0 - betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            return front * (f - 1.0)
    raise ArithmeticError(f"betainc({a}, {b}, {x}) did not converge")


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def one_sided_p(values, threshold):
    """p-value of H1 'mean < threshold' (one-sample t-test); (t, p), or (None, None) with fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None, None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    if sd == 0:
        return None, float(mean >= threshold)  # no spread: the answer is certain
    t = (mean - threshold) / (sd / math.sqrt(n))
    return t, t_cdf(t, n - 1)


# ----------------------------------------------------------------------------- report

def aggregate(runs, reference=None, min_improvement=0.005):
    out = {"runs": [{"path": r["path"], "seed": r["seed"]} for r in runs], "scores": {}}
    if reference is not None:
        out["reference_loss"], out["min_improvement"] = reference, min_improvement
        out["threshold"] = reference - min_improvement
    for name in SCORES:
        vals = [r["scores"][name] for r in runs if name in r["scores"]]
        if not vals:
            continue
        loss, bpb = [v[0] for v in vals], [v[1] for v in vals]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else None
        s = {"n": len(vals), "val_loss_mean": statistics.fmean(loss), "val_loss_std": sd(loss),
             "val_bpb_mean": statistics.fmean(bpb), "val_bpb_std": sd(bpb)}
        if reference is not None:
            s["t"], s["p_value"] = one_sided_p(loss, reference - min_improvement)
        out["scores"][name] = s
    return out


def markdown(agg):
    f = lambda x, p=4: "n/a" if x is None else f"{x:.{p}f}"
    ref = "reference_loss" in agg
    head = ["score", "n", "val_loss mean", "val_loss std", "val_bpb mean", "val_bpb std"] + (["t", "p (one-sided)"] if ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in agg["scores"].items():
        row = [name, str(s["n"]), f(s["val_loss_mean"]), f(s["val_loss_std"]), f(s["val_bpb_mean"]), f(s["val_bpb_std"])]
        if ref:
            row += [f(s["t"], 3), "n/a" if s["p_value"] is None else f"{s['p_value']:.3g}"]
        lines.append("| " + " | ".join(row) + " |")
    seeds = ", ".join(str(r["seed"]) for r in agg["runs"])
    lines.append(f"\n{len(agg['runs'])} runs, seeds {seeds}; std is the sample standard deviation (n - 1).")
    if ref:
        lines.append(f"p: one-sided one-sample t-test (df = n - 1) of mean val_loss < {agg['reference_loss']} - "
                     f"{agg['min_improvement']} = {agg['threshold']:.4f} nats.")
    return "\n".join(lines)


def resolve(arg):
    """A path as given, else logs/<RUN_ID>.txt when that exists."""
    alt = os.path.join("logs", arg + ".txt")
    return alt if not os.path.exists(arg) and os.path.exists(alt) else arg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="train_gpt.py log files, or RUN_IDs (read from logs/<RUN_ID>.txt)")
    ap.add_argument("--reference-loss", type=float, help="reference mean val_loss in nats (e.g. the current record)")
    ap.add_argument("--min-improvement", type=float, default=0.005, help="required improvement in nats (default 0.005)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = ap.parse_args(argv)
    try:
        runs = [parse_log(resolve(p)) for p in args.logs]
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) < len(seeds):
        print(f"warning: repeated seeds {seeds}: runs with the same seed are not independent", file=sys.stderr)
    agg = aggregate(runs, args.reference_loss, args.min_improvement)
    print(json.dumps(agg, indent=2) if args.json else markdown(agg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
