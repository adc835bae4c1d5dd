"""Bad input: malformed requests, training data and artifacts, each answered with a clear error that
names the problem and stores nothing.

Real components throughout: the tiny trained artifact of ``service_support``, real Redis (the shared one at
127.0.0.1:6379 on a private namespace, or a private ``redis-server`` where a test kills it), real uvicorn
servers (in threads, so several replicas share one interpreter) or real ``python -m service`` processes
where a test needs to SIGKILL or SIGHUP one. docs/reliability.md summarises what each test tries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from models.artifacts import ArtifactError, load_bundle
from tests.patience import HANG_GUARD_S
from tests.reliability_support import (
    copy_artifact,
    rehash,
    service_env,
    truncated_copy,
)
from tests.service_support import (
    AUTH,
    Artifact,
    assert_error,
    n_index,
    no_mmf_environment,  # noqa: F401 (autouse)
)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_feature_values_are_strict_numbers(client: TestClient, artifact: Artifact, stored) -> None:
    """Non-numbers are refused (no coercion of "1.5", true or null), as are values that overflow float32 or
    the fused embedding; ints are numbers. Nothing is written by any refused request."""
    n, saved = n_index(client), stored()
    good = artifact.features(5)
    (m1, d1), (m2, d2) = list(artifact.modalities.items())
    cases = {
        "numeric string": ({**good, m1: ["1.5"] * d1}, [m1, "valid number"]),
        "one numeric string": ({**good, m1: [*good[m1][:-1], "0.25"]}, [m1, str(d1 - 1)]),
        "boolean": ({**good, m1: [True] * d1}, [m1, "valid number"]),
        "one boolean": ({**good, m2: [False, *good[m2][1:]]}, [m2]),
        "null": ({**good, m1: [None, *good[m1][1:]]}, [m1]),
        "object": ({**good, m1: [{"v": 1.0}] * d1}, [m1]),
        "float32 overflow": ({**good, m1: [1e39] * d1}, ["finite"]),
        "fused overflow 1e38": ({m1: [1e38] * d1, m2: [1e38] * d2}, ["too large"]),
        "fused overflow -1e38": ({m1: [-1e38] * d1, m2: [3e38] * d2}, ["too large"]),
        "int too large for float32": ({**good, m1: [10**40] * d1}, ["finite"]),
        "too many modalities": ({f"m{i}": [1.0] for i in range(65)}, ["features"]),
        "odd modality name": ({**good, "vis\u200bual": good[m1]}, ["unknown"]),
    }
    for name, (features, needles) in cases.items():
        r = client.post("/items", json={"item_id": "strict", "features": features}, headers=AUTH)
        assert r.status_code == 422, (name, r.text)
        assert_error(r, 422, *needles)
        batch = {"items": [{"item_id": "fine", "features": good}, {"item_id": "strict", "features": features}]}
        assert client.post("/items:batch", json=batch, headers=AUTH).status_code == 422, name
    raw_cases = {
        "1e400": "1e400",  # parsed as inf
        "huge integer literal": "1" + "0" * 400,  # an int float() cannot hold
        "5000-digit integer": "9" * 5000,  # over Python's int parsing limit: a 400 from the JSON parser
    }
    other = json.dumps(good[m2])
    for name, token in raw_cases.items():
        vec = ", ".join([token] + ["0.5"] * (d1 - 1))
        raw = f'{{"item_id": "strict", "features": {{"{m1}": [{vec}], "{m2}": {other}}}}}'
        r = client.post("/items", content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["detail"], (name, r.text)
        assert len(r.content) < 5000, "the error echoed a huge input back"
    # ints are numbers: an all-integer vector is accepted
    ints = {m: [round(v) for v in vals] for m, vals in good.items()}
    assert n_index(client) == n and stored() == saved and client.get("/items/strict").status_code == 404
    r = client.post("/items", json={"item_id": "ints", "features": ints}, headers=AUTH)
    assert r.status_code == 201, r.text


def test_odd_unicode_and_surrogates_are_4xx(client: TestClient, artifact: Artifact, stored) -> None:
    """Lone surrogates (valid JSON escapes, not valid Unicode) in ids, modality names, values and paths are
    a 422 whose error echo still renders (it made the 422 itself fail with a 500 before), and so are
    invisible and control characters."""
    saved, n = stored(), n_index(client)
    headers = {**AUTH, "Content-Type": "application/json"}
    bodies = {
        "/items": [
            '{"item_id": "\\ud800", "features": {}}',
            '{"item_id": "a", "features": {"\\udfff": [1]}}',
            '{"item_id": "a", "features": {"visual": ["\\ud800"]}}',
            '{"item_id": "a\\u0000b", "features": {}}',
        ],
        "/interactions": ['{"user_id": "\\ud800", "item_id": "3"}', '{"user_id": "u", "item_id": "\\u202e3"}'],
        "/items:batch": ['{"items": [{"item_id": "\\udbff\\udfff\\ud800", "features": {}}]}'],
        "/admin/reload": ['{"artifacts": "\\ud800"}', '{"artifacts": "/no/such\\u0000dir"}'],
    }
    count = 0
    for path, raws in bodies.items():
        for raw in raws:
            r = client.post(path, content=raw.encode(), headers=headers)
            assert r.status_code == 422 and r.json()["detail"], (path, raw, r.text)
            count += 1
    for ident in ("a\u200bb", "\U0001f600", "\u0130", "a\u0301"):
        assert_error(
            client.post("/items", json={"item_id": ident, "features": artifact.features(1)}, headers=AUTH), 422
        )
    for path in ("/items/%ED%A0%80", "/recommend/%FF%FE", "/items/%00/similar", "/recommend/a%0D%0Ab"):
        r = client.get(path)
        assert r.status_code == 422 and r.json()["detail"], path
    assert stored() == saved and n_index(client) == n and count == 9


def test_load_bundle_names_the_broken_file(artifact: Artifact, tmp_path: Path) -> None:
    """Every file the service reads, truncated / emptied / overwritten with garbage *and* the manifest
    edited to match (so checksums pass and the loader itself fails): an ArtifactError naming that file,
    never a SafetensorError, EOFError or FAISS RuntimeError from inside a library."""
    names = ["catalog.json", "config.json", "metrics.json", "embeddings.safetensors", "encoder.safetensors",
             "model.safetensors", "items.faiss", "interactions.npy"]  # fmt: skip
    tried = 0
    for name in names:
        for mode in ("half", "empty", "garbage"):
            broken = truncated_copy(artifact.path, tmp_path / f"{name}-{mode}", name, mode)
            with pytest.raises(ArtifactError) as err:
                load_bundle(broken)
            assert str(broken / name) in str(err.value), (name, mode, str(err.value))
            assert "Traceback" not in str(err.value)
            shutil.rmtree(broken)
            tried += 1
    # checksum mismatch (file changed, manifest not), a listed file missing, no manifest at all
    broken = truncated_copy(artifact.path, tmp_path / "stale", "items.faiss", manifest=False)
    with pytest.raises(ArtifactError, match=r"items\.faiss: checksum mismatch"):
        load_bundle(broken)
    (broken / "items.faiss").unlink()
    with pytest.raises(ArtifactError, match=r"items\.faiss: listed in the manifest but missing"):
        load_bundle(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        load_bundle(broken)
    # well-formed files with wrong contents
    wrong = copy_artifact(artifact.path, tmp_path / "wrong-types")
    catalog = json.loads((wrong / "catalog.json").read_text())
    (wrong / "catalog.json").write_text(json.dumps({**catalog, "items": 5}))
    rehash(wrong)
    with pytest.raises(ArtifactError, match=r"catalog\.json: 'items' must be a list"):
        load_bundle(wrong)
    wrong = copy_artifact(artifact.path, tmp_path / "wrong-encoder")
    weights = load_file(wrong / "encoder.safetensors")
    weights.pop(next(iter(weights)))
    save_file(weights, str(wrong / "encoder.safetensors"))
    rehash(wrong)
    with pytest.raises(ArtifactError, match=r"encoder\.safetensors: weights do not fit"):
        load_bundle(wrong)
    for name, pairs in (("wrong-pairs", np.zeros((3, 3), dtype=np.int64)), ("out-of-range", np.array([[0, 10**6]]))):
        wrong = copy_artifact(artifact.path, tmp_path / name)
        np.save(wrong / "interactions.npy", pairs)
        rehash(wrong)
        with pytest.raises(ArtifactError, match=r"interactions\.npy: (expected an \(n, 2\)|user or item rows out)"):
            load_bundle(wrong)
    assert tried == 24
    assert load_bundle(artifact.path).artifact_id  # and the intact one loads


BATCH = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    results = []
    module, argvs = sys.argv[1], json.loads(sys.argv[2])
    for argv in argvs:
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [f"python -m {module}", *argv]
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException as exc:
                import traceback
                traceback.print_exc()
                code = -1
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    print(json.dumps(results))
    """
)


def bad_data_dirs(root: Path) -> dict[str, tuple[Path, str]]:
    """MMRec data directories broken in one way each -> (directory, file the error must name)."""
    inter = "userID\titemID\tx_label\n0\t0\t0\n0\t1\t1\n0\t2\t2\n1\t1\t0\n1\t0\t1\n1\t2\t2\n"
    good = np.ones((3, 4), dtype=np.float32)

    def make(name: str, inter_text: str | bytes = inter, feats: dict | None = None) -> Path:
        d = root / name
        d.mkdir(parents=True)
        (d / "x.inter").write_bytes(inter_text.encode() if isinstance(inter_text, str) else inter_text)
        for modality, value in (feats or {"image": good}).items():
            if isinstance(value, bytes):
                (d / f"{modality}_feat.npy").write_bytes(value)
            else:
                np.save(d / f"{modality}_feat.npy", value)
        return d

    root.mkdir(parents=True)
    npy = root / "good.npy"
    np.save(npy, good)
    full = npy.read_bytes()
    return {
        "inter not utf-8": (make("a", b"\xff\xfe\x00garbage"), "x.inter"),
        "inter without header columns": (make("b", "user item\n0 1\n"), "x.inter"),
        "inter non-integer id": (make("c", inter.replace("1\t2\t2", "1\tabc\t2")), "x.inter"),
        "inter ragged row": (make("d", inter + "1\t2\n"), "x.inter"),
        "npy truncated": (make("e", feats={"image": full[:-5]}), "image_feat.npy"),
        "npy header only": (make("f", feats={"image": full[:60]}), "image_feat.npy"),
        "npy garbage": (make("g", feats={"image": b"garbage bytes"}), "image_feat.npy"),
        "npy empty file": (make("h", feats={"image": b""}), "image_feat.npy"),
        "npy object array": (make("i", feats={"image": np.array([{"a": 1}] * 3, dtype=object)}), "image_feat.npy"),
        "npy 3-d": (make("j", feats={"image": np.ones((3, 4, 1), np.float32)}), "image_feat.npy"),
        "npy NaN": (make("k", feats={"image": np.full((3, 4), np.nan, np.float32)}), "image_feat.npy"),
        "npy float64 overflow": (make("l", feats={"image": np.full((3, 4), 1e300)}), "image_feat.npy"),
        "item counts differ": (make("m", feats={"image": good, "text": np.ones((4, 2), np.float32)}), "text_feat.npy"),
        "fewer items than ids": (make("n", feats={"image": np.ones((2, 4), np.float32)}), "image_feat.npy"),
    }


def test_cli_bad_training_inputs_and_broken_artifacts(artifact: Artifact, redis_url: str, tmp_path: Path) -> None:
    """``python -m training train --data BAD`` and ``python -m service run/check --artifacts BROKEN``: exit
    status 2 and one ``error:`` line naming the file, no traceback. Each command list runs in one
    interpreter (runpy, exactly what ``python -m`` does), the two interpreters side by side."""
    data_cases = bad_data_dirs(tmp_path / "data")
    train_argvs = [["train", "--data", str(d), "--out", str(tmp_path / "never"), "--no-progress"]
                   for d, _ in data_cases.values()]  # fmt: skip
    arts = tmp_path / "arts"
    art_cases = {
        "no manifest": (copy_artifact(artifact.path, arts / "no-manifest"), "manifest.json"),
        "listed file missing": (copy_artifact(artifact.path, arts / "no-faiss"), "items.faiss"),
        "checksum mismatch": (truncated_copy(artifact.path, arts / "stale", "embeddings.safetensors", manifest=False),
                              "embeddings.safetensors"),
    }  # fmt: skip
    (arts / "no-manifest" / "manifest.json").unlink()
    (arts / "no-faiss" / "items.faiss").unlink()
    for name in ("embeddings.safetensors", "encoder.safetensors", "model.safetensors", "items.faiss",
                 "interactions.npy", "catalog.json"):  # fmt: skip
        art_cases[f"{name} truncated, manifest matching"] = (truncated_copy(artifact.path, arts / name, name), name)
    service_argvs = [["run", "--artifacts", str(p), "--port", "1"] for p, _ in art_cases.values()]
    service_argvs.append(["check", "--artifacts", str(arts / "items.faiss"), "--redis-url", redis_url])
    service_argvs.append(["check", "--artifacts", str(arts / "missing"), "--redis-url", redis_url])
    env = service_env(MMF_REDIS_URL=redis_url, MMF_NAMESPACE="never-used")
    procs = [
        subprocess.Popen([sys.executable, "-c", BATCH, module, json.dumps(argvs)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for module, argvs in (("training", train_argvs), ("service", service_argvs))
    ]  # fmt: skip
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    expected = [*data_cases.items(), *art_cases.items(), ("check: faiss truncated", (None, "items.faiss")),
                ("check: no directory", (None, "missing/manifest.json"))]  # fmt: skip
    for (name, (_, file)), result in zip(expected, outputs[0] + outputs[1], strict=True):
        stderr = result["stderr"]
        assert result["code"] == 2, (name, result)
        assert "Traceback" not in stderr and "Traceback" not in result["stdout"], (name, stderr)
        error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1 and file in error_lines[0], (name, stderr)
    assert not (tmp_path / "never").exists()
