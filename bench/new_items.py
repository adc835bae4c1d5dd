"""What fusing a batch of new items costs in-process, with the content-neighbour search's candidate product in
float32 and in bfloat16, side by side.

``POST /items:batch`` fuses each new item through the artifact's encoder (``InferenceEncoder.encode_items``),
whose largest part is the exact search of each item's nearest trained items by content
(``models/metammf/neighbor_search.py``). The search picks candidates with a (batch x trained items) product,
in bfloat16 where the CPU has bfloat16 instructions and in float32 otherwise, and proves them exact: the two
precisions give the same neighbours. This bench loads an artifact (by default the serving bench's 1M-item one,
``bench/serve.py``, built if missing), draws new items' features from the synthetic generator as that bench
does, and times for each batch, alternating the two precisions: the search alone and the whole
``encode_items``. It checks that both precisions return the same neighbours and the same embeddings, and prints
a Markdown table (medians over ``--repeats`` rounds, one thread unless ``--threads``).

    python bench/new_items.py                      # the serving bench's 1M-item artifact, batches of 500
    python bench/new_items.py --artifact artifacts/tiktok --batch 500 --batch 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="artifact directory (default: the serving bench's 1M items)")
    parser.add_argument("--batch", type=int, action="append", help="items per batch (repeatable; default 500)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per precision (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from bench.serve import build_artifact, synthetic_config, synthetic_item_features
    from models.artifacts import load_bundle
    from models.metammf.cold_items import content_keys
    from models.metammf.neighbor_search import SearchKeys, nearest

    torch.set_num_threads(args.threads)
    path = args.artifact or build_artifact(1_000_000, 20_000)
    bundle = load_bundle(path)
    encoder = bundle.encoder
    keys = encoder.neighbor_keys
    k = max(encoder.config.content_neighbors, encoder.config.new_item_graph_k)
    if keys.shape[0] == 0 or k == 0:
        raise SystemExit(f"{path}: the model has no content neighbours or item graph: nothing to search")
    prepared = {dtype: SearchKeys.of(keys, dtype) for dtype in (torch.float32, torch.bfloat16)}
    dim = sum(bundle.modalities.values())
    print(
        f"{path}: {keys.shape[0]:,} trained items' content keys of {dim} dimensions, k = {k}, "
        f"{args.threads} thread(s), {args.repeats} rounds",
        file=sys.stderr,
    )

    rows = []
    for batch in args.batch or [500]:
        if args.artifact is None:
            features = next(synthetic_item_features(synthetic_config(100_000, 20_000), batch, seed=3, chunk=batch))
        else:  # the artifact's own catalogue is unknown here: standard normal features of its width
            features = np.random.default_rng(3).standard_normal((batch, dim)).astype(np.float32)
        features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        queries = content_keys(encoder.fusion.standardize(features))
        times = {(part, dtype): [] for part in ("search", "encode") for dtype in prepared}
        answers, embeddings = {}, {}
        for _ in range(args.repeats):
            for dtype, keys_prepared in prepared.items():  # alternated: both see the same load
                start = time.perf_counter()
                answers[dtype] = nearest(queries, keys_prepared, k)
                times["search", dtype].append(time.perf_counter() - start)
                encoder.prepare_search(dtype)
                start = time.perf_counter()
                embeddings[dtype] = encoder.encode_items(features)[0]
                times["encode", dtype].append(time.perf_counter() - start)
        same = torch.equal(answers[torch.float32], answers[torch.bfloat16]) and torch.equal(
            embeddings[torch.float32], embeddings[torch.bfloat16]
        )
        median = {key: statistics.median(values) * 1000 for key, values in times.items()}
        rows.append((batch, median, same))

    print("| batch | search fp32 ms | search bf16 ms | ratio | encode_items fp32 ms | encode_items bf16 ms | ratio "
          "| items/s (bf16) | same answers |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    f32, b16 = torch.float32, torch.bfloat16
    for batch, m, same in rows:
        print(
            f"| {batch} | {m['search', f32]:.1f} | {m['search', b16]:.1f} | {m['search', f32] / m['search', b16]:.2f}x "
            f"| {m['encode', f32]:.1f} | {m['encode', b16]:.1f} | {m['encode', f32] / m['encode', b16]:.2f}x "
            f"| {batch / m['encode', b16] * 1000:,.0f} | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
