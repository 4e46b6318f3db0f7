"""How cost grows with batch and resolution: images/s and achieved GFLOP/s (issue 19 item 7).

Per Keras backend (one fresh worker process each, started as bin/ starts them), for every
configuration of ``--grid``: the forward pass (``network.predict_on_batch``) and the training
step (``DiffusionModel.train_on_batch``, compiled as bin/train compiles it:
``train.jit_compile='auto'``, with bin/train's optimizer, Adam with the gradient clipped to
global norm 1), two untimed calls then ``--repeats`` timed ones (median).
Achieved GFLOP/s = model FLOPs × images/s, with the forward FLOPs counted by XLA's cost analysis
(JAX) and a training step taken as 3× the forward; shown as a fraction of the numpy float32
matmul roof (2048³) measured before the workers start.

Grid entries are ``network:resolution:batch:task`` with network ``cifar10`` (the DDPM CIFAR-10
U-Net, 35.7 M parameters) or ``lsun`` (the DDPM 256 U-Net of gin/lsun.gin: channel_mult
1,1,2,2,4,4, attention at 16×16) and task ``forward`` or ``train``.

    python benchmarks/scaling.py --json benchmarks/results/scaling/scaling.json
    python benchmarks/scaling.py --backends jax --grid cifar10:32:8:forward --repeats 2  # smoke
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DEFAULT_GRID = ("cifar10:32:8:forward,cifar10:32:32:forward,cifar10:32:128:forward,"
                "cifar10:32:8:train,cifar10:32:32:train,"
                "lsun:32:8:forward,lsun:64:8:forward,lsun:256:8:forward,"
                "lsun:32:8:train,lsun:64:8:train")
NETWORKS = {
    "cifar10": {"base_channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                "attention_resolutions": (16,), "dropout": 0.1},
    "lsun": {"base_channels": 128, "channel_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2,
             "attention_resolutions": (16,), "dropout": 0.0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="jax,tensorflow")
    p.add_argument("--grid", default=DEFAULT_GRID)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--worker_per_entry", action="store_true",
                   help="A fresh worker process per grid entry, so that each row's peak RSS is "
                        "its own (one worker per backend otherwise: the peak is the largest so "
                        "far).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_grid(text):
    grid = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        parts = item.split(":")
        if len(parts) != 4 or parts[0] not in NETWORKS or parts[3] not in ("forward", "train"):
            raise SystemExit(f"--grid entry {item!r}: expected network:resolution:batch:task "
                             f"with network in {sorted(NETWORKS)} and task forward or train")
        grid.append((parts[0], int(parts[1]), int(parts[2]), parts[3]))
    return grid


# ----- worker ----------------------------------------------------------------------------------
def worker_main(args):
    import keras

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer

    built = {}

    def model_for(name, size):
        if (name, size) not in built:
            keras.utils.set_random_seed(0)
            network = build_unet(image_size=size, channels=3, num_heads=1, **NETWORKS[name])
            model = DiffusionModel(network, seed=0)
            # bin/train's optimizer (every gin config: Adam with the gradient clipped to
            # global norm 1) and its memory hand-back after building.
            model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                          jit_compile=etsdm_backend.default_train_jit_compile())
            built.clear()  # one model at a time: the LSUN U-Net is large
            etsdm_backend.release_build_memory()
            built[(name, size)] = model
        return built[(name, size)]

    def measure(request):
        name, size, batch, task = (request["network"], request["resolution"],
                                   request["batch"], request["task"])
        model = model_for(name, size)
        rng = np.random.default_rng(0)
        x = np.clip(rng.standard_normal((batch, size, size, 3)), -1, 1).astype(np.float32)
        t = rng.integers(0, 1000, size=(batch,)).astype(np.float32)
        if task == "forward":
            def call():
                model.network.predict_on_batch({"x": x, "t": t})
        else:
            def call():
                model.train_on_batch(x)
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        call()
        times = harness.time_repeated(call, request["repeats"])
        result = {"seconds": float(np.median(times)), "first_call_s": first,
                  "params": int(model.network.count_params())}
        if keras.backend.backend() == "jax":
            from train_step import forward_flops_per_image

            result["forward_flops_per_image"] = forward_flops_per_image(model.network, batch,
                                                                        size)
        return result

    harness.worker_loop({"measure": measure})


# ----- parent ----------------------------------------------------------------------------------
def report(header, rows, roof):
    lines = [header, "",
             "| network | resolution | batch | task | backend | img/s | GFLOP/s | % of roof | "
             "1st call s | params | peak RSS MiB |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['network']} | {r['resolution']} | {r['batch']} | {r['task']} | "
                         f"{r['backend']} | — | — | — | — | {r['error']} | — |")
            continue
        gflops = r.get("gflops")
        lines.append(
            f"| {r['network']} | {r['resolution']} | {r['batch']} | {r['task']} | "
            f"{r['backend']} | {r['images_per_s']:.2f} | "
            f"{'—' if gflops is None else f'{gflops:.0f}'} | "
            f"{'—' if gflops is None else f'{100 * gflops / roof:.0f} %'} | "
            f"{r['first_call_s']:.1f} | {r['params'] / 1e6:.1f} M | "
            f"{r['peak_rss_mib']:,.0f}{'' if r.get('own_worker') else ' ≤'} |")
    lines += ["", "GFLOP/s: forward FLOPs from XLA's cost analysis (JAX), training step = 3× "
                  "forward; % of roof: of the numpy float32 matmul roof above. Peak RSS: of the "
                  "worker process; '≤' where the worker had run earlier rows (the largest so "
                  "far), else this row's own."]
    return "\n".join(lines) + "\n"


def main(args):
    grid = parse_grid(args.grid)
    roof = harness.numpy_matmul_roof(2048, 5)
    header = harness.cpu_header(roof)
    print(header, flush=True)
    flops, rows = {}, []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        argv = [sys.executable, os.path.abspath(__file__), "--worker"]
        worker = harness.Worker(backend, argv, env={"KERAS_BACKEND": backend},
                                malloc="hugetlb")
        try:
            for index, (name, size, batch, task) in enumerate(grid):
                if args.worker_per_entry and index:
                    worker.close()
                    worker = harness.Worker(backend, argv, env={"KERAS_BACKEND": backend},
                                            malloc="hugetlb")
                row = {"network": name, "resolution": size, "batch": batch, "task": task,
                       "backend": backend, "own_worker": args.worker_per_entry or index == 0}
                try:
                    res = worker.request("measure", network=name, resolution=size, batch=batch,
                                         task=task, repeats=args.repeats)
                except RuntimeError as e:  # e.g. out of memory: report it, go on
                    row["error"] = str(e)[:120]
                    rows.append(row)
                    print(f"  {backend} {name} {size} b{batch} {task}: FAILED {e}", flush=True)
                    if worker.proc.poll() is not None:  # the worker died: start a new one
                        worker = harness.Worker(backend, argv, env={"KERAS_BACKEND": backend},
                                                malloc="hugetlb")
                    continue
                if "forward_flops_per_image" in res:
                    flops[(name, size)] = res["forward_flops_per_image"]
                per_image = flops.get((name, size))
                ips = batch / res["seconds"]
                row.update(images_per_s=ips, first_call_s=res["first_call_s"],
                           params=res["params"], peak_rss_mib=res["peak_rss_mib"],
                           gflops=(ips * per_image * (3 if task == "train" else 1) / 1e9
                                   if per_image else None))
                rows.append(row)
                print(f"  {backend} {name} {size} b{batch} {task}: {ips:.2f} img/s"
                      + (f", {row['gflops']:.0f} GFLOP/s" if row["gflops"] else ""), flush=True)
        finally:
            worker.close()
    md = report(header, rows, roof["median"])
    print("\n" + md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.json:
        harness.write_json_atomic(args.json, {"args": vars(args), "cpu_header": header,
                                              "roof": roof, "rows": rows, "markdown": md})


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        worker_main(parsed)
    else:
        main(parsed)
