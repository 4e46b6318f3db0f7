"""This library's U-Net against diffusers' ``UNet2DModel`` (PyTorch), side by side.

Same network (DDPM CIFAR-10: block widths 128/256/256/256, 2 res blocks per level, attention
at 16×16, dropout 0.1, one head, GroupNorm 32, 35,746,307 parameters — checked equal on both
sides before timing), same float32 precision, same batch. Each Keras backend and diffusers run
in their own worker process; the workers take turns (one timed repeat each, round robin), warm-up
excluded, medians and inter-quartile ranges over the repeats.

Tasks (``--tasks``):
  train     one training step: noise-prediction MSE, Adam, EMA update (the compiled
            ``DiffusionModel.train_step`` that ``fit`` runs, called by ``train_on_batch`` / the
            usual diffusers loop with ``EMAModel``), batch ``--train_batch``.
  forward   one forward pass without gradients at each batch of ``--forward_batches``.
  ddim      one sampler step per NFE: the project's DDIMSampler / DPMSolverSampler loops
  dpm       (``--sample_steps`` NFE, compiled) vs diffusers' scheduler.step + forward loops,
            batch ``--sample_batch``; the overhead over the bare forward is reported.

Needs the optional benchmark requirements (torch CPU wheel + diffusers) in a separate venv:

    python3 -m venv venv-bench
    venv-bench/bin/pip install -r requirements.txt -r benchmarks/requirements.txt
    venv-bench/bin/python benchmarks/vs_diffusers.py                       # full run
    venv-bench/bin/python benchmarks/vs_diffusers.py --base_channels 32 --repeats 2  # smoke test
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

NUM_TIMESTEPS = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="jax,tensorflow",
                   help="comma-separated Keras backends to compare with diffusers")
    p.add_argument("--tasks", default="train,forward,ddim,dpm")
    p.add_argument("--base_channels", type=int, default=128,
                   help="128 is DDPM CIFAR-10; smaller values scale every level (smoke tests)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--forward_batches", default="8,64")
    p.add_argument("--sample_batch", type=int, default=8)
    p.add_argument("--sample_steps", type=int, default=5, help="NFE per timed sampling run")
    p.add_argument("--train_steps", type=int, default=2, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul_n", type=int, default=1024)
    p.add_argument("--jit_compile", default="true", choices=("true", "false", "auto"),
                   help="jit_compile of the Keras training step (true: as bin/train)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, the core count)")
    p.add_argument("--malloc", default="hugetlb", choices=("hugetlb", "default"),
                   help="glibc malloc setup of EVERY worker (diffusers too): 'hugetlb' as the bin/ "
                        "entry points set it (keras_etsdm/cpu_tuning.py), 'default' glibc as is")
    p.add_argument("--json", default=None)
    p.add_argument("--logdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "keras" or "diffusers"
    return p.parse_args(argv)


def unet_kwargs(args):
    mult = (1, 2, 2, 2)
    return dict(image_size=args.image_size, channels=3, base_channels=args.base_channels,
                channel_mult=mult, num_res_blocks=2, attention_resolutions=(16,), dropout=0.1,
                num_heads=1)


def inputs(batch, image_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    t = rng.integers(0, NUM_TIMESTEPS, size=(batch,)).astype(np.float32)
    return x, t


# ----- Keras worker ---------------------------------------------------------------------------
def keras_worker(args):
    import keras

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm.samplers import DDIMSampler, DPMSolverSampler

    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    network = build_unet(**unet_kwargs(args))
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    # XLA for the training step on every backend, as bin/train does (train.jit_compile=True);
    # Keras' "auto" would mean no XLA for TensorFlow on a CPU-only machine.
    model.compile(optimizer=keras.optimizers.Adam(2e-4),
                  jit_compile={"true": True, "false": False}.get(args.jit_compile, "auto"))
    tasks = {}

    def setup_train():
        data, _ = inputs(args.train_steps * args.train_batch, args.image_size)
        data = np.clip(data, -1, 1)

        # ``train_on_batch`` runs the same compiled ``train_step`` as each step of ``fit``. A
        # short ``fit`` per repeat would also time its teardown: deleting the tf.data iterator
        # waits for the autotune thread's next wake-up (up to ~the fit's own duration, seen 0-18 s
        # after 2-6 steps), a cost a real run (``bin/train``: one ``fit``) pays once.
        def run(num_steps=args.train_steps):
            b = args.train_batch
            for i in range(num_steps):
                model.train_on_batch(data[i * b:(i + 1) * b])
        return run, lambda: run(1), args.train_steps

    def setup_forward(batch):
        x, t = inputs(batch, args.image_size)

        def run():
            network.predict_on_batch({"x": x, "t": t})
        return run, run, 1

    def setup_sampler(kind):
        steps = args.sample_steps
        if kind == "ddim":
            sampler = DDIMSampler(num_steps=steps, schedule=model.schedule)
        else:
            sampler = DPMSolverSampler(num_steps=steps, order=2, method="multistep",
                                       algorithm="dpmsolver++", schedule=model.schedule)
        noise, _ = inputs(args.sample_batch, args.image_size, seed=1)

        def run():
            keras.ops.convert_to_numpy(sampler.sample(model, noise))
        return run, run, steps

    for task in args.tasks.split(","):
        if task == "train":
            tasks["train"] = setup_train
        elif task == "forward":
            for b in args.forward_batches.split(","):
                tasks[f"forward_b{b}"] = (lambda b=int(b): setup_forward(b))
        elif task in ("ddim", "dpm"):
            tasks[task] = (lambda k=task: setup_sampler(k))
    return backend, network.count_params(), tasks, network


# ----- diffusers worker ------------------------------------------------------------------------
def diffusers_worker(args):
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = args.base_channels
    unet = UNet2DModel(
        sample_size=args.image_size, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(c, 2 * c, 2 * c, 2 * c),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        # Up blocks run from the lowest resolution: 4, 8, 16 (attention), 32.
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, norm_num_groups=32, norm_eps=1e-5, attention_head_dim=None,
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1)
    params = sum(p.numel() for p in unet.parameters())
    tasks = {}

    def setup_train():
        unet.train()
        optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
        ema = EMAModel(unet.parameters(), decay=0.9999)
        scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
        x0, _ = inputs(args.train_batch, args.image_size)
        x0 = torch.from_numpy(np.clip(x0, -1, 1)).permute(0, 3, 1, 2).contiguous()

        def step():
            noise = torch.randn_like(x0)
            t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],))
            x_t = scheduler.add_noise(x0, noise, t)
            loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.step(unet.parameters())
            return float(loss)

        def run(num_steps=args.train_steps):
            for _ in range(num_steps):
                step()
        return run, lambda: run(1), args.train_steps

    def setup_forward(batch):
        x, t = inputs(batch, args.image_size)
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        t = torch.from_numpy(t)

        def run():
            unet.eval()
            with torch.inference_mode():
                unet(x, t).sample
        return run, run, 1

    def setup_sampler(kind):
        steps = args.sample_steps
        if kind == "ddim":
            scheduler = DDIMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
        else:
            scheduler = DPMSolverMultistepScheduler(
                num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear",
                algorithm_type="dpmsolver++", solver_order=2)
        noise, _ = inputs(args.sample_batch, args.image_size, seed=1)
        noise = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()

        def run():
            unet.eval()
            scheduler.set_timesteps(steps)
            x = noise
            with torch.inference_mode():
                for t in scheduler.timesteps:
                    eps = unet(x, t).sample
                    x = scheduler.step(eps, t, x).prev_sample
            return x
        return run, run, steps

    for task in args.tasks.split(","):
        if task == "train":
            tasks["train"] = setup_train
        elif task == "forward":
            for b in args.forward_batches.split(","):
                tasks[f"forward_b{b}"] = (lambda b=int(b): setup_forward(b))
        elif task in ("ddim", "dpm"):
            tasks[task] = (lambda k=task: setup_sampler(k))
    return "torch", params, tasks, unet


def worker_main(args):
    if args.worker == "keras":
        framework, params, task_setups, network = keras_worker(args)
    else:
        framework, params, task_setups, network = diffusers_worker(args)
    ready = {}

    def info(request):
        result = {"framework": framework, "params": int(params), "tasks": list(task_setups)}
        if framework == "jax":
            from train_step import forward_flops_per_image

            result["forward_flops_per_image"] = forward_flops_per_image(
                network, 8, args.image_size)
        return result

    def warmup(request):
        name = request["task"]
        run, first_call, units = task_setups[name]()
        start = time.perf_counter()
        first_call()
        first = time.perf_counter() - start
        start = time.perf_counter()
        first_call()
        second = time.perf_counter() - start
        ready[name] = (run, units)
        return {"first_call_s": first, "second_call_s": second}

    def run(request):
        fn, units = ready[request["task"]]
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        return {"seconds_per_unit": (time.perf_counter() - start) / units,
                "cpu_seconds_per_unit": (time.process_time() - cpu_start) / units}

    matmul_fn = {}

    def matmul(request):
        if "fn" not in matmul_fn:
            matmul_fn["fn"] = harness.framework_matmul_fn(framework, args.matmul_n)
            matmul_fn["fn"]()
        times = harness.time_repeated(matmul_fn["fn"], 3)
        return {"gflops": harness.matmul_flops(args.matmul_n) / float(np.median(times)) / 1e9}

    harness.worker_loop({"info": info, "warmup": warmup, "run": run, "matmul": matmul})


# ----- parent ------------------------------------------------------------------------------------
def start_worker(args, kind, backend, name):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    for key in ("tasks", "base_channels", "image_size", "train_batch", "forward_batches",
                "sample_batch", "sample_steps", "train_steps", "matmul_n", "threads",
                "jit_compile"):
        argv += [f"--{key}", str(getattr(args, key))]
    log = os.path.join(args.logdir, f"{name}.log") if args.logdir else None
    env = {"KERAS_BACKEND": backend} if backend else {}
    return harness.Worker(name, argv, env=env, log_path=log, malloc=args.malloc)


def batch_of(task, args):
    if task == "train":
        return args.train_batch
    if task.startswith("forward_b"):
        return int(task[len("forward_b"):])
    return args.sample_batch


def main(args):
    if args.logdir:
        os.makedirs(args.logdir, exist_ok=True)
    print(f"machine: {harness.machine_description()}", flush=True)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    workers = []
    try:
        for backend in names:
            workers.append(start_worker(args, "keras", backend, f"keras-{backend}"))
        workers.append(start_worker(args, "diffusers", None, "diffusers"))
        infos = {w.name: w.request("info") for w in workers}
        counts = {name: info["params"] for name, info in infos.items()}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"Parameter counts differ, the networks are not the same: {counts}")
        print(f"parameters: {counts['diffusers']:,} on every side", flush=True)
        print(f"malloc ({args.malloc}), every worker: GLIBC_TUNABLES="
              f"{workers[0].glibc_tunables!r}", flush=True)
        flops = next((i["forward_flops_per_image"] for i in infos.values()
                      if "forward_flops_per_image" in i), None)
        tasks = infos["diffusers"]["tasks"]
        warm, times, cpu_times = {}, {}, {}
        for task in tasks:
            for w in workers:
                first = warm[(w.name, task)] = w.request("warmup", task=task)
                print(f"  {w.name:<18} {task:<12} first call {first['first_call_s']:7.1f} s,"
                      f" second {first['second_call_s']:6.2f} s", flush=True)
            for _ in range(args.repeats):
                for w in workers:
                    result = w.request("run", task=task)
                    times.setdefault((w.name, task), []).append(result["seconds_per_unit"])
                    cpu_times.setdefault((w.name, task), []).append(
                        result["cpu_seconds_per_unit"])
        matmul = harness.interleave(workers, "matmul", 3)
        numpy_rate = harness.numpy_matmul_gflops(args.matmul_n)
        peaks = {w.name: matmul[w.name][-1]["peak_rss_mib"] for w in workers}
    finally:
        for w in workers:
            w.close()

    print(f"\nmachine after: {harness.machine_description()}")
    print(f"U-Net base_channels {args.base_channels}, {args.image_size}x{args.image_size}, float32,"
          f" {args.repeats} repeats; numpy matmul {numpy_rate:.1f} GFLOP/s")
    mm = {name: float(np.median([r["gflops"] for r in rs])) for name, rs in matmul.items()}
    header = (f"{'task':<12} {'framework':<18} {'batch':>5} {'img/s':>8} {'IQR':>7} "
              f"{'÷ diffusers':>11} {'GFLOP/s':>8} {'% own mm':>8} {'1st call s':>10} "
              f"{'CPU ms/img':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for task in tasks:
        batch = batch_of(task, args)
        base = np.median(batch / np.asarray(times[("diffusers", task)]))
        for w in workers:
            ips = harness.summarize(batch / np.asarray(times[(w.name, task)]))
            cpu_per_image = float(np.median(cpu_times[(w.name, task)])) / batch
            per_image = flops * (3.0 if task == "train" else 1.0) if flops else None
            gflops = ips["median"] * per_image / 1e9 if per_image else float("nan")
            row = {"task": task, "framework": w.name, "batch": batch, "images_per_s": ips,
                   "ratio_vs_diffusers": ips["median"] / base, "gflops": gflops,
                   "matmul_gflops": mm[w.name],
                   "first_call_s": warm[(w.name, task)]["first_call_s"],
                   "second_call_s": warm[(w.name, task)]["second_call_s"],
                   "cpu_seconds_per_image": cpu_per_image}
            rows.append(row)
            unit = "NFE·img/s" if task in ("ddim", "dpm") else "img/s"
            print(f"{task:<12} {w.name:<18} {batch:>5} {ips['median']:>8.2f} {ips['iqr']:>7.2f} "
                  f"{row['ratio_vs_diffusers']:>11.2f} {gflops:>8.1f} "
                  f"{100 * gflops / mm[w.name]:>7.1f}% {row['first_call_s']:>10.1f} "
                  f"{1e3 * cpu_per_image:>10.1f}"
                  + ("" if unit == "img/s" else f"  ({unit})"))
    # Sampler overhead over the bare forward of the same batch, per NFE.
    fwd_task = f"forward_b{args.sample_batch}"
    if fwd_task in tasks:
        for task in ("ddim", "dpm"):
            if task in tasks:
                for w in workers:
                    over = (np.median(times[(w.name, task)]) /
                            np.median(times[(w.name, fwd_task)]) - 1.0)
                    print(f"{task} overhead per NFE over the bare forward, {w.name}: "
                          f"{100 * over:+.1f} %")
    print("peak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print("framework matmul GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in mm.items()))
    if args.json:
        harness.write_json_atomic(args.json, {
            "machine": harness.machine_description(), "args": vars(args), "rows": rows,
            "forward_flops_per_image": flops, "numpy_matmul_gflops": numpy_rate,
            "peak_rss_mib": peaks, "raw_seconds": {f"{k[0]}/{k[1]}": v for k, v in times.items()}})
    return rows


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        worker_main(parsed)
    else:
        main(parsed)
