"""In-process index benchmark: milliseconds per index ``search`` call as the engine makes it, per ivf side-list
setting, at equal recall.

For each ``--side FRACTION:MIN_ITEMS`` (``MMF_IVF_EXACT_FRACTION`` : ``MMF_IVF_EXACT_MIN_ITEMS``) builds the
``--index`` over the item embeddings of a ``bench/serve.py`` artifact, calibrates the search width to
``--target`` recall@20 on the artifact's users (as the service does at start-up), then times ``--users``
other training users' top-20 searches with their training items excluded, one FAISS thread, ``--passes``
times. Prints a Markdown table with the calibrated parameters, the recall of the timed searches against
exact search, and the ms per search of each pass.

    python bench/serve.py --items 100000 --duration 1     # builds bench/.cache/serve-100000-20000 once
    python bench/search.py --side 0:0 --side 0.05:0 --side 0.05:10000 --side 0.1:0

The service's own figures under HTTP load come from bench/serve.py; this isolates the search.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve import exact_top_rows, seen_rows  # noqa: E402  (bench/serve.py, beside this file)

from models.artifacts import EMBEDDINGS  # noqa: E402
from service.index.factory import build_index  # noqa: E402
from service.index.settings import IndexSettings  # noqa: E402
from service.index.threads import use_omp_threads  # noqa: E402

CACHE = Path(os.environ.get("MMF_BENCH_CACHE", ROOT / "bench" / ".cache"))


def side_setting(text: str) -> tuple[float, int]:
    fraction, _, min_items = text.partition(":")
    try:
        return float(fraction), int(min_items or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--side {text!r}: expected FRACTION:MIN_ITEMS, e.g. 0.05:10000") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=CACHE / "serve-100000-20000", help="a bench/serve.py artifact")
    parser.add_argument("--index", choices=["ivf", "hnsw", "flat"], default="ivf")
    parser.add_argument("--side", type=side_setting, action="append", help="FRACTION:MIN_ITEMS (repeatable)")
    parser.add_argument("--target", type=float, default=0.95, help="recall@20 the width is calibrated to")
    parser.add_argument("--users", type=int, default=2000, help="timed queries (training users)")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    embeddings = args.artifact / EMBEDDINGS
    if not embeddings.exists():
        parser.error(f"{embeddings} does not exist: run bench/serve.py with that catalogue size first")
    tensors = load_file(embeddings)
    items, users = tensors["item_embeddings"], tensors["user_embeddings"]
    seen = seen_rows(args.artifact)
    timed = np.random.default_rng(3).choice(len(users), min(args.users, len(users)), replace=False).tolist()
    excluded = {u: set(seen.get(u, ())) for u in timed}  # as the engine passes them: sets
    truth = exact_top_rows(items, users, seen, timed, 20)
    defaults = IndexSettings()
    sides = args.side or [(defaults.ivf_exact_fraction, defaults.ivf_exact_min_items)]

    print(f"{len(items):,} items, {len(timed)} timed users, one FAISS thread; index {args.index}\n")
    print(
        "| exact fraction : min items | parameters | build + calibration s | recall@20 (timed users) | ms per search |"
    )
    print("| --- | --- | ---: | ---: | --- |")
    for fraction, min_items in sides:
        settings = IndexSettings(
            kind=args.index, ivf_exact_fraction=fraction, ivf_exact_min_items=min_items, target_recall=args.target
        )
        start = time.perf_counter()
        index = build_index(settings, items, calibration_queries=users)
        build = time.perf_counter() - start
        use_omp_threads(1)
        passes, answers = [], []
        for _ in range(args.passes):
            start = time.perf_counter()
            answers = [index.search(users[u], 20, exclude=excluded[u]) for u in timed]
            passes.append((time.perf_counter() - start) / len(timed) * 1e3)
        hits = sum(len({r for r, _ in found} & top) for found, top in zip(answers, truth, strict=True))
        params = ", ".join(f"{k} {v}" for k, v in index.params.items() if k != "calibrated_recall")
        ms = " / ".join(f"{p:.3f}" for p in passes)
        print(f"| {fraction} : {min_items} | {params} | {build:.1f} | {hits / (20 * len(timed)):.3f} | {ms} |")


if __name__ == "__main__":
    main()
