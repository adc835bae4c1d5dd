"""The benchmarks still run (tiny data, a couple of steps); no timing is asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.patience import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_train_bench_runs_and_reference_matches(tmp_path: Path) -> None:
    env = {**os.environ, "MMF_BENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "bench/train.py", "--datasets", "tiny", "--steps", "2", "--warmup", "1",
         "--quality", "--target", "0.0", "--quality-seconds", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tiny |")]
    # 2 models x 2 tensors x (ours, authors-style)
    assert len(rows) == 8, out.stdout
    assert "error" not in out.stdout and "differ" not in out.stdout, out.stdout
    assert all(line.split("|")[4].strip() == "fp32" for line in rows)
    assert all(line.split("|")[6].strip().replace(".", "").isdigit() for line in rows)
    quality = [line for line in out.stdout.splitlines() if line.startswith("| metammf_")]
    assert len(quality) == 2 and "not reached" not in out.stdout, out.stdout
    # bf16 rows (autocast runs on CPU too) with a column against the fp32 authors-style step, which runs
    # first whatever the order asked for; tf32 needs CUDA and says so in its rows.
    out = subprocess.run(
        [sys.executable, "bench/train.py", "--datasets", "tiny", "--steps", "2", "--warmup", "1", "--models",
         "metammf_gcn", "--tensors", "cp", "--precisions", "bf16", "tf32", "fp32", "--repeats", "1", "--device",
         "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "| vs authors-style fp32 |" in out.stdout, out.stdout
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| tiny |")]
    assert [(r[4].strip(), r[5].strip()) for r in rows] == [
        (precision, impl) for precision in ("fp32", "bf16", "tf32") for impl in ("ours", "authors-style")
    ], out.stdout
    fp32_ours, fp32_ref, bf16_ours = rows[0], rows[1], rows[2]
    assert fp32_ours[9] == fp32_ours[10], out.stdout  # fp32 against fp32: the same ratio twice
    ratio = float(fp32_ref[6]) / float(bf16_ours[6])  # (from the printed, rounded seconds)
    assert float(bf16_ours[10].strip().rstrip("x")) == pytest.approx(ratio, rel=0.05, abs=0.1), out.stdout
    assert all("error: ValueError: train.precision=tf32 needs a CUDA device" in "|".join(r) for r in rows[4:])


def test_allocator_bench_compares_kept_memory_with_none(tmp_path: Path) -> None:
    env = {**os.environ, "MMF_BENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "bench/allocator.py", "--dataset", "tiny", "--models", "gat", "--steps", "2", "--warmup",
         "1", "--repeats", "1", "--keep-mb", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| gat |")]
    assert [row[1].strip() for row in rows] == ["0", "64"], out.stdout
    assert all(float(row[2]) > 0 for row in rows) and rows[1][-1].strip().endswith("x"), out.stdout


def test_edge_ops_bench_times_both_formulations_of_grcn(tmp_path: Path) -> None:
    env = {**os.environ, "MMF_BENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "bench/edge_ops.py", "--dataset", "tiny", "--steps", "2", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row[0].strip() for row in rows] == [
        "edge scores, fwd + bwd", "weighted sum, fwd + bwd", "GRCN training step"
    ], out.stdout  # fmt: skip
    assert all(float(row[1]) > 0 and float(row[2]) > 0 and row[3].strip().endswith("x") for row in rows)


def test_search_bench_prints_a_row_per_side_list_setting(tmp_path: Path) -> None:
    """bench/search.py on a small stand-in artifact (the two files it reads): one row per --side setting, with
    the side list's size, the calibrated width and the measured recall of the timed searches."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    items = rng.normal(size=(3000, 16)).astype(np.float32) * rng.lognormal(0, 0.5, size=(3000, 1)).astype(np.float32)
    users = rng.normal(size=(300, 16)).astype(np.float32)
    save_file({"item_embeddings": items, "user_embeddings": users}, str(tmp_path / "embeddings.safetensors"))
    np.save(tmp_path / "interactions.npy", np.stack([rng.integers(0, 300, 900), rng.integers(0, 3000, 900)], 1))
    out = subprocess.run(
        [sys.executable, "bench/search.py", "--artifact", str(tmp_path), "--side", "0:0", "--side", "0.05:100",
         "--users", "60", "--passes", "1"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]] for line in out.stdout.splitlines() if "exact_items" in line
    ]
    assert [row[0] for row in rows] == ["0.0 : 0", "0.05 : 100"], out.stdout
    assert "exact_items 0" in rows[0][1] and "exact_items 150" in rows[1][1]
    assert all(float(row[3]) >= 0.85 and float(row[4]) > 0 for row in rows), out.stdout
    bad = subprocess.run(
        [sys.executable, "bench/search.py", "--side", "lots"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "FRACTION:MIN_ITEMS" in bad.stderr


def test_coldstart_bench_serves_held_out_items_as_the_offline_protocol_scores_them(tmp_path: Path) -> None:
    """The end-to-end new-item evaluation on tiny data: real service, items posted over HTTP."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MMF_REDIS_URL", None)
    out = subprocess.run(
        [sys.executable, "bench/coldstart.py", "--config", "configs/synthetic.yaml", "--seeds", "1",
         "--out", str(tmp_path), "--set", "data.synthetic.n_users=300", "--set", "data.synthetic.n_items=200",
         "--set", "train.epochs=3", "--set", "model.content_neighbors=5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:4] for line in out.stdout.splitlines() if line.startswith("| ")
    }
    assert len(rows) == 12, out.stdout  # header + 11 rankings
    # The service answers what the offline protocol computed for the same model, both rankings.
    assert (
        rows["service: new items among themselves (fresh=20)"]
        == rows["offline protocol, same model: new items among themselves"]
    )
    assert rows["service: full catalogue"] == rows["offline protocol, same model: full catalogue"]
    (run,) = json.loads((tmp_path / "results.json").read_text())
    assert 0 < run["service"]["cold"]["recall@20"] <= 1 and 0 <= run["random"]["full"]["recall@20"] < 1
    assert (tmp_path / "seed-2024" / "manifest.json").is_file()


def test_connections_bench_shows_the_limits(artifact) -> None:
    env = {**os.environ, "MMF_HEADER_TIMEOUT_S": "0.5", "MMF_BODY_TIMEOUT_S": "0.5", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "bench/connections.py", "--artifacts", str(artifact.path), "--seconds", "1",
         "--slow-seconds", "4", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in out.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}  # fmt: skip
    assert "connection closed" in rows["48 MB header", "guarded"] or "431" in rows["48 MB header", "guarded"]
    assert "48.0 MB sent" in rows["48 MB header", "stock"]
    assert "idle 200/200, headers 200/200, body 200/200" in rows["600 slow connections", "guarded"]
    assert "idle 0/200, headers 0/200, body 0/200" in rows["600 slow connections", "stock"]
    assert "/healthz per second" in rows["throughput", "guarded"]


def test_train_bench_contention_rows(tmp_path: Path) -> None:
    """``--contention``: each row alone and beside a CPU-bound job, per OpenMP wait policy and thread count."""
    env = {**os.environ, "MMF_BENCH_CACHE": str(tmp_path)}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "bench/train.py", "--contention", "--datasets", "tiny", "--models", "metammf_mf",
         "--tensors", "cp", "--steps", "2", "--warmup", "1", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines() if line.startswith("| tiny")]
    policies = {(r[3], r[4]) for r in rows}
    threads = {r[4] for r in rows}
    assert {p for p, _ in policies} == {"passive", "default (spin, then sleep)", "active (spin)"}, out.stdout
    assert "1" in threads, out.stdout
    assert all(float(r[5]) > 0 and float(r[6]) > 0 and r[7].endswith("x") for r in rows), out.stdout


def test_serve_bench_churn_reference_agrees_with_an_exact_service(artifact, redis_url: str, ns: str) -> None:
    """The churn scenario's pieces (bench/serve.py): items posted in batches, some replaced and deleted, and the
    bench's own exact reference over the artifact's and the online items; a flat index with precomputed lists
    answers exactly, so recall against that reference must be 1."""
    import httpx

    from bench import serve
    from bench.support import free_port, wait_ready

    port, key = free_port(), "bench-test-key"
    env = {**os.environ, "MMF_API_KEY": key, "MMF_REDIS_URL": redis_url, "MMF_NAMESPACE": ns, "MMF_INDEX": "flat",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "service", "run", "--artifacts", str(artifact.path), "--port", str(port),
           "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(server, base, HANG_GUARD_S)
        mirror = serve.OnlineMirror(artifact.path, len(artifact.user_ids), train_items=100_000, batch=40)
        assert mirror.modalities == artifact.modalities
        bodies = [mirror.next_batch(size=40)[1] for _ in range(3)]
        seconds, latencies = serve.post_batches(base, bodies, key)
        assert seconds > 0 and len(latencies) == 3
        replaced, deleted = list(mirror.embeddings)[:5], list(mirror.embeddings)[5:10]
        serve.post_batches(base, [mirror.next_batch(ids=replaced)[1]], key, connections=1)
        with httpx.Client(base_url=base, headers={"X-API-Key": key}) as http:
            for item_id in deleted:
                http.delete(f"/items/{item_id}").raise_for_status()
                del mirror.embeddings[item_id]
            assert http.get("/info").json()["precomputed"]["online_items"] == 115
        catalog = {"users": artifact.user_ids}
        users = list(range(0, len(artifact.user_ids), 7))
        truth = mirror.exact_top(artifact.path, users, 20)
        assert any(any(i.startswith("churn-") for i in top) for top in truth)  # online items do compete
        assert serve.measure_recall(base, catalog, users, truth) == 1.0
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_new_items_bench_times_both_candidate_products_with_the_same_answers(artifact) -> None:
    out = subprocess.run(
        [sys.executable, "bench/new_items.py", "--artifact", str(artifact.path), "--batch", "20", "--batch", "1",
         "--repeats", "1"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["20", "1"], out.stdout
    assert all(float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x") and row[-1] == "yes" for row in rows)
