"""tools/get_data.py against a local HTTP server (127.0.0.1 only) that serves a small fake dataset laid out like the
challenge's Hugging Face repository: full fetch, a train-shard prefix, Range resume of a .part file, a dropped
connection, a corrupt shard header, too many train shards, and a wrong base URL."""
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "get_data.py")
DS = "datasets/fineweb10B_sp1024"
N_VAL, N_TRAIN = 2, 3


def shard_bytes(tokens, magic=20240520, version=1):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def make_remote(root):
    """{relative path under the base URL: bytes}, also written under root/ (the base URL's directory)."""
    rng = np.random.default_rng(0)
    files, tokens = {}, {"val": 0, "train": 0}
    for split, n in (("val", N_VAL), ("train", N_TRAIN)):
        for i in range(n):
            toks = rng.integers(0, 1024, size=3000 + 500 * i)
            tokens[split] += len(toks)
            files[f"{DS}/fineweb_{split}_{i:06d}.bin"] = shard_bytes(toks)
    files["tokenizers/fineweb_1024_bpe.model"] = b"\x0a\x05fake sentencepiece model" * 40
    files["tokenizers/fineweb_1024_bpe.vocab"] = "".join(f"tok{i}\t0\n" for i in range(1024)).encode()
    manifest = {"version": "x", "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
                                                "model_path": "tokenizers/fineweb_1024_bpe.model",
                                                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
                "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "path": DS,
                              "stats": {"files_val": N_VAL, "files_train": N_TRAIN,
                                        "tokens_val": tokens["val"], "tokens_train": tokens["train"]}}]}
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return files


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET of files under server.root with single 'bytes=START-[END]' ranges; server.override[path] = (body,
    declared_length) serves other bytes; every request is logged to server.log as (path, Range header)."""

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        srv.log.append((path, self.headers.get("Range")))
        if path in srv.override:
            body, length = srv.override[path]
        else:
            fpath = os.path.join(srv.root, *path.lstrip("/").split("/"))
            if ".." in path or not os.path.isfile(fpath):
                return self.send_error(404)
            with open(fpath, "rb") as f:
                body = f.read()
            length = len(body)
        rng, status, start = self.headers.get("Range"), 200, 0
        if rng:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) + 1 if last else len(body)
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            status, body, length = 206, body[start:end], length - start
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{start + length}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Overrides conftest.py's torch thread-count fixture here: nothing in this file needs torch (saves its import)."""
    yield


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("remote"))
    files = make_remote(os.path.join(root, "datasets"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.root, srv.log, srv.override, srv.files = root, [], {}, files
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/datasets"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def srv(remote):
    remote.log.clear()
    remote.override.clear()
    yield remote
    remote.override.clear()


def run_tool(srv, out, *args, base=None):
    env = dict(os.environ, PG_DATA_BASE_URL=base or srv.base, no_proxy="*", NO_PROXY="*")  # never via a proxy
    return subprocess.run([sys.executable, TOOL, "--out", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def expected(srv, n_train):
    return {rel for rel in srv.files if "_train_" not in rel or int(rel[-10:-4]) < n_train}


def local_files(out):
    return {os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/") for d, _, fs in os.walk(out) for f in fs}


def assert_same(srv, out, rels):
    for rel in rels:
        with open(os.path.join(out, rel), "rb") as f:
            assert f.read() == srv.files[rel], rel


def test_full_fetch_then_skip(srv, tmp_path):
    r = run_tool(srv, tmp_path, "--train-shards", str(N_TRAIN))
    assert r.returncode == 0, r.stderr
    assert local_files(tmp_path) == expected(srv, N_TRAIN)  # no .part files left behind
    assert_same(srv, tmp_path, expected(srv, N_TRAIN))
    assert os.path.isfile(tmp_path / "datasets/fineweb10B_sp1024/fineweb_val_000001.bin")  # train_gpt.py's layout
    assert os.path.isfile(tmp_path / "tokenizers/fineweb_1024_bpe.model")
    assert len(r.stdout.splitlines()) == len(srv.files) + 1  # one line per file + a summary
    srv.log.clear()
    r = run_tool(srv, tmp_path, "--train-shards", str(N_TRAIN))
    assert r.returncode == 0, r.stderr
    assert srv.log == []  # everything already there: no requests at all


def test_train_shard_prefix(srv, tmp_path):
    r = run_tool(srv, tmp_path, "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    assert local_files(tmp_path) == expected(srv, 2)
    assert_same(srv, tmp_path, expected(srv, 2))
    assert not any("train_000002" in path for path, _ in srv.log)


@pytest.mark.parametrize("have", [1500, None])  # None: a whole-file .part (crash before the rename): 416, refetch
def test_resume_part_file(srv, tmp_path, have):
    rel = f"{DS}/fineweb_train_000001.bin"
    have = have or len(srv.files[rel])
    part = tmp_path / (rel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(srv.files[rel][:have])
    r = run_tool(srv, tmp_path, "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    assert ("/datasets/" + rel, f"bytes={have}-") in srv.log
    assert ("resumed" in r.stdout) == (have < len(srv.files[rel]))
    assert local_files(tmp_path) == expected(srv, 2)
    assert_same(srv, tmp_path, expected(srv, 2))


def test_dropped_connection_keeps_part_then_resumes(srv, tmp_path):
    rel = f"{DS}/fineweb_val_000000.bin"
    data = srv.files[rel]
    srv.override["/datasets/" + rel] = (data[:2000], len(data))  # promises the whole file, sends 2000 bytes
    r = run_tool(srv, tmp_path, "--train-shards", "0")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "rerun to resume" in r.stderr
    assert (tmp_path / (rel + ".part")).stat().st_size == 2000
    srv.override.clear()
    r = run_tool(srv, tmp_path, "--train-shards", "0")
    assert r.returncode == 0, r.stderr
    assert ("/datasets/" + rel, "bytes=2000-") in srv.log
    assert_same(srv, tmp_path, expected(srv, 0))


def test_corrupt_shard_header_refused(srv, tmp_path):
    rel = f"{DS}/fineweb_val_000001.bin"
    bad = bytearray(srv.files[rel])
    bad[0:4] = (12345).to_bytes(4, "little")
    srv.override["/datasets/" + rel] = (bytes(bad), len(bad))
    r = run_tool(srv, tmp_path, "--train-shards", "1")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fineweb_val_000001.bin" in lines[0] and "magic 12345" in lines[0], r.stderr
    assert not (tmp_path / rel).exists() and not (tmp_path / (rel + ".part")).exists()


def test_corrupt_local_shard_refused(srv, tmp_path):
    rel = f"{DS}/fineweb_val_000000.bin"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(srv.files[rel][:-2])  # one token short of what its header says
    r = run_tool(srv, tmp_path, "--train-shards", "0")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and rel in lines[0] and "delete it and rerun" in lines[0], r.stderr


def test_too_many_train_shards_refused(srv, tmp_path):
    r = run_tool(srv, tmp_path, "--train-shards", str(N_TRAIN + 1))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"only {N_TRAIN} train shards" in lines[0], r.stderr
    assert not any(".bin" in path for path, _ in srv.log)
    r = run_tool(srv, tmp_path)  # the default is the challenge's canonical 80 shards
    assert r.returncode != 0 and "--train-shards 80:" in r.stderr, r.stderr


def test_wrong_base_url_refused(srv, tmp_path):
    r = run_tool(srv, tmp_path, base=srv.base + "/nope")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "PG_DATA_BASE_URL" in lines[0], r.stderr
