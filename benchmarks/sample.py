"""Wall time per NFE of each sampler vs one bare compiled network forward pass (a table, not a test).

    KERAS_BACKEND=jax python benchmarks/sample.py                 # the current backend
    python benchmarks/sample.py --backends=jax,tensorflow         # each in a subprocess, one table

For a small U-Net it measures, on the current backend:

* ``forward``: ONE bare compiled forward pass ``ε̂ = net(x, sharing(t))`` at the same batch, as
  the samplers compile it — ``jax.jit`` with the weights as arguments on JAX,
  ``tf.function(jit_compile=True)`` on TensorFlow — called and waited for once per timing.
* ``loop(net)``: the same network called ``N`` times inside one compiled ``fori_loop`` with no
  sampler arithmetic (x ← ε̂): what the loop alone costs or saves against separate calls.
* each sampler: one ``sampler.sample(model, noise)`` call (everything a user pays: argument
  conversion, the compiled loop, the copy of the result to numpy), divided by its NFE.

``overhead = (time per NFE − forward time) / forward time`` (target < 5 %). Timings are taken in
ROUNDS (forward, then every sampler once, repeat): a drift of the machine's load then hits all
rows alike, and the overhead is the median over rounds of the per-round ratio, with its
inter-quartile range (IQR) as the noise. Compilation is excluded from the medians: ``first call``
is the wall time of the first call (trace + XLA compile + one run), ``compile`` that minus the
median run. ``uptime``'s load average is recorded before and after (the numbers depend on it).
The same overhead is also computed from the process's CPU time (``time.process_time``), which is
the usable measure on a shared, overloaded machine; ``loop(net)`` (no sampler arithmetic at all)
is the control: its overhead shows what the measurement itself reports as "overhead".
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

RESULT_PREFIX = "@@SAMPLE_BENCH "


def summarize(values):
    values = np.asarray(values, dtype=np.float64)
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return {"median": float(q50), "iqr": float(q75 - q25), "n": int(values.size)}


def load_average():
    return [round(v, 2) for v in os.getloadavg()]


def cpu_description():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def sampler_specs(args):
    """(name, factory(schedule)) of the benchmarked samplers."""
    from keras_etsdm.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler

    specs = [
        (f"DDPM respaced {args.ddpm_steps}", lambda s: DDPMSampler(args.ddpm_steps, schedule=s)),
        ("DDPM all 1000", lambda s: DDPMSampler(None, schedule=s)),
        (f"DDIM {args.steps}", lambda s: DDIMSampler(args.steps, schedule=s)),
        (f"DPM-Solver++ 2M {args.steps}",
         lambda s: DPMSolverSampler(args.steps, order=2, schedule=s)),
        (f"DPM-Solver 3S {args.steps}",
         lambda s: DPMSolverSampler(args.steps, order=3, method="singlestep",
                                    algorithm="dpmsolver", skip_type="logSNR", schedule=s)),
    ]
    if args.all_samplers:
        specs += [
            (f"DDIM {args.steps} eta=1",
             lambda s: DDIMSampler(args.steps, eta=1.0, schedule=s)),
            (f"DPM-Solver++ 3M {args.steps}",
             lambda s: DPMSolverSampler(args.steps, order=3, schedule=s)),
        ]
    if args.skip_ddpm_all:
        specs = [spec for spec in specs if spec[0] != "DDPM all 1000"]
    return specs


def compiled_forward(model):
    """A blocking ``forward(x, t) -> numpy`` compiled like the samplers compile the network,
    and a blocking ``loop(x, t, n)`` of n network calls inside one compiled fori_loop."""
    import keras
    from keras import ops

    network, sharing = model.network, model.sharing
    if keras.backend.backend() == "jax":
        import jax

        def denoise(trainable, non_trainable, x, t):
            out, _ = network.stateless_call(trainable, non_trainable,
                                            {"x": x, "t": sharing(t)}, training=False)
            return out

        fwd = jax.jit(denoise)

        def net_loop(trainable, non_trainable, x, t, n):
            return ops.fori_loop(0, n, lambda i, y: denoise(trainable, non_trainable, y, t), x)

        loop = jax.jit(net_loop)

        def weights():
            return ([v.value for v in network.trainable_variables],
                    [v.value for v in network.non_trainable_variables])

        def forward(x, t):
            return np.asarray(fwd(*weights(), x, t))

        def run_loop(x, t, n):
            return np.asarray(loop(*weights(), x, t, n))

        return forward, run_loop
    import tensorflow as tf

    fwd = tf.function(lambda x, t: model.denoise(x, t), jit_compile=True)
    loop = tf.function(lambda x, t, n: ops.fori_loop(0, n, lambda i, y: model.denoise(y, t), x),
                       jit_compile=True)

    def forward(x, t):
        return fwd(x, t).numpy()

    def run_loop(x, t, n):
        return loop(x, t, tf.constant(n, tf.int32)).numpy()

    return forward, run_loop


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


_CPU = {"last": 0.0}


def timed(fn):
    """Wall seconds of ``fn()``; its process CPU seconds (all threads) go to ``_CPU["last"]``:
    on a shared, overloaded machine CPU time is the robust measure (wall time there depends on
    how long a measurement is, since short ones catch whole time slices)."""
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    _CPU["last"] = time.process_time() - cpu
    return wall


def worker(args):
    """Measure on the current backend; print the table and one ``@@SAMPLE_BENCH {json}`` line."""
    import keras
    from keras import ops

    from keras_etsdm import DiffusionModel, TimestepSharing, build_unet

    load_before = load_average()
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=args.size, channels=3, base_channels=args.base_channels,
                         channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
                         dropout=0.0)
    model = DiffusionModel(network, sharing=TimestepSharing(100, 5))
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    t = np.full((args.batch,), 500.0, np.float32)
    x_dev, t_dev = ops.convert_to_tensor(noise), ops.convert_to_tensor(t)

    forward, run_loop = compiled_forward(model)
    first = {"forward": timed(lambda: forward(x_dev, t_dev)),
             "loop(net)": timed(lambda: run_loop(x_dev, t_dev, args.steps))}
    samplers = [(name, make(model.schedule)) for name, make in sampler_specs(args)]
    log(f"forward first call {first['forward']:.2f} s")
    for name, sampler in samplers:
        first[name] = timed(lambda: ops.convert_to_numpy(sampler.sample(model, noise, seed=0)))
        log(f"{name}: first call {first[name]:.2f} s")
    for name, sampler in samplers:  # one untimed warm call each (caches, allocator)
        if sampler.num_iterations <= 200:
            ops.convert_to_numpy(sampler.sample(model, noise, seed=0))

    forward_times, forward_cpu = [], []  # per round: median of args.forward_calls calls
    per_nfe = {"loop(net)": []}
    cpu_ratios = {"loop(net)": []}
    cpu_ratios.update({name: [] for name, _ in samplers})
    per_nfe.update({name: [] for name, _ in samplers})
    ratios = {name: [] for name in per_nfe}
    for round_index in range(args.rounds):
        walls, cpus = [], []
        for _ in range(args.forward_calls):
            walls.append(timed(lambda: forward(x_dev, t_dev)))
            cpus.append(_CPU["last"])
        fwd, fwd_cpu = float(np.median(walls)), float(np.median(cpus))
        forward_times.append(fwd)
        forward_cpu.append(fwd_cpu)
        measured = {"loop(net)": timed(lambda: run_loop(x_dev, t_dev, args.steps)) / args.steps}
        cpu_ratios["loop(net)"].append(_CPU["last"] / args.steps / fwd_cpu - 1.0)
        for name, sampler in samplers:
            if sampler.num_iterations > 200 and round_index >= args.long_rounds:
                continue  # DDPM-1000: its 1000 NFE already average one run
            seconds = timed(lambda: ops.convert_to_numpy(sampler.sample(model, noise, seed=0)))
            measured[name] = seconds / sampler.num_iterations
            cpu_ratios[name].append(_CPU["last"] / sampler.num_iterations / fwd_cpu - 1.0)
        for name, value in measured.items():
            per_nfe[name].append(value)
            ratios[name].append(value / fwd - 1.0)
        log(f"round {round_index + 1}/{args.rounds}: forward {fwd * 1e3:.2f} ms")

    nfe = {"loop(net)": args.steps}
    nfe.update({name: sampler.num_iterations for name, sampler in samplers})
    forward_summary = summarize(forward_times)
    rows = [{"name": "forward (1 call)", "nfe": 1, "first_s": first["forward"],
             "per_nfe": forward_summary, "overhead": None,
             "cpu_ms": summarize(forward_cpu)["median"] * 1e3, "cpu_overhead": None,
             "compile_s": first["forward"] - forward_summary["median"]}]
    for name in per_nfe:
        stats = summarize(per_nfe[name])
        rows.append({"name": name, "nfe": nfe[name], "first_s": first[name], "per_nfe": stats,
                     "overhead": summarize(ratios[name]),
                     "cpu_overhead": summarize(cpu_ratios[name]),
                     "compile_s": first[name] - stats["median"] * nfe[name]})
    result = {"backend": keras.backend.backend(), "machine": cpu_description(),
              "load_before": load_before, "load_after": load_average(),
              "config": {"size": args.size, "base_channels": args.base_channels,
                         "batch": args.batch, "rounds": args.rounds,
                         "forward_calls": args.forward_calls,
                         "params": int(network.count_params())},
              "rows": rows}
    print(format_table([result]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return result


def format_table(results):
    lines = []
    for r in results:
        c = r["config"]
        lines.append(f"backend={r['backend']}  U-Net {c['size']}x{c['size']}x3, base "
                     f"{c['base_channels']}, mult (1, 2), {c['params'] / 1e6:.2f} M params, batch "
                     f"{c['batch']}; {c['rounds']} rounds; {r['machine']}; load average "
                     f"before {r['load_before']} after {r['load_after']}")
    lines.append("")
    header = (f"| {'backend':10s} | {'what':24s} | {'NFE':>4s} | {'ms / NFE (IQR)':>16s} | "
              f"{'overhead (IQR)':>16s} | {'CPU overhead (IQR)':>18s} | {'first call s':>12s} | "
              f"{'compile s':>9s} |")
    lines.append(header)
    lines.append("|" + "|".join("-" * (len(col)) for col in header.split("|")[1:-1]) + "|")
    for r in results:
        for row in r["rows"]:
            per = row["per_nfe"]
            ms = f"{per['median'] * 1e3:.2f} ({per['iqr'] * 1e3:.2f})"
            ov = row["overhead"]
            ov = "—" if ov is None else f"{ov['median']:+.1%} ({ov['iqr']:.1%})"
            cov = row.get("cpu_overhead")
            cov = (f"{row['cpu_ms']:.1f} ms CPU" if cov is None
                   else f"{cov['median']:+.1%} ({cov['iqr']:.1%})")
            lines.append(f"| {r['backend']:10s} | {row['name']:24s} | {row['nfe']:4d} | "
                         f"{ms:>16s} | {ov:>16s} | {cov:>18s} | {row['first_s']:12.2f} | "
                         f"{row['compile_s']:9.2f} |")
    return "\n".join(lines)


def driver(args, argv):
    """Run one worker subprocess per backend (one after the other) and print one table."""
    passthrough = [a for a in argv if not a.startswith("--backends")]
    results = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend.strip(), TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + passthrough,
                              env=env, stdout=subprocess.PIPE, text=True)  # progress: stderr
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:])
            raise SystemExit(f"benchmark worker for {backend} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to run in subprocesses (one table)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--base_channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="DDIM / DPM-Solver steps")
    parser.add_argument("--ddpm_steps", type=int, default=100, help="respaced DDPM steps")
    parser.add_argument("--skip_ddpm_all", action="store_true", help="leave out DDPM-1000")
    parser.add_argument("--long_rounds", type=int, default=1,
                        help="rounds in which samplers of > 200 NFE (DDPM-1000) are timed")
    parser.add_argument("--all_samplers", action="store_true",
                        help="also DDIM eta=1 and DPM-Solver++ 3M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward_calls", type=int, default=5,
                        help="single forward calls per round (their median is the round's)")
    parser.add_argument("--json", default=None, help="driver: also write the results here")
    args = parser.parse_args(argv)
    if args.backends:
        driver(args, argv)
    else:
        worker(args)


if __name__ == "__main__":
    main()
