"""Fault tests of the hidden-state store with real processes.

* A real stage-1 cache run (MiniLM on a slice of the bundled MovieLens items) is killed with
  SIGKILL at three points chosen by a seed, resumed each time, and must end with arrays equal
  byte for byte to an uninterrupted run.
* A truncated and a corrupted shard file are detected on open and rewritten alone.
* Two cooperating writers on distinct shards lose nothing; an unrelated writer is refused;
  a writer killed with SIGKILL releases its lock.

Every cache run is a child forked from one "zygote" process that imported torch and loaded
the encoder once, with one torch thread (byte-equal floats need the same thread count; one
thread is also ~20x faster than two on a busy 2-core machine).
Seed: ``MMCACHE_FAULT_SEED`` (default 20240521); the chosen points are printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StoreCorruptError, StoreIncompleteError, StoreLockedError
from stores.hidden_states import HiddenStateStore, StoreSpec, writer

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("MMCACHE_FAULT_SEED", "20240521"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": str(ROOT)}

# A "zygote": one process imports torch and the pipeline and loads the encoder once, then
# forks one child per cache run (saves ~10 s of imports and model loading per run on this
# 2-core machine). A child runs the real pipeline.cache.cache_all, optionally killing itself
# with SIGKILL at one point, and the zygote reports how it ended.
ZYGOTE = textwrap.dedent(r"""
    import json, os, signal, sys, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import pipeline.cache as pc
    from pipeline.encoders import preset, load_encoder
    from stores.hidden_states import HiddenStateStore
    import zarr.storage._local as zlocal

    ENC = preset("minilm").model_copy(update={"batch_size": 2})
    MODEL = load_encoder(ENC)

    def install(phase, k):
        count = {"n": 0}

        def die_at_k():
            count["n"] += 1
            if count["n"] == k:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        def after(cls, name):  # run the real step, then maybe die
            orig = getattr(cls, name)
            def wrapped(*a, **kw):
                out = orig(*a, **kw)
                die_at_k()
                return out
            setattr(cls, name, wrapped)

        if phase == "encode":        # mid-forward: inside the encoder, k-1 shards finished
            marks, calls = {"n": 0}, {"n": 0}
            orig_mark = HiddenStateStore._mark_done
            def mark(self, shard):
                orig_mark(self, shard)
                marks["n"] += 1
            HiddenStateStore._mark_done = mark
            def pre_hook(module, args):  # every module's forward, the whole model's included
                if marks["n"] >= k - 1:
                    calls["n"] += 1
                    if calls["n"] == 30:  # a few blocks into a forward pass
                        os.kill(os.getpid(), signal.SIGKILL)
            torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
        elif phase == "rename":      # shard file fully written to its temp name, not renamed
            orig_move = zlocal._move_with_retry
            def move(tmp, path, how):
                if "/hidden_states/c/" in str(path):
                    die_at_k()
                return orig_move(tmp, path, how)
            zlocal._move_with_retry = move
        elif phase == "data":        # data durable, no digest, no done flag
            after(HiddenStateStore, "_fsync_shard")
        elif phase == "digest":      # digest recorded, no done flag
            after(HiddenStateStore, "_write_digest")
        elif phase == "done":        # clean boundary: k shards finished
            after(HiddenStateStore, "_mark_done")

    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                install(cmd["phase"], cmd["k"])
                pc.load_encoder = lambda spec: MODEL  # the model loaded once, above
                cfg = pc.CacheConfig(tables_dir=Path(cmd["tables"]), store_dir=Path(cmd["stores"]),
                                     encoder=ENC, items_per_shard=4, items_per_chunk=2)
                res = pc.cache_all(cfg)
                print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "config"},
                                             default=str), flush=True)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        print("EXIT " + json.dumps({"signal": sig, "code": code}), flush=True)
""")

PHASES = ["encode", "rename", "data", "digest", "done"]


class Zygote:
    def __init__(self, log: Path) -> None:
        self.log = log
        self.err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        assert self.proc.stdout.readline().strip() == "READY", self.stderr()

    def stderr(self) -> str:
        self.err.flush()
        return self.log.read_text()[-3000:]

    def run(self, tables: Path, stores: Path, phase: str = "none", k: int = 0) -> dict:
        """One cache run in a fresh child: {"signal", "code", "result" (or None)}."""
        self.proc.stdin.write(json.dumps({"tables": str(tables), "stores": str(stores),
                                          "phase": phase, "k": k}) + "\n")
        self.proc.stdin.flush()
        out: dict = {"result": None}
        t0 = time.monotonic()
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the zygote died: {self.stderr()}"
            assert time.monotonic() - t0 < 300, "a cache run took over 300 s"
            if line.startswith("RESULT "):
                out["result"] = json.loads(line[len("RESULT "):])
            elif line.startswith("EXIT "):
                out.update(json.loads(line[len("EXIT "):]))
                return out

    def ok(self, tables: Path, stores: Path) -> dict:
        out = self.run(tables, stores)
        assert out["code"] == 0 and out["result"], self.stderr()
        return out["result"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.log")
    yield z
    z.close()


def the_store(stores: Path) -> Path:
    (path,) = stores.glob("*.zarr")
    return path


def data_files(store: Path) -> dict[str, Path]:
    root = store / "hidden_states" / "c"
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def array_bytes(store: Path) -> dict[str, bytes]:
    """Every array's chunk files (data, ids, shard flags and digests), by relative path."""
    out = {}
    for name in ("hidden_states", "item_id", "layer_index", "shard_done", "shard_digest",
                 "shard_checksum"):
        for p in sorted((store / name).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(store))] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def reference(small_tables, tmp_path_factory, zygote):
    """An uninterrupted cache run: (store path, its arrays, its chunk-file bytes)."""
    stores = tmp_path_factory.mktemp("reference")
    res = zygote.ok(small_tables, stores)
    assert res["complete"] is True and res["shards_written"] == res["num_shards"] >= 8
    path = the_store(stores)
    return path, HiddenStateStore.open(path).read(), array_bytes(path)


def test_killed_three_times_then_resumed_equals_uninterrupted(small_tables, reference, zygote,
                                                              tmp_path):
    ref_path, ref_arr, ref_bytes = reference
    rng = random.Random(SEED)
    points = [(phase, rng.randint(1, 2)) for phase in rng.sample(PHASES, 3)]
    print(f"MMCACHE_FAULT_SEED={SEED}: SIGKILL at {points}")
    stores = tmp_path / "stores"
    done_before = 0
    for phase, k in points:
        files_before = {}
        if stores.exists():
            files_before = {f: (f.stat().st_ino, f.stat().st_mtime_ns)
                            for f in the_store(stores).glob("hidden_states/c/**/*") if f.is_file()}
        out = zygote.run(small_tables, stores, phase, k)
        assert out["signal"] == signal.SIGKILL, (phase, k, out, zygote.stderr())
        path = the_store(stores)
        with pytest.raises(StoreIncompleteError, match="half written"):
            HiddenStateStore.open(path)  # every reader sees a half-written store
        st = HiddenStateStore.open(path, require_complete=False)
        done_now = int(st.done_mask().sum())
        finished = k if phase == "done" else k - 1
        if phase == "encode":  # the background writer may finish one more shard meanwhile
            assert done_before + finished <= done_now <= done_before + finished + 1, (phase, k)
        else:
            assert done_now == done_before + finished, (phase, k)
        killed = st.shard_files(st.pending_shards()[0])[0]
        partial = list(path.rglob("*.partial"))
        if phase == "rename":  # the whole shard sat in a temp file, never renamed into place
            assert len(partial) == 1 and "hidden_states" in str(partial[0])
            # the shard's file is absent, or still the one an earlier killed run left
            assert not killed.exists() or files_before.get(killed) == (
                killed.stat().st_ino, killed.stat().st_mtime_ns)
        else:
            assert not partial
        if phase in ("data", "digest"):  # the bytes reached the file, the flag did not
            assert killed.exists() and files_before.get(killed) != (
                killed.stat().st_ino, killed.stat().st_mtime_ns)
        done_before = done_now
    res = zygote.ok(small_tables, stores)  # the resume
    assert res["rewritten_corrupt"] == [] and res["shards_written"] == res["num_shards"] - done_before
    path = the_store(stores)
    assert not list(path.rglob("*.partial")), "a killed writer's temp file was left behind"
    st = HiddenStateStore.open(path, verify=True)
    np.testing.assert_array_equal(st.read(), ref_arr)
    assert array_bytes(path) == ref_bytes


def test_truncated_and_corrupted_shards_detected_and_rewritten_alone(small_tables, reference,
                                                                      zygote, tmp_path):
    import shutil
    ref_path, ref_arr, ref_bytes = reference
    stores = tmp_path / "stores"
    stores.mkdir()
    path = stores / ref_path.name
    shutil.copytree(ref_path, path)
    files = data_files(path)
    keys = sorted(files)
    a, b = keys[1], keys[-2]
    files[a].write_bytes(files[a].read_bytes()[:100])        # truncated
    raw = bytearray(files[b].read_bytes())
    raw[len(raw) // 3] ^= 0x40                               # one flipped bit in the data
    files[b].write_bytes(bytes(raw))
    shard_a, shard_b = int(a.split("/")[0]), int(b.split("/")[0])
    with pytest.raises(StoreCorruptError, match=rf"shards \[{shard_a}, {shard_b}\]"):
        HiddenStateStore.open(path, verify=True)
    before = {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in files.items()}
    res = zygote.ok(small_tables, stores)
    assert res["rewritten_corrupt"] == [shard_a, shard_b]
    assert res["pending"] == [shard_a, shard_b] and res["shards_written"] == 2
    after = {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in data_files(path).items()}
    changed = sorted(k for k in after if after[k] != before[k])
    assert changed == [a, b]  # only the two bad shard files were rewritten
    np.testing.assert_array_equal(HiddenStateStore.open(path, verify=True).read(), ref_arr)
    assert array_bytes(path) == ref_bytes


# ------------------------------------------------------------------------ concurrent writers
IDS = np.arange(100, 140, dtype=np.int64)  # 40 items, 10 shards of 4


def spec() -> StoreSpec:
    return StoreSpec(items_fingerprint="f" * 64, modality="text", library="transformers",
                     model_id="org/model", weights_fingerprint="w" * 64, pretrained=True,
                     num_model_layers=6, layer_indices=(0, 2, 4, 6), layer_policy="symmetric",
                     pooling="mean", max_length=30, hidden_dim=16)


def shard_values(shard: int, rows: int) -> np.ndarray:
    return np.random.default_rng(shard).standard_normal((rows, 4, 16)).astype(np.float16)


WRITER = textwrap.dedent(r"""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from stores.hidden_states import HiddenStateStore
    path, run_id, name, shards = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    sync = Path(path).parent
    st = HiddenStateStore.open(path, mode="w", run_id=run_id)
    (sync / f"ready-{name}").touch()
    while not (sync / "go").exists():
        time.sleep(0.01)
    wrote = []
    for s in st.claim_pending(shards):
        a, b = st.shard_range(s)
        time.sleep(0.02)  # keep both writers busy at the same time
        st.write_shard(s, np.random.default_rng(s).standard_normal((b - a, 4, 16)).astype(np.float16))
        wrote.append(s)
    st.close()
    print("WROTE " + json.dumps(wrote))
""")


def start_writer(path: Path, run_id: str, name: str, shards: list[int]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), run_id, name,
                             json.dumps(shards)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(*files: Path, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not all(f.exists() for f in files):
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {files}"
        time.sleep(0.02)


@pytest.mark.parametrize("split", ["distinct", "overlapping"])
def test_two_cooperating_writers_lose_nothing(tmp_path, split):
    path = tmp_path / "s.zarr"
    with writer(path, spec(), IDS, items_per_shard=4, items_per_chunk=2) as st:
        n_shards = st.num_shards
    if split == "distinct":  # each writer owns its own shards
        lists = [list(range(0, n_shards, 2)), list(range(1, n_shards, 2))]
    else:                    # both are given every shard: claims split the work
        lists = [list(range(n_shards)), list(range(n_shards))]
    procs = [start_writer(path, "run-42", n, l) for n, l in zip("AB", lists)]
    try:
        wait_for(tmp_path / "ready-A", tmp_path / "ready-B")
        # both joined run-42; anyone else is refused, with the run named
        with pytest.raises(StoreLockedError, match="run-42"):
            HiddenStateStore.open(path, mode="w")
        with pytest.raises(StoreLockedError, match="run-42"):
            HiddenStateStore.open(path, mode="w", run_id="another-run")
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    wrote = [json.loads(o.split("WROTE ")[1]) for o, _ in outs]
    assert set(wrote[0]).isdisjoint(wrote[1]), wrote          # no shard written twice
    assert sorted(wrote[0] + wrote[1]) == list(range(n_shards))
    if split == "overlapping":
        assert wrote[0] and wrote[1], wrote                   # both did some of the work
    st = HiddenStateStore.open(path, verify=True)
    expected = np.concatenate([shard_values(s, 4) for s in range(n_shards)])
    np.testing.assert_array_equal(st.read(), expected)
    # the run is over: an exclusive writer may take the store again
    HiddenStateStore.open(path, mode="w").close()


def test_second_writer_refused_until_the_holder_dies(tmp_path):
    path = tmp_path / "s.zarr"
    with writer(path, spec(), IDS, items_per_shard=4):
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time; from pathlib import Path
            from stores.hidden_states import HiddenStateStore
            st = HiddenStateStore.open({str(path)!r}, mode="w")
            Path({str(tmp_path / 'held')!r}).touch()
            time.sleep(120)
        """)], cwd=ROOT, env=ENV)
    try:
        wait_for(tmp_path / "held")
        with pytest.raises(StoreLockedError, match=rf"another process is writing this store "
                                                   rf"\(pid={holder.pid} "):
            HiddenStateStore.open(path, mode="w")
        with pytest.raises(StoreLockedError, match=f"pid={holder.pid}"):
            HiddenStateStore.open(path, mode="w", run_id="some-run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    HiddenStateStore.open(path, mode="w").close()  # the OS released the dead holder's lock
