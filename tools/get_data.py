"""Fetch the challenge's sp1024 FineWeb shards and tokenizer into ./data/ without cloning the challenge repo.

    python tools/get_data.py                    # all validation shards + the canonical 80 train shards
    python tools/get_data.py --train-shards 8   # a prefix of the same frozen train order
    PG_DATA_BASE_URL=http://mirror/datasets python tools/get_data.py --out /scratch/data

Mirrors openai/parameter-golf's data/cached_challenge_fineweb.py --variant sp1024: the same Hugging Face dataset
repository (willdepueoai/parameter-golf, export root datasets/), the same manifest.json, the same file names and the
same local layout (data/manifest.json, data/datasets/fineweb10B_sp1024/, data/tokenizers/), which train_gpt.py's
DATA_PATH and TOKENIZER_PATH defaults expect. Standard library only. Files already present are skipped (their shard
headers are still checked); an interrupted download resumes from its .part file with an HTTP Range request and is
renamed into place only once its size (Content-Length / Content-Range) and shard header check out. Validation shards
are always fetched in full, and their token total is checked against the manifest.
"""
import argparse, http.client, json, os, shutil, struct, sys, urllib.error, urllib.request

ENV = "PG_DATA_BASE_URL"
DEFAULT_BASE_URL = "https://huggingface.co/datasets/willdepueoai/parameter-golf/resolve/main/datasets"
DATASET = "fineweb10B_sp1024"
DEFAULT_TRAIN_SHARDS = 80
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
CHUNK = 1 << 20


class Fail(Exception):
    """A problem for the user to fix: reported as one line on stderr, exit status 1."""


def check_shard(path, name, fix):
    """Token count of shard file path; Fail(f"{name}: what is wrong; {fix}") unless its header is 20240520, 1, n
    and its size is 1024 + 2 n bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise Fail(f"{name}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header; {fix}")
    magic, version, n = struct.unpack("<3i", head[:12])
    if magic != MAGIC or version != VERSION:
        raise Fail(f"{name}: bad shard header (magic {magic}, version {version}; want {MAGIC}, {VERSION}); {fix}")
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise Fail(f"{name}: {size} bytes but its header says {n} tokens ({HEADER_BYTES + 2 * n} bytes); {fix}")
    return n


def download(url, dest):
    """url -> dest.part, resuming an existing .part with a Range request; (final size, bytes resumed from)."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "pg-get-data/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is not a prefix of the file (or is all of it): start over
            os.remove(part)
            return download(url, dest)
        raise Fail(f"{url}: HTTP {e.code} {e.reason}; check {ENV} (or unset it for the default)") from None
    except (urllib.error.URLError, OSError) as e:
        raise Fail(f"{url}: {getattr(e, 'reason', e)}; check the network and {ENV}") from None
    with resp:
        if resp.status == 206:
            crange = resp.headers.get("Content-Range", "")
            if not crange.startswith(f"bytes {have}-"):
                raise Fail(f"{url}: asked for bytes {have}- but got Content-Range {crange!r}; delete {part}")
            total, mode = crange.rpartition("/")[2], "ab"
        else:  # the server ignored the Range header: the body is the whole file
            total, mode, have = resp.headers.get("Content-Length"), "wb", 0
        total = int(total) if total and total.isdigit() else None
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            with open(part, mode) as f:
                shutil.copyfileobj(resp, f, CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise Fail(f"{dest}: download interrupted ({e}); rerun to resume") from None
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise Fail(f"{dest}: got {size} of {total} bytes (connection dropped); rerun to resume")
    return size, have


def get(base, rel, out, shard=False):
    """Fetch base/rel to out/rel unless already there; returns the shard's token count (shards) or None."""
    if os.path.isabs(rel) or ".." in rel.split("/"):
        raise Fail(f"manifest path {rel!r} is not a plain relative path; check {ENV}")
    dest = os.path.join(out, *rel.split("/"))
    if os.path.exists(dest):
        n = check_shard(dest, dest, "delete it and rerun") if shard else None
        print(f"have {rel}", flush=True)
        return n
    size, resumed = download(f"{base}/{rel}", dest)
    try:
        n = check_shard(dest + ".part", f"{base}/{rel}", f"not kept; check {ENV}") if shard else None
    except Fail:
        os.remove(dest + ".part")
        raise
    os.replace(dest + ".part", dest)
    print(f"got  {rel} {size / 1e6:.1f} MB" + (f" (resumed at {resumed / 1e6:.1f} MB)" if resumed else ""), flush=True)
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"train shards to fetch, a prefix of the frozen order (default {DEFAULT_TRAIN_SHARDS})")
    p.add_argument("--out", default="./data", help="local data root (default ./data)")
    args = p.parse_args(argv)
    base = os.environ.get(ENV, DEFAULT_BASE_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise Fail(f"{ENV}={base!r} is not an http(s) URL; set it to the dataset's base URL or unset it")
    if args.train_shards < 0:
        raise Fail(f"--train-shards must be >= 0, got {args.train_shards}")

    get(base, "manifest.json", args.out)
    mpath = os.path.join(args.out, "manifest.json")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        ds = next(d for d in manifest["datasets"] if d.get("name") == DATASET)
        tok = next(t for t in manifest["tokenizers"] if t.get("name") == ds["tokenizer_name"])
        stats = ds["stats"]
        n_val, n_train = int(stats["files_val"]), int(stats["files_train"])
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        raise Fail(f"{mpath}: not a challenge manifest with dataset {DATASET} ({type(e).__name__}: {e}); "
                   f"delete it and rerun") from None
    if args.train_shards > n_train:
        raise Fail(f"--train-shards {args.train_shards}: the manifest lists only {n_train} train shards")

    for split, count in (("val", n_val), ("train", args.train_shards)):
        tokens = sum(get(base, f"datasets/{DATASET}/fineweb_{split}_{i:06d}.bin", args.out, shard=True)
                     for i in range(count))
        want = stats.get(f"tokens_{split}")
        if count == int(stats[f"files_{split}"]) and want is not None and tokens != int(want):
            raise Fail(f"{split} shards hold {tokens} tokens but the manifest says {want}; delete "
                       f"{os.path.join(args.out, 'datasets', DATASET)} and rerun")
    artifacts = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not artifacts:
        raise Fail(f"{mpath}: tokenizer {tok.get('name')} lists no files; delete it and rerun")
    for rel in artifacts:
        get(base, rel, args.out)
    print(f"done: {n_val} val + {args.train_shards} train shards, tokenizer {tok.get('name')} in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (Fail, OSError) as e:  # OSError: e.g. an unwritable --out
        sys.exit(f"get_data: {e}")
