"""Training benchmark: seconds per 100 steps of 3000 triples, triples/s, peak memory, time to quality.

Each row is the median step of ``--steps`` timed steps, best of ``--repeats`` runs that alternate the two
implementations (so both see the same background load), each run in its own subprocess (so peak memory is
its own). Rows, for every combination asked for:

* data sets: ``tiktok`` (the real set in ``--tiktok``), and synthetic sets at the paper's scale,
  ``paper-tiktok`` (36,656 users, 76,085 items, ~726k interactions, 128+128+128-d) and
  ``paper-movielens`` (55,485 users, 5,986 items, ~1.24M interactions, 2048+128+100-d, 4-layer tower
  2276-1024-512-256-32); generated once and cached under bench/.cache;
* models: MetaMMF_GCN and MetaMMF_MF, CP (rank 16) and full meta tensor;
* implementation: ``ours`` (the project's models) and, where its per-item matrices fit in memory (not on the
  paper-scale sets), ``authors-style``: the same
  parameters and loss computed the way the original code does it (a materialised per-item weight matrix
  W_i and a batched matrix product per step, PyG ``SAGEConv`` scatter aggregation over ``edge_index``).
  Both compute the same loss (checked in the run); the speed-up column is their ratio, measured side by
  side on the same machine in the same run, at the row's precision. With ``--precisions fp32 bf16`` a further
  column gives each of our rows against the authors-style step in fp32 (their code's precision).

``--quality`` adds time-to-quality rows on the first of ``--datasets``: wall time (training steps + the
per-epoch validation that early stopping needs; the test evaluation used to detect the target is not
counted) until test Recall@20 first reaches ``--target`` (0.068, the best test Recall@20 of the original
code on the TikTok set), with the settings of configs/tiktok-metammf_gcn.yaml. Everything here trains the paper's model:
configs/tiktok-metammf_gcn.yaml's new-item settings (``models/metammf/cold_items.py``) are turned off.

    python bench/train.py                                    # CPU, all data sets, timing rows
    python bench/train.py --datasets tiktok --quality        # + time to Recall@20 >= 0.068
    python bench/train.py --device cuda --datasets paper-tiktok paper-movielens
    python bench/train.py --contention --datasets tiktok --models metammf_gcn --tensors cp   # a shared CPU

On a GPU the table adds the paper's Table 4 minutes per epoch (MetaMMF_GCN, CP, TITAN Xp) and the speed-up
against it for the paper-scale rows.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.hardware import choose_openmp_wait, usable_cpus  # noqa: E402

OPENMP_WAIT = choose_openmp_wait()  # as the training entry points do, before torch loads OpenMP (children inherit it)

import torch  # noqa: E402

from models.base import RecModel, bpr_loss, l2_penalty  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.metammf.gcn import MetaMMF_GCN  # noqa: E402
from models.metammf.mf import MetaMMF_MF  # noqa: E402
from models.registry import get_spec, parse_model_config  # noqa: E402
from training.allocator import keep_freed_memory  # noqa: E402
from training.config import TrainConfig, load_run_config  # noqa: E402
from training.data import RecData, load_mmrec, save_mmrec  # noqa: E402
from training.precision import PRECISIONS, run_precision, step_precision  # noqa: E402
from training.sampling import BPRSampler  # noqa: E402
from training.synthetic import SyntheticConfig, generate_synthetic  # noqa: E402
from training.trainer import build_model, cpu_threads, evaluate_split, make_optimizer, seed_everything  # noqa: E402

CACHE = Path(os.environ.get("MMF_BENCH_CACHE", ROOT / "bench" / ".cache"))  # generated data sets
BATCH = 3000
# Paper, Table 4: MetaMMF_GCN (CP) minutes per epoch on a TITAN Xp.
PAPER_MINUTES_PER_EPOCH = {"paper-tiktok": 5.08, "paper-movielens": 11.69}
SYNTHETIC_SETS = {
    "tiny": SyntheticConfig(name="tiny", n_users=300, n_items=200, interactions_per_user=12, seed=0),  # smoke tests
    "paper-tiktok": SyntheticConfig(
        name="paper-tiktok", n_users=36_656, n_items=76_085, interactions_per_user=726_065 / 36_656,
        modality_dims={"visual": 128, "acoustic": 128, "textual": 128}, n_groups=5, seed=0,
    ),
    "paper-movielens": SyntheticConfig(
        name="paper-movielens", n_users=55_485, n_items=5_986, interactions_per_user=1_239_508 / 55_485,
        modality_dims={"visual": 2048, "acoustic": 128, "textual": 100}, n_groups=5, seed=0,
    ),
}  # fmt: skip
FUSION_LAYERS = {"paper-movielens": 4}


def load_dataset(name: str, tiktok: Path) -> RecData:
    if name == "tiktok":
        return load_mmrec(tiktok, cold_users="keep")
    path = CACHE / name
    if not (path / f"{name}.inter").is_file():
        print(f"generating {name} in {path} (once) ...", file=sys.stderr)
        save_mmrec(generate_synthetic(SYNTHETIC_SETS[name]), path)
    return load_mmrec(path)


def reference_feasible(data: RecData, config: ModelConfig) -> bool:
    """The authors-style step materialises (n_items, d_in, d_out) per layer: skip it beyond ~2 GB."""
    from models.metammf.fusion import tower_widths

    widths = tower_widths(data.item_features().shape[1], config.fused_dim, config.fusion_layers)
    return data.n_items * max(a * b for a, b in itertools.pairwise(widths)) * 4 < 2 * 2**30


# The paper's model: configs/tiktok-metammf_gcn.yaml's new-item training (models/metammf/cold_items.py) off, so
# that both implementations compute the same loss, for the MF backbone too.
PAPER_NEW_ITEMS = [
    "model.untrained_items=id",
    "model.isolated_nodes=zeros",
    "model.cold_item_dropout=0",
    "model.content_neighbors=0",
]


def model_config(dataset: str, model: str, tensor: str) -> ModelConfig:
    # the tuned settings, on every data set; the served default (metammf_lightgcn) as configs/tiktok.yaml trains it
    if model == "metammf_lightgcn":
        base = load_run_config(ROOT / "configs" / "tiktok.yaml").model
    else:
        base = load_run_config(ROOT / "configs" / "tiktok-metammf_gcn.yaml", PAPER_NEW_ITEMS).model
    settings = {"name": model, "tensor": tensor, "fusion_layers": FUSION_LAYERS.get(dataset, base.fusion_layers)}
    return parse_model_config({**base.model_dump(), **settings}, ignore_other_settings=True)


# -- the original code's way of computing the same loss ------------------------------------------------
def _fused_by_materialised_weights(model: RecModel) -> torch.Tensor:
    """e^m for every item with an explicit per-item W_i (n_items, d_in, d_out) and torch.bmm."""
    fusion = model.items.fusion
    x = model.items.item_inputs
    s = fusion.meta_information(x)
    h = x
    for n, layer in enumerate(fusion.layers):
        h = torch.bmm(h.unsqueeze(1), layer.item_weight(s)).squeeze(1)
        if n < len(fusion.layers) - 1:
            h = fusion.activation(h)
    return h


def authors_style_loss(model: RecModel, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    item_ego = torch.cat([_fused_by_materialised_weights(model), model.items.id_embedding.weight], dim=1)
    if isinstance(model, MetaMMF_MF):
        u, p, q = model.user_embedding(users), item_ego[pos], item_ego[neg]
    else:
        graph = model.graph
        states = [torch.cat([model.user_embedding.weight, item_ego])]
        for layer, conv in enumerate(graph.convs):  # PyG scatter-mean message passing over edge_index
            states.append(graph._activate(layer, conv(states[-1], model.edge_index)))
        final = torch.stack(states).mean(0) if graph.layer_combine == "mean" else states[-1]
        u, p, q = final[users], final[model.n_users + pos], final[model.n_users + neg]
    loss = bpr_loss((u * p).sum(-1), (u * q).sum(-1))
    if isinstance(model, MetaMMF_GCN) and model.config.reg_target == "ego":
        return loss + model.reg_weight * l2_penalty(model.user_embedding(users), item_ego[pos], item_ego[neg])
    return loss + model.reg_weight * l2_penalty(u, p, q)


# -- one row, in its own process -------------------------------------------------------------------------
def measure_steps(spec: dict) -> dict:
    """One row's step timing, with the threads a training run would use (``spec["threads"]``: a fixed count)."""
    with (
        cpu_threads(spec.get("threads"), torch.device(spec["device"])),
        run_precision(spec["precision"], spec["device"]),
    ):
        return _measure_steps(spec)


def _measure_steps(spec: dict) -> dict:
    device = torch.device(spec["device"])
    data = load_dataset(spec["dataset"], Path(spec["tiktok"]))
    seed_everything(0)
    config = model_config(spec["dataset"], spec["model"], spec["tensor"])
    model = build_model(data, config, reg_weight=1e-2).to(device)
    optimizer = make_optimizer(model, 1e-3)
    batches = BPRSampler(data.train, data.n_items, BATCH, seed=0).epoch()
    reference = spec["impl"] == "authors-style"
    if reference and not reference_feasible(data, config):
        raise SystemExit("authors-style step does not fit in memory for this data set")
    loss_fn = (lambda *b: authors_style_loss(model, *b)) if reference else model.calculate_loss

    def step() -> float:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = BPRSampler(data.train, data.n_items, BATCH, seed=1).epoch()
            batch = next(batches)
        users, pos, neg = (torch.from_numpy(a).to(device) for a in batch)
        with step_precision(spec["precision"], device):
            loss = loss_fn(users, pos, neg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    same = 0.0
    if reference:  # same parameters, same loss: the two implementations are the same model
        with torch.no_grad():
            first = next(BPRSampler(data.train, data.n_items, BATCH).epoch())
            probe = [torch.from_numpy(a[:256]).to(device) for a in first]
            same = abs(authors_style_loss(model, *probe).item() - model.calculate_loss(*probe).item())
    for _ in range(spec["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []  # per step: loss.item() synchronises, so this holds on a GPU too
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    while len(times) < spec["steps"] and (len(times) < 3 or time.perf_counter() - start < spec["max_seconds"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    # The median step: robust to bursts of other load on a shared machine.
    seconds = float(np.median(times))
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()
    return {
        **spec, "s_per_100_steps": 100 * seconds, "triples_per_s": BATCH / seconds, "peak_mb": peak / 2**20,
        "timed_steps": len(times), "loss_gap": same, "n_train": len(data.train),
        "steps_per_epoch": -(-len(data.train) // BATCH),
        "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / len(times),
        "kernel_s_per_step": (after.ru_stime - before.ru_stime) / len(times), "threads_used": torch.get_num_threads(),
    }  # fmt: skip


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_quality(spec: dict) -> dict:
    """Wall time to test Recall@20 >= target with the project's trainer settings (configs/tiktok-metammf_gcn.yaml)."""
    data = load_dataset(spec["dataset"], Path(spec["tiktok"]))
    settings = get_spec(spec["model"]).config.model_fields
    paper = [o for o in PAPER_NEW_ITEMS if o.partition("=")[0].removeprefix("model.") in settings]  # MF: fewer
    run = load_run_config(ROOT / "configs" / "tiktok-metammf_gcn.yaml", [*paper, f"model.name={spec['model']}"])
    cfg: TrainConfig = run.train.model_copy(
        update={"progress": False, "device": spec["device"], "precision": spec["precision"]}
    )
    with run_precision(cfg.precision, cfg.device):
        return _measure_quality(spec, data, run.model, cfg)


def _measure_quality(spec: dict, data: RecData, model_config: ModelConfig, cfg: TrainConfig) -> dict:
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    model = build_model(data, model_config, cfg.reg_weight).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    sampler = BPRSampler(data.train, data.n_items, cfg.batch_size, seed=cfg.seed)
    clock, epoch, best = 0.0, 0, 0.0
    while clock < spec["max_seconds"]:
        epoch += 1
        start = time.perf_counter()
        model.train()
        for batch in sampler.epoch():
            with step_precision(cfg.precision, device):
                loss = model.calculate_loss(*(torch.from_numpy(a).to(device) for a in batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        valid = evaluate_split(model, data, "valid", cfg).metrics["recall@20"]
        clock += time.perf_counter() - start
        test = evaluate_split(model, data, "test", cfg).metrics["recall@20"]  # not on the clock
        best = max(best, test)
        if test >= spec["target"]:
            return {**spec, "seconds": clock, "epochs": epoch, "test_recall": test, "valid_recall": valid}
    return {**spec, "seconds": None, "epochs": epoch, "test_recall": best, "valid_recall": None}


# -- driver ----------------------------------------------------------------------------------------------
def run_child(spec: dict, env: dict[str, str] | None = None) -> dict:
    """One row in a fresh process (``env``: extra environment variables)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def competing_job() -> Iterator[None]:
    """A CPU-bound process (a pure-Python loop) running beside the block."""
    job = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # running before the row starts
        yield
    finally:
        job.kill()
        job.wait()


def contention_table(args: argparse.Namespace) -> None:
    """Seconds per 100 steps alone and beside one CPU-bound job, per OpenMP wait policy and thread count; the
    two timings of a row are taken back to back, best of --repeats pairs."""
    usable = usable_cpus()
    print(f"device: {args.device}; torch {torch.__version__}; {usable} usable CPU(s); batch {BATCH} triples; "
          "beside: one CPU-bound process started by this script\n")  # fmt: skip
    print("| data | model | tensor | OpenMP wait | threads | s / 100 steps alone | beside a busy job | slowdown |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for dataset, model, tensor in itertools.product(args.datasets, args.models, args.tensors):
        # "" leaves the policy unset for the child's OpenMP runtime (setdefault keeps it): libgomp's default,
        # which spins for a while before it sleeps.
        policies = {"passive": "PASSIVE", "default (spin, then sleep)": "", "active (spin)": "ACTIVE"}
        for (policy, value), threads in itertools.product(policies.items(), sorted({usable, 1}, reverse=True)):
            spec = {"dataset": dataset, "model": model, "tensor": tensor, "precision": "fp32", "impl": "ours",
                    "device": args.device, "tiktok": str(args.tiktok), "steps": args.steps, "warmup": args.warmup,
                    "max_seconds": args.max_seconds, "threads": threads}  # fmt: skip
            alone, beside = [], []
            for _ in range(args.repeats):
                alone.append(run_child(spec, {"OMP_WAIT_POLICY": value}))
                with competing_job():
                    beside.append(run_child(spec, {"OMP_WAIT_POLICY": value}))
            label = f"| {dataset} | {model} | {tensor} | {policy} | {threads}"
            failed = [r for r in alone + beside if "error" in r]
            if failed:
                print(f"{label} | error: {failed[0]['error']} | | |")
                continue
            a = min(r["s_per_100_steps"] for r in alone)
            b = min(r["s_per_100_steps"] for r in beside)
            print(f"{label} | {a:.2f} | {b:.2f} | {b / a:.1f}x |", flush=True)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def paper_columns(r: dict) -> str:
    """Table 4 of the paper (MetaMMF_GCN with CP, TITAN Xp) next to this row's seconds per epoch."""
    paper = PAPER_MINUTES_PER_EPOCH.get(r["dataset"]) if (r["model"], r["tensor"]) == ("metammf_gcn", "cp") else None
    epoch_s = r["s_per_100_steps"] / 100 * r["steps_per_epoch"]
    return f" | {fmt(paper)} | {epoch_s:.2f} | " + (f"{paper * 60 / epoch_s:,.0f}x" if paper else "-")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["tiktok", "paper-tiktok", "paper-movielens"],
        choices=["tiktok", *SYNTHETIC_SETS],
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["metammf_gcn", "metammf_mf"],
        choices=["metammf_gcn", "metammf_mf", "metammf_lightgcn"],
        help="metammf_lightgcn (the served default, configs/tiktok.yaml) has no authors-style row",
    )
    p.add_argument("--tensors", nargs="+", default=["cp", "full"], choices=["cp", "full"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precisions", nargs="+", default=["fp32"], choices=PRECISIONS,
        help="training precisions to time (tf32: CUDA only; see training/precision.py)",
    )  # fmt: skip
    p.add_argument("--tiktok", type=Path, default=ROOT.parent / "shared" / "data" / "tiktok")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="runs per row, alternating implementations; best kept")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop timing a row after this (min 3 steps)")
    p.add_argument("--no-reference", action="store_true", help="skip the authors-style rows")
    p.add_argument("--quality", action="store_true", help="also measure time to test Recall@20 >= --target")
    p.add_argument("--target", type=float, default=0.068)
    p.add_argument("--quality-seconds", type=float, default=600.0, help="give up on the target after this")
    p.add_argument(
        "--contention", "--contended", action="store_true",
        help="instead of the table above: each row timed alone and beside a CPU-bound job this script starts, with "
        "OpenMP waiting passively (what the entry points ask for on a busy machine), with libgomp's default and "
        "spinning, on the threads a training run picks and on 1",
    )  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()  # fmt: skip
    if args.child:
        keep_freed_memory()  # as the training entry points do
        spec = json.loads(args.child)
        print(json.dumps(measure_quality(spec) if spec.get("kind") == "quality" else measure_steps(spec)))
        return

    if args.contention:
        contention_table(args)
        return
    threads = torch.get_num_threads()
    print(f"device: {args.device}; torch {torch.__version__}, {threads} threads; OpenMP wait: {OPENMP_WAIT}; "
          f"batch {BATCH} triples\n")  # fmt: skip
    gpu = args.device.startswith("cuda")
    mixed = "fp32" in args.precisions and len(args.precisions) > 1
    print(
        "| data | model | tensor | precision | implementation | s / 100 steps | triples/s | peak MB | "
        "speed-up vs authors-style" + (" | vs authors-style fp32" if mixed else "")
        + (" | paper min/epoch | s/epoch | speed-up vs paper" if gpu else "") + " |"
    )  # fmt: skip
    print("|---|---|---|---|---|---:|---:|---:|---:" + "|---:" * (mixed + 3 * gpu) + "|")
    fp32_reference: dict[tuple[str, str, str], float] = {}  # (data, model, tensor) -> authors-style fp32 s/100
    precisions = sorted(args.precisions, key=lambda name: name != "fp32")  # fp32 first: the other rows' reference
    for dataset, model, tensor, precision in itertools.product(args.datasets, args.models, args.tensors, precisions):
        no_reference = args.no_reference or dataset.startswith("paper-") or model == "metammf_lightgcn"
        impls = ["ours"] + ([] if no_reference else ["authors-style"])
        rows: dict[str, dict] = {}
        for impl in impls * args.repeats:  # alternated, best of --repeats: both see the same load
            spec = {"dataset": dataset, "model": model, "tensor": tensor, "precision": precision, "impl": impl,
                    "device": args.device, "tiktok": str(args.tiktok), "steps": args.steps, "warmup": args.warmup,
                    "max_seconds": args.max_seconds}  # fmt: skip
            r = run_child(spec)
            if impl not in rows or r.get("s_per_100_steps", np.inf) < rows[impl].get("s_per_100_steps", np.inf):
                rows[impl] = r
        for impl, r in rows.items():
            label = f"| {dataset} | {model} | {tensor} | {precision} | {impl}"
            if "error" in r:
                print(f"{label} | error: {r['error']} |")
                continue
            ref = rows.get("authors-style", {}).get("s_per_100_steps")
            if ref and precision == "fp32":
                fp32_reference[dataset, model, tensor] = ref
            speedup = fmt(ref / r["s_per_100_steps"], 1) + "x" if ref and impl == "ours" else "-"
            line = (f"{label} | {r['s_per_100_steps']:.2f} | {r['triples_per_s']:,.0f} | {r['peak_mb']:,.0f} | "
                    f"{speedup}")  # fmt: skip
            if mixed:
                ref32 = fp32_reference.get((dataset, model, tensor))
                line += " | " + (fmt(ref32 / r["s_per_100_steps"], 1) + "x" if ref32 and impl == "ours" else "-")
            print(line + (paper_columns(r) if gpu else "") + " |", flush=True)
            if r["loss_gap"] > 1e-4:
                print(f"  warning: authors-style and ours differ by {r['loss_gap']:.2e} in loss")
    if args.quality:
        dataset = args.datasets[0]
        print(
            f"\nTime to test Recall@20 >= {args.target} on {dataset} (configs/tiktok-metammf_gcn.yaml settings; "
            "training + validation on the clock, test evaluation off it):\n"
        )
        print("| model | precision | seconds | epochs | test R@20 then | valid R@20 then |")
        print("|---|---|---:|---:|---:|---:|")
        for model, precision in itertools.product(args.models, args.precisions):
            r = run_child({"kind": "quality", "dataset": dataset, "model": model, "precision": precision,
                           "device": args.device, "tiktok": str(args.tiktok), "target": args.target,
                           "max_seconds": args.quality_seconds})  # fmt: skip
            label = f"| {model} | {precision}"
            if "error" in r:
                print(f"{label} | error: {r['error']} |")
            elif r["seconds"] is None:
                print(f"{label} | not reached in {args.quality_seconds:.0f} s | {r['epochs']} | "
                      f"best {r['test_recall']:.4f} | - |")  # fmt: skip
            else:
                print(f"{label} | {r['seconds']:.1f} | {r['epochs']} | {r['test_recall']:.4f} | "
                      f"{r['valid_recall']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
