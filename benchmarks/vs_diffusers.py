"""This library's U-Net against diffusers' ``UNet2DModel`` (PyTorch), side by side.

Same network (DDPM CIFAR-10: block widths 128/256/256/256, 2 res blocks per level, attention
at 16×16, dropout 0.1, one head, GroupNorm 32, 35,746,307 parameters — checked equal on both
sides before timing), same precision (float32; with ``--precision bf16`` bf16 mixed precision on
every side), same batch. Each Keras backend and each diffusers variant (``--peers``: eager as
shipped, tuned, torch.compile'd) run in their own worker process.

Protocol. Per task, every worker is built and warmed up (two untimed calls), then
``--repeats`` (default 15) timed ROUNDS: in each round every worker runs one timed repeat, in a
random order drawn afresh for every round (``harness.round_orders``, seeded by
``--order_seed``; the order of every round is written to the JSON output). The float32 matmul
rate of every framework is measured in 3 more such rounds at the end.

Statistics. Per framework: median and inter-quartile range of the rate over the rounds. Per
Keras backend and task: the PAIRED ratios keras ÷ eager diffusers and keras ÷ the best
diffusers variant on that task — the median over rounds of the per-round ratio of the two rates
measured in the same round — with a 95 % percentile bootstrap interval that resamples rounds
(``harness.paired_ratio_ci``, 10,000 resamples). Issue 19's goals (``TRAIN_GOALS``,
``SAMPLE_GOALS``: fastest Keras backend ≥ 1.3× eager and ≥ 1.0× the best variant, JAX ≥ 0.9×
the best variant, sampling ≥ 1.0× the best variant) are called met only when the whole interval
lies at or above the goal, not met when it lies below, undecided otherwise
(``harness.goal_status``); first call ≤ 30 s and peak RSS ≤ 1.5× eager diffusers' are read off
single measurements.

Machine. The report's header line names the CPU (model, cores, ISA extensions) and a float32
matmul roof probe (numpy, ``--matmul_n``³ with default 2048, median of ``--matmul_repeats``),
measured before the workers start and again after they have exited.

Tasks (``--tasks``):
  train     one training step: noise-prediction MSE, Adam (``--grad_clip_norm``: with the
            gradient clipped first, the recipe of bin/train and of diffusers' training
            example), EMA update (the compiled
            ``DiffusionModel.train_step`` that ``fit`` runs, called by ``train_on_batch`` / the
            usual diffusers loop with ``EMAModel``), batch ``--train_batch``.
  forward   one forward pass without gradients at each batch of ``--forward_batches``.
  ddim      one sampler step per NFE: the project's DDIMSampler / DPMSolverSampler loops
  dpm       (``--sample_steps`` NFE, compiled) vs diffusers' scheduler.step + forward loops,
            batch ``--sample_batch``; the overhead over the bare forward is reported.

Needs the optional benchmark requirements (torch CPU wheel + diffusers) in a separate venv:

    python3 -m venv venv-bench
    venv-bench/bin/pip install -r requirements.txt -r benchmarks/requirements.txt
    venv-bench/bin/python benchmarks/vs_diffusers.py --json /tmp/vs.json --markdown /tmp/vs.md
    venv-bench/bin/python benchmarks/vs_diffusers.py --base_channels 32 --repeats 2  # smoke test
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

NUM_TIMESTEPS = 1000

# The diffusers variants ("peers"). "eager" is diffusers as its training example ships it (the
# reference of every ratio); the others are what a user tuning PyTorch on a CPU would try.
PEER_HELP = {
    "eager": "as shipped: NCHW, torch.optim.Adam, EMAModel per parameter",
    "tuned": "channels_last, fused Adam, foreach EMA, eager",
    "compile": "tuned + torch.compile(unet) (inductor, default mode)",
    "autotune": "tuned + torch.compile(unet, mode='max-autotune-no-cudagraphs')",
}
PEER_WORKERS = {"eager": "diffusers", "tuned": "diffusers-tuned",
                "compile": "diffusers-compile", "autotune": "diffusers-autotune"}


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: no clipping), got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="jax,tensorflow",
                   help="comma-separated Keras backends to compare with diffusers; "
                        "'tensorflow@sample_xla=1' (or =0) forces the sampling loops' compile "
                        "mode in that worker (KERAS_ETSDM_SAMPLE_JIT_COMPILE; default: the "
                        "library's per-ISA choice); '<backend>@direct_upsample' runs the "
                        "upsampling convolutions in their direct form "
                        "(layers.SUBPIXEL_UPSAMPLE = False); 'jax@xla:<xla_flag>=<value>' "
                        "adds one XLA flag (kept over the library's start-up flags); "
                        "'jax@train_opt_level=N' (0-3) sets LLVM's optimization level for the "
                        "training step (KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL; default: XLA's, 3; "
                        "cpu_tuning.jax_train_compiler_options); "
                        "'<backend>@hugetlb=0' (or =1) forces glibc's huge-page tunable; "
                        "'<backend>@winograd_training=0' (or =1, or =N ≥ 8: up to N×N) sets "
                        "winograd.IN_TRAINING (0: training steps keep the direct 3×3 "
                        "convolutions); a "
                        "variant is also reported "
                        "against its backend's plain worker")
    p.add_argument("--tasks", default="train,forward,ddim,dpm")
    p.add_argument("--peers", default="eager,tuned,compile,autotune",
                   help="comma-separated diffusers variants, each its own worker: " +
                        "; ".join(f"{k} ({v})" for k, v in PEER_HELP.items()))
    p.add_argument("--base_channels", type=int, default=128,
                   help="128 is DDPM CIFAR-10; smaller values scale every level (smoke tests)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--forward_batches", default="8,64")
    p.add_argument("--sample_batch", type=int, default=8)
    p.add_argument("--sample_steps", type=int, default=5, help="NFE per timed sampling run")
    p.add_argument("--train_steps", type=int, default=2, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed rounds per task (>= 2: the paired intervals resample rounds)")
    p.add_argument("--order_seed", type=int, default=0,
                   help="seed of the random worker order drawn for every round")
    p.add_argument("--matmul_n", type=int, default=2048,
                   help="size n of the n×n float32 matmul roof probe (numpy and every framework)")
    p.add_argument("--matmul_repeats", type=int, default=7,
                   help="timed calls of the numpy roof probe (median reported)")
    p.add_argument("--bootstrap_resamples", type=int, default=10000)
    p.add_argument("--jit_compile", default="auto", choices=("true", "false", "auto"),
                   help="jit_compile of the Keras training step; auto: the library's choice, as "
                        "bin/train makes it (backend.default_train_jit_compile: XLA except "
                        "TensorFlow on an AVX-512 CPU)")
    p.add_argument("--grad_clip_norm", type=_non_negative_float, default=0.0,
                   help="train task: clip the gradient to this global norm before Adam's update on "
                        "every side, the DDPM recipe (> 0; Keras: bin/train's make_optimizer, "
                        "diffusers: torch.nn.utils.clip_grad_norm_ as its training example "
                        "does, foreach in the tuned variants); 0: plain Adam, no clipping")
    p.add_argument("--precision", default="float32", choices=("float32", "bf16"),
                   help="every worker: float32, or bf16 mixed precision (Keras 'mixed_bfloat16' "
                        "policy: float32 variables, bf16 compute; torch.autocast('cpu', "
                        "torch.bfloat16) around forward and loss)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, the core count)")
    p.add_argument("--malloc", default="hugetlb", choices=("hugetlb", "default"),
                   help="glibc malloc setup of EVERY worker (diffusers too): 'hugetlb' as the bin/ "
                        "entry points set it (keras_etsdm/cpu_tuning.py), 'default' glibc as is")
    p.add_argument("--report_from", default=None,
                   help="no workers: rebuild the report of a saved --json run (its raw per-round "
                        "numbers) and write it to --markdown / --json")
    p.add_argument("--forward_flops_per_image", type=float, default=None,
                   help="with --report_from: the forward FLOPs per image for the GFLOP/s column "
                        "(e.g. a run whose count included the library's Winograd form; "
                        "train_step.forward_flops_per_image counts the network as defined)")
    p.add_argument("--json", default=None, help="write every raw number and the report here")
    p.add_argument("--markdown", default=None, help="also write the markdown report here")
    p.add_argument("--logdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "keras" or "diffusers"
    p.add_argument("--peer", default="eager", help=argparse.SUPPRESS)  # a diffusers worker's variant
    args = p.parse_args(argv)
    if args.worker is None and args.repeats < 2:
        p.error("--repeats must be >= 2: the paired ratio intervals resample rounds")
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = sorted(set(peers) - set(PEER_WORKERS))
    if unknown or "eager" not in peers:
        p.error(f"--peers: unknown {unknown} or 'eager' missing (the reference); got "
                f"{args.peers!r}, expected a list of {sorted(PEER_WORKERS)} including 'eager'")
    return args


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
def task_table(args, setup_train, setup_forward, setup_sampler):
    """``--tasks`` → {task name: setup function} (the same names on every worker)."""
    tasks = {}
    for task in args.tasks.split(","):
        if task == "train":
            tasks["train"] = setup_train
        elif task == "forward":
            for b in args.forward_batches.split(","):
                tasks[f"forward_b{b}"] = (lambda b=int(b): setup_forward(b))
        elif task in ("ddim", "dpm"):
            tasks[task] = (lambda k=task: setup_sampler(k))
    return tasks


# "<backend>@direct_upsample": the worker runs every upsampling convolution on the upsampled
# image (layers.SUBPIXEL_UPSAMPLE = False), the form before layers.upsample_nearest_conv3x3
DIRECT_UPSAMPLE_VARIABLE = "ETSDM_BENCH_DIRECT_UPSAMPLE"
# "<backend>@winograd_training=0" / "=1" / "=N": winograd.IN_TRAINING set in the worker (0:
# training steps keep the direct 3×3 convolutions; 1: what train(winograd_training=True) runs;
# N ≥ 8: train(winograd_training=N), the form only at outputs of at most N×N). Without it the
# worker runs bin/train's default, train(winograd_training="auto"): on for JAX on an AVX2 CPU
# without AVX-512 since 2026-12-07, off elsewhere.
WINOGRAD_TRAINING_VARIABLE = "ETSDM_BENCH_WINOGRAD_TRAINING"


def keras_worker(args):
    import keras

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import layers as etsdm_layers
    from keras_etsdm import winograd
    from keras_etsdm.samplers import DDIMSampler, DPMSolverSampler

    if os.environ.get(DIRECT_UPSAMPLE_VARIABLE) == "1":  # "<backend>@direct_upsample"
        etsdm_layers.SUBPIXEL_UPSAMPLE = False
    # "@winograd_training=0/1/N"; without it as bin/train: train(winograd_training="auto")
    setting = os.environ.get(WINOGRAD_TRAINING_VARIABLE, "auto")
    winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE = winograd.training_setting(
        harness.winograd_training_value(setting))
    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    if args.precision == "bf16":
        keras.config.set_dtype_policy("mixed_bfloat16")  # as train(mixed_precision=...) does
    network = build_unet(**unet_kwargs(args))
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    # The training step compiled as bin/train compiles it (train.jit_compile="auto").
    from keras_etsdm import backend as etsdm_backend

    jit = {"true": True, "false": False}.get(args.jit_compile)
    if args.grad_clip_norm > 0:  # bin/train's optimizer (the gin configs' clip 1.0)
        from keras_etsdm.optimizers import make_optimizer

        optimizer = make_optimizer(learning_rate=2e-4, grad_clip_norm=args.grad_clip_norm)
    else:
        optimizer = keras.optimizers.Adam(2e-4)
    model.compile(optimizer=optimizer,
                  jit_compile=etsdm_backend.default_train_jit_compile() if jit is None else jit)

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

    return backend, network.count_params(), task_table(args, setup_train, setup_forward,
                                                      setup_sampler), network


# ----- diffusers worker ------------------------------------------------------------------------
def diffusers_worker(args):
    """One diffusers variant (``args.peer``, see ``PEER_HELP``) on the same tasks."""
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
    import contextlib

    def autocast():
        if args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    tuned = args.peer != "eager"
    layout = torch.channels_last if tuned else torch.contiguous_format
    if tuned:
        unet = unet.to(memory_format=torch.channels_last)
    if args.peer in ("compile", "autotune"):
        mode = "max-autotune-no-cudagraphs" if args.peer == "autotune" else None
        # One compiled module for every task; train / eval mode changes recompile once each.
        net = torch.compile(unet, mode=mode)
    else:
        net = unet

    def nchw(x_nhwc):
        return torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous(memory_format=layout)

    def setup_train():
        unet.train()
        if tuned:
            optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4, fused=True)
            ema = EMAModel(unet.parameters(), decay=0.9999, foreach=True)
        else:
            optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
            ema = EMAModel(unet.parameters(), decay=0.9999)
        scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
        x0, _ = inputs(args.train_batch, args.image_size)
        x0 = nchw(np.clip(x0, -1, 1))

        def step():
            noise = torch.randn_like(x0)
            t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],))
            x_t = scheduler.add_noise(x0, noise, t)
            with autocast():
                loss = torch.nn.functional.mse_loss(net(x_t, t).sample.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip_norm > 0:  # diffusers' train_unconditional: clip_grad_norm_(·, 1.0)
                torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip_norm,
                                               foreach=True if tuned else None)
            optimizer.step()
            ema.step(unet.parameters())
            return float(loss)

        def run(num_steps=args.train_steps):
            for _ in range(num_steps):
                step()
        return run, lambda: run(1), args.train_steps

    def setup_forward(batch):
        x, t = inputs(batch, args.image_size)
        x, t = nchw(x), torch.from_numpy(t)

        def run():
            unet.eval()
            with torch.inference_mode(), autocast():
                net(x, t).sample
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
        noise = nchw(noise)

        def run():
            unet.eval()
            scheduler.set_timesteps(steps)
            x = noise
            with torch.inference_mode():
                for t in scheduler.timesteps:
                    with autocast():
                        eps = net(x, t).sample
                    x = scheduler.step(eps.float(), t, x).prev_sample
            return x
        return run, run, steps

    return "torch", params, task_table(args, setup_train, setup_forward, setup_sampler), unet


def worker_main(args):
    if args.worker == "keras":
        framework, params, task_setups, network = keras_worker(args)
    else:
        framework, params, task_setups, network = diffusers_worker(args)
    ready = {}

    def info(request):
        result = {"framework": framework, "params": int(params), "tasks": list(task_setups)}
        if framework == "torch":
            import torch

            result["torch_threads"] = torch.get_num_threads()
            result["torch_version"] = torch.__version__
        else:
            from keras_etsdm import backend as etsdm_backend

            result["sample_jit_compile"] = etsdm_backend.default_sample_jit_compile()
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
def start_worker(args, kind, backend, name, peer="eager"):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--peer", peer]
    for key in ("tasks", "base_channels", "image_size", "train_batch", "forward_batches",
                "sample_batch", "sample_steps", "train_steps", "matmul_n", "threads",
                "jit_compile", "precision", "grad_clip_norm"):
        argv += [f"--{key}", str(getattr(args, key))]
    log = os.path.join(args.logdir, f"{name}.log") if args.logdir else None
    env = {}
    if backend:
        backend, _, option = backend.partition("@")
        env["KERAS_BACKEND"] = backend
        if option == "direct_upsample":
            env[DIRECT_UPSAMPLE_VARIABLE] = "1"
        elif (re.fullmatch(r"winograd_training=\d+", option)
              and int(option.partition("=")[2]) not in range(2, 8)):
            env[WINOGRAD_TRAINING_VARIABLE] = option.partition("=")[2]
        elif option in ("hugetlb=0", "hugetlb=1"):
            # glibc's huge-page tunable forced off / on; the start-up adds the rest of its tuning
            env["GLIBC_TUNABLES"] = f"glibc.malloc.{option}"
        elif backend == "jax" and re.fullmatch(r"train_opt_level=[0-3]", option):
            # LLVM's optimization level for the training step (default: XLA's, 3)
            env["KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL"] = option.partition("=")[2]
        elif backend == "jax" and re.fullmatch(r"xla:xla_[a-z0-9_]+=\S+", option):
            # one XLA flag beside the library's start-up flags (which keep a flag set here)
            env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --"
                                + option[len("xla:"):]).strip()
        elif option:
            key, _, value = option.partition("=")
            if backend != "tensorflow" or key != "sample_xla" or value not in ("0", "1"):
                raise SystemExit(f"--backends: unknown option {option!r} of {backend!r}; "
                                 f"expected tensorflow@sample_xla=0 or =1 (JAX always jits), "
                                 f"jax@xla:<xla_flag>=<value>, jax@train_opt_level=0..3, "
                                 f"<backend>@hugetlb=0 or =1, "
                                 f"<backend>@winograd_training=0, =1 or =N (N ≥ 8) "
                                 f"or <backend>@direct_upsample")
            env["KERAS_ETSDM_SAMPLE_JIT_COMPILE"] = value
    return harness.Worker(name, argv, env=env, log_path=log, malloc=args.malloc,
                          backend=env.get("KERAS_BACKEND", "torch"))


def batch_of(task, args):
    if task == "train":
        return args.train_batch
    if task.startswith("forward_b"):
        return int(task[len("forward_b"):])
    return args.sample_batch


# ----- report (pure: unit-tested with fake rounds in tests/test_bench_stats.py) ------------------
REFERENCE = "diffusers"  # eager diffusers: the reference of every ratio
# Issue 19's goals, read off the paired 95 % intervals (harness.goal_status). framework None: the
# Keras backend with the highest median paired ratio in this run; against "eager": eager
# diffusers, "best": the diffusers variant with the highest median rate on that task (eager
# included: a user tuning PyTorch keeps whatever is fastest).
TRAIN_GOALS = (
    {"goal": 1.3, "framework": None, "against": "eager", "label": "fastest ≥ 1.3× eager",
     "text": "fastest Keras backend ≥ 1.3× eager diffusers"},
    {"goal": 1.0, "framework": None, "against": "best", "label": "fastest ≥ 1.0× best peer",
     "text": "fastest Keras backend ≥ 1.0× the best diffusers variant"},
    {"goal": 0.9, "framework": "keras-jax", "against": "best", "label": "JAX ≥ 0.9× best peer",
     "text": "JAX ≥ 0.9× the best diffusers variant"},
)
SAMPLE_GOALS = (
    {"goal": 1.0, "framework": None, "against": "best", "label": "fastest ≥ 1.0× best peer",
     "text": "sampling per NFE: fastest Keras backend ≥ 1.0× the best diffusers variant"},
)
FIRST_CALL_LIMIT_S = 30.0  # issue 19 item 5: first call of the training step
PEAK_RSS_LIMIT = 1.5  # × eager diffusers' peak RSS


def is_peer(name):
    """Whether worker ``name`` is a diffusers variant (``diffusers``, ``diffusers-tuned``, ...)."""
    return name == REFERENCE or name.startswith(REFERENCE + "-")


def _num(x, spec):
    return "—" if x is None or not np.isfinite(x) else format(x, spec)


def _ci_text(ci):
    return f"{ci['ratio']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]"


def build_report(measured, num_resamples=10000, seed=0):
    """Rows, goals and the markdown report from the per-round measurements.

    ``measured`` holds: ``cpu_header`` (harness.cpu_header line), ``network`` (one line),
    ``machine_start`` / ``machine_end`` (harness.machine_description), ``roof_end`` (roof dict
    or None), ``order_seed``, ``workers`` (names; ``REFERENCE`` among them, other diffusers
    variants named ``diffusers-*``), ``tasks``, ``batches`` {task: batch}, ``seconds`` and
    ``cpu_seconds`` {task: {worker: [per round]}}, ``warmup`` {task: {worker: {first_call_s,
    second_call_s}}}, ``matmul_gflops`` {worker: [per round]}, ``forward_flops_per_image`` (or
    None), ``peak_rss_mib`` {worker: MiB}, ``sample_batch``; optional ``torch_threads``
    {worker: threads}, ``sample_jit_compile`` {Keras worker: bool} and ``peer_variants``
    {worker: description}. Round r of every worker's
    list for a task is the same round.
    """
    workers, tasks = measured["workers"], measured["tasks"]
    keras_workers = [w for w in workers if not is_peer(w)]
    peers = [w for w in workers if is_peer(w)]
    flops = measured.get("forward_flops_per_image")
    mm = {w: float(np.median(v)) for w, v in measured["matmul_gflops"].items()}
    rows, goals = [], []
    # Variants of one Keras backend ("tensorflow@sample_xla=1" beside "tensorflow"): each
    # against its base worker, paired by round.
    backend_variants = []
    for task in tasks:
        batch = measured["batches"][task]
        rates = {w: batch / np.asarray(measured["seconds"][task][w], dtype=np.float64)
                 for w in workers}
        medians = {w: float(np.median(rates[w])) for w in workers}
        best = max(peers, key=lambda w: medians[w])

        def ci(w, ref, rates=rates):
            return harness.paired_ratio_ci(rates[w], rates[ref], num_resamples=num_resamples,
                                           seed=seed)
        vs_eager = {w: ci(w, REFERENCE) for w in workers if w != REFERENCE}
        vs_best = {w: ci(w, best) for w in keras_workers}
        for w in keras_workers:
            base = w.partition("@")[0]
            if "@" in w and base in rates:
                backend_variants.append({"task": task, "variant": w, "base": base,
                                         "ratio_ci": ci(base, w)})
        row_goals = {w: [] for w in workers}
        task_goals = TRAIN_GOALS if task == "train" else (
            SAMPLE_GOALS if task in ("ddim", "dpm") else ())
        for g in task_goals:
            cis = vs_eager if g["against"] == "eager" else vs_best
            name = g["framework"] or (max(keras_workers, key=lambda w: cis[w]["ratio"])
                                      if keras_workers else None)
            if name not in cis:
                continue
            status = harness.goal_status(cis[name], g["goal"])
            goals.append({"task": task, "goal": g["goal"], "text": g["text"],
                          "framework": name, "picked": g["framework"] is None,
                          "against": REFERENCE if g["against"] == "eager" else best,
                          "ratio_ci": cis[name], "status": status})
            row_goals[name].append(f"{g['label']}: {status}")
        for w in workers:
            ips = harness.summarize(rates[w])
            cpu_per_image = float(np.median(measured["cpu_seconds"][task][w])) / batch
            per_image = flops * (3.0 if task == "train" else 1.0) if flops else None
            gflops = ips["median"] * per_image / 1e9 if per_image else float("nan")
            warm = measured["warmup"][task][w]
            rows.append({
                "task": task, "framework": w, "batch": batch, "images_per_s": ips,
                "ratio_vs_diffusers": ips["median"] / medians[REFERENCE],  # ratio of medians
                "paired_ratio_vs_diffusers": vs_eager.get(w),
                "best_peer": best, "paired_ratio_vs_best_peer": vs_best.get(w),
                "goals": row_goals[w],
                "gflops": gflops, "matmul_gflops": mm.get(w),
                "first_call_s": warm["first_call_s"], "second_call_s": warm["second_call_s"],
                "cpu_seconds_per_image": cpu_per_image})

    # Item 5: compile time (first call of the training step) and peak memory, single numbers.
    resources = []
    if "train" in tasks:
        for w in keras_workers:
            first = measured["warmup"]["train"][w]["first_call_s"]
            resources.append({"text": f"first call of the training step ≤ "
                                      f"{FIRST_CALL_LIMIT_S:.0f} s", "framework": w,
                              "value": first, "limit": FIRST_CALL_LIMIT_S,
                              "status": "met" if first <= FIRST_CALL_LIMIT_S else "not met"})
    peak = measured["peak_rss_mib"]
    for w in keras_workers:
        limit = PEAK_RSS_LIMIT * peak[REFERENCE]
        resources.append({"text": f"peak RSS ≤ {PEAK_RSS_LIMIT}× eager diffusers' "
                                  f"({limit:.0f} MiB)", "framework": w, "value": peak[w],
                          "limit": limit, "status": "met" if peak[w] <= limit else "not met"})

    overheads = []
    fwd_task = f"forward_b{measured['sample_batch']}"
    if fwd_task in tasks:
        for task in ("ddim", "dpm"):
            if task in tasks:
                for w in workers:
                    over = (np.median(measured["seconds"][task][w]) /
                            np.median(measured["seconds"][fwd_task][w]) - 1.0)
                    overheads.append({"task": task, "framework": w, "overhead": float(over)})

    rounds = sorted({len(v) for t in tasks for v in measured["seconds"][t].values()})
    protocol = (
        f"{measured['network']}; {'/'.join(map(str, rounds))} timed rounds per task, workers in a "
        f"random order each round (order seed {measured['order_seed']}). img/s and IQR: median "
        f"and inter-quartile range over the rounds. ÷ {REFERENCE} (eager) and ÷ best peer (the "
        f"diffusers variant with the highest median on the task): paired by round, the median "
        f"of the per-round ratios with its 95 % percentile-bootstrap interval over rounds "
        f"({num_resamples:,} resamples). Goals (issue 19) are met only when the whole interval "
        f"lies at or above them.")
    lines = [measured["cpu_header"], "", protocol, ""]
    variants = measured.get("peer_variants") or {}
    threads = measured.get("torch_threads") or {}
    for w in peers:
        lines.append(f"- {w}: {variants.get(w, 'diffusers')}"
                     + (f"; torch intra-op threads {threads[w]}" if w in threads else ""))
    for w, jit in (measured.get("sample_jit_compile") or {}).items():
        lines.append(f"- {w}: sampling loops {'with' if jit else 'without'} XLA")
    columns = (f"| task | framework | batch | img/s | IQR | ÷ {REFERENCE} (eager), paired "
               f"[95 % CI] | ÷ best peer [95 % CI] | goal | GFLOP/s | % own mm | 1st call s | "
               f"CPU ms/img |")
    lines += ["", columns, "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        eager = row["paired_ratio_vs_diffusers"]
        ratio = "1 (reference)" if row["framework"] == REFERENCE else _ci_text(eager)
        vs_best = row["paired_ratio_vs_best_peer"]
        best = (f"{_ci_text(vs_best)} ({row['best_peer']})" if vs_best
                else ("best" if row["framework"] == row["best_peer"] else ""))
        own = (100 * row["gflops"] / row["matmul_gflops"]
               if row["matmul_gflops"] and np.isfinite(row["gflops"]) else None)
        lines.append(
            f"| {row['task']} | {row['framework']} | {row['batch']} | "
            f"{row['images_per_s']['median']:.2f} | {row['images_per_s']['iqr']:.2f} | {ratio} | "
            f"{best} | {'; '.join(row['goals'])} | {_num(row['gflops'], '.1f')} | "
            f"{_num(own, '.1f')}{'' if own is None else ' %'} | {row['first_call_s']:.1f} | "
            f"{1e3 * row['cpu_seconds_per_image']:.1f} |")
    notes = ("ddim / dpm rows: NFE·img/s (images × sampler steps per second). GFLOP/s: model "
             "FLOPs (XLA cost analysis of the forward; training 3×) × rate; % own mm: of the "
             "framework's own float32 matmul rate. 1st call: includes compilation (XLA for "
             "Keras, inductor for the compiled peers).")
    lines += ["", notes]
    if goals:
        lines += ["", "Goals of issue 19 (paired ratio [95 % CI] → status):"]
        for g in goals:
            pick = " (highest median ratio in this run)" if g["picked"] else ""
            lines.append(f"- {g['task']}: {g['text']}: {g['framework']}{pick} vs "
                         f"{g['against']} {_ci_text(g['ratio_ci'])} → {g['status']}")
    if backend_variants:
        lines += ["", "Each Keras backend variant against its base worker (paired by round, "
                      "base ÷ variant [95 % CI]):"]
        for v in backend_variants:
            lines.append(f"- {v['task']}: {v['base']} ÷ {v['variant']} {_ci_text(v['ratio_ci'])}")
    if resources:
        lines += ["", "Compile time and memory (issue 19 item 5; single measurements):"]
        for r in resources:
            lines.append(f"- {r['text']}: {r['framework']} {r['value']:.1f} → {r['status']}")
    if overheads:
        lines.append("")
        for o in overheads:
            lines.append(f"- {o['task']} overhead per NFE over the bare forward, "
                         f"{o['framework']}: {100 * o['overhead']:+.1f} %")
    lines += ["", "peak RSS MiB: " + ", ".join(f"{k} {v:.0f}"
                                               for k, v in measured["peak_rss_mib"].items()),
              "framework matmul GFLOP/s (median of the matmul rounds): "
              + ", ".join(f"{k} {v:.1f}" for k, v in mm.items()),
              f"machine at start: {measured['machine_start']}",
              f"machine at end: {measured['machine_end']}"]
    roof_end = measured.get("roof_end")
    if roof_end:
        lines.append(f"float32 matmul roof at end: {roof_end['median']:.1f} GFLOP/s (numpy "
                     f"{roof_end['n']}³, median of {roof_end['repeats']}, IQR "
                     f"{roof_end['iqr']:.1f})")
    return {"rows": rows, "goals": goals, "resources": resources,
            "variants": backend_variants, "sampler_overhead": overheads,
            "markdown": "\n".join(lines) + "\n"}


# ----- parent: the timed rounds ------------------------------------------------------------------
MATMUL_ROUNDS = 3


def _memory_point(request, reply):
    """``[request, resident MiB, peak MiB]`` of a worker right after it answered."""
    return [request, reply.get("rss_mib"), reply.get("peak_rss_mib")]


def write_report(args, measured, run_args):
    """Build the report of ``measured``, print it and write it to ``--markdown`` / ``--json``
    (the JSON with ``run_args``, every raw number and the report); returns its rows."""
    report = build_report(measured, num_resamples=args.bootstrap_resamples)
    print("\n" + report["markdown"], flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report["markdown"])
    if args.json:
        harness.write_json_atomic(args.json, {"args": run_args, **measured, **report})
    return report["rows"]


REPORT_KEYS = ("rows", "goals", "resources", "variants", "sampler_overhead", "markdown")


def report_from(args):
    """Rebuild a saved run's report from its raw numbers (``--report_from``), with the FLOP
    count of ``--forward_flops_per_image`` where given (the old one is kept in the JSON as
    ``forward_flops_per_image_as_run``)."""
    with open(args.report_from) as f:
        saved = json.load(f)
    measured = {k: v for k, v in saved.items() if k != "args" and k not in REPORT_KEYS}
    if args.forward_flops_per_image is not None:
        measured.setdefault("forward_flops_per_image_as_run",
                            measured.get("forward_flops_per_image"))
        measured["forward_flops_per_image"] = args.forward_flops_per_image
    return write_report(args, measured, saved.get("args"))


def main(args):
    if args.report_from:
        return report_from(args)
    if args.logdir:
        os.makedirs(args.logdir, exist_ok=True)
    machine_start = harness.machine_description()
    roof_start = harness.numpy_matmul_roof(args.matmul_n, args.matmul_repeats)  # no workers yet
    print(harness.cpu_header(roof_start), flush=True)
    print(f"machine: {machine_start}", flush=True)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    workers = []
    try:
        for backend in names:
            workers.append(start_worker(args, "keras", backend, f"keras-{backend}"))
        for peer in [x.strip() for x in args.peers.split(",") if x.strip()]:
            workers.append(start_worker(args, "diffusers", None, PEER_WORKERS[peer], peer))
        by_name = {w.name: w for w in workers}
        infos = {w.name: w.request("info") for w in workers}
        # Resident and peak MiB of every worker after each request, in order (where it grows).
        memory_trace = {w.name: [_memory_point("info", infos[w.name])] for w in workers}
        counts = {name: info["params"] for name, info in infos.items()}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"Parameter counts differ, the networks are not the same: {counts}")
        print(f"parameters: {counts[REFERENCE]:,} on every side", flush=True)
        torch_threads = {name: info["torch_threads"] for name, info in infos.items()
                         if "torch_threads" in info}
        print(f"torch intra-op threads: {torch_threads}", flush=True)
        sample_jit = {name: info["sample_jit_compile"] for name, info in infos.items()
                      if "sample_jit_compile" in info}
        print(f"Keras sampling loops XLA-compiled: {sample_jit}", flush=True)
        print(f"malloc ({args.malloc}), GLIBC_TUNABLES per worker: "
              f"{ {w.name: w.glibc_tunables for w in workers} }", flush=True)
        flops = next((i["forward_flops_per_image"] for i in infos.values()
                      if "forward_flops_per_image" in i), None)
        tasks = infos[REFERENCE]["tasks"]
        # One seeded stream of orders: the timed rounds of every task, then the matmul rounds.
        orders = harness.round_orders(list(by_name), args.repeats * len(tasks) + MATMUL_ROUNDS,
                                      args.order_seed)
        warm, times, cpu_times, task_orders = {}, {}, {}, {}
        for i, task in enumerate(tasks):
            warm[task], times[task], cpu_times[task] = {}, {}, {}
            for w in workers:
                first = warm[task][w.name] = w.request("warmup", task=task)
                memory_trace[w.name].append(_memory_point(f"warmup {task}", first))
                print(f"  {w.name:<18} {task:<12} first call {first['first_call_s']:7.1f} s,"
                      f" second {first['second_call_s']:6.2f} s", flush=True)
            task_orders[task] = orders[i * args.repeats:(i + 1) * args.repeats]
            for order in task_orders[task]:
                for name in order:
                    result = by_name[name].request("run", task=task)
                    memory_trace[name].append(_memory_point(f"run {task}", result))
                    times[task].setdefault(name, []).append(result["seconds_per_unit"])
                    cpu_times[task].setdefault(name, []).append(result["cpu_seconds_per_unit"])
        matmul_orders = orders[len(tasks) * args.repeats:]
        matmul = harness.interleave(workers, "matmul", MATMUL_ROUNDS, orders=matmul_orders)
        peaks = {w.name: matmul[w.name][-1]["peak_rss_mib"] for w in workers}
        for name, results in matmul.items():
            memory_trace[name] += [_memory_point("matmul", r) for r in results]
    finally:
        for w in workers:
            w.close()
    roof_end = harness.numpy_matmul_roof(args.matmul_n, args.matmul_repeats)  # workers gone

    measured = {
        "cpu_header": harness.cpu_header(roof_start),
        "network": f"U-Net base_channels {args.base_channels}, {args.image_size}×"
                   f"{args.image_size}, "
                   + ("float32" if args.precision == "float32" else "bf16 mixed precision")
                   + (f", Adam with the gradient clipped to global norm {args.grad_clip_norm:g}"
                      if args.grad_clip_norm > 0 else ""),
        "machine_start": machine_start, "machine_end": harness.machine_description(),
        "roof_start": roof_start, "roof_end": roof_end, "order_seed": args.order_seed,
        "workers": list(by_name), "tasks": tasks,
        "batches": {task: batch_of(task, args) for task in tasks},
        "seconds": times, "cpu_seconds": cpu_times, "warmup": warm,
        "matmul_gflops": {k: [r["gflops"] for r in v] for k, v in matmul.items()},
        "forward_flops_per_image": flops, "peak_rss_mib": peaks, "memory_trace": memory_trace,
        "sample_batch": args.sample_batch, "torch_threads": torch_threads,
        "sample_jit_compile": sample_jit,
        "peer_variants": {PEER_WORKERS[k]: v for k, v in PEER_HELP.items()
                          if PEER_WORKERS[k] in by_name},
        "round_orders": task_orders, "matmul_round_orders": matmul_orders,
    }
    return write_report(args, measured, vars(args))


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        worker_main(parsed)
    else:
        main(parsed)
