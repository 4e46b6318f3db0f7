"""E-TSDM vs the DDPM baseline at CPU scale (the logic of ``benchmarks/etsdm_vs_ddpm.py``).

Two testbeds that converge in minutes on 2 CPU cores (see ``shared/reference/experiments.md``):

* ``gauss2d``: 8 tight Gaussians (std 0.02) on the unit circle, stored as 1×1×2 "images"; an
  MLP denoiser (3×256 SiLU, 64-d sinusoidal label embedding). ε* is known in closed form, so
  the Lipschitz plot also shows the exact curve and the report gives the ε error near t = 0.
  Metrics: sliced Wasserstein-1, energy distance and FD of the raw 2-D points, against fresh
  data.
* ``digits8``: scikit-learn's 8×8 digits with a small ADM U-Net (base 16, mult (1, 2)), trained
  on the 1,438 digits ``classifier_digits8`` was trained on; FD and KID of its features (not
  FID) against the 359 held-out digits of its test split, which neither the models nor the
  classifier saw (``digits_split``), and its classifier score.

For each testbed both arms (DDPM: ``TimestepSharing(0, 0)``; E-TSDM: t̃ = 100, n = 5) are
trained with identical seeds, data order and budgets — two training seeds per arm, so the
seed-to-seed spread can be read next to the difference — then sampled with DDPM (1000 steps),
DDIM 10/20/50 (uniform spacing) and 10 (trailing), DPM-Solver++(2M) and DPM-Solver-3S at 10/20
NFE from the EMA weights (DDPM-1000 on fewer samples: it costs 1000 NFE; both arms always get
the same count). Every row reports which labels the sampler's network evaluations visit
inside [0, t̃): that decides how much E-TSDM's piecewise-constant condition matters.
"""

import dataclasses
import os
import time

import keras
import numpy as np

from keras_etsdm.evaluation import fid
from keras_etsdm.io_utils import atomic_write_text, to_uint8, write_json
from keras_etsdm.evaluation.lipschitz import (GaussianMixtureEpsStar, lipschitz_curve,
                                              model_denoise_fn, write_lipschitz_outputs)


@dataclasses.dataclass
class Settings:
    """Budgets of one run (``full_settings`` / ``quick_settings``)."""

    testbeds: tuple = ("gauss2d", "digits8")
    seeds: tuple = (0, 1)
    gauss_steps: int = 20000
    gauss_batch: int = 512
    gauss_lr: float = 1e-3
    gauss_eval_samples: int = 20000
    gauss_ddpm_samples: int = 5000     # DDPM-1000 costs 1000 NFE: fewer samples (same per arm)
    digits_steps: int = 4000
    digits_batch: int = 64
    digits_lr: float = 2e-3
    digits_eval_samples: int = 1000
    digits_ddpm_samples: int = 500
    ema_decay: float = 0.999
    samplers: tuple = ("ddpm-1000", "ddim-10", "ddim-20", "ddim-50", "ddim-10-trailing",
                       "dpm++2m-10", "dpm++2m-20", "dpm3s-10", "dpm3s-20")
    lipschitz_images: int = 64
    lipschitz_stride: int = 1


def full_settings():
    return Settings()


def quick_settings():
    """CI smoke: a few training steps, one seed per arm, two samplers, small evaluation."""
    return Settings(seeds=(0,), gauss_steps=40, gauss_batch=256, gauss_eval_samples=256,
                    gauss_ddpm_samples=256, digits_steps=10, digits_batch=32,
                    digits_eval_samples=64, digits_ddpm_samples=64,
                    samplers=("ddim-10", "dpm++2m-10"), lipschitz_images=8,
                    lipschitz_stride=7)


# ----- samplers ---------------------------------------------------------------------------------------
def make_sampler(name, schedule):
    """A sampler from a table name such as "ddim-20", "ddim-10-trailing", "dpm++2m-10",
    "dpm3s-20" or "ddpm-1000" (built by ``samplers.build_sampler``)."""
    from keras_etsdm.samplers import build_sampler

    parts = name.split("-")
    kind, steps = parts[0], int(parts[1])
    table = {
        "ddpm": ("ddpm", {}),
        "ddim": ("ddim", {"spacing": parts[2] if len(parts) > 2 else "uniform"}),
        "dpm++2m": ("dpm_solver", {"order": 2, "method": "multistep",
                                   "algorithm": "dpmsolver++"}),
        "dpm3s": ("dpm_solver", {"order": 3, "method": "singlestep", "algorithm": "dpmsolver"}),
    }
    if kind not in table:
        raise ValueError(f"Unknown sampler name {name!r} (e.g. ddim-20, dpm++2m-10, dpm3s-20, "
                         f"ddpm-1000, ddim-10-trailing).")
    sampler, options = table[kind]
    return build_sampler(sampler, schedule, steps, options)


def labels_below(sampler, t_tilde=100.0):
    """``samplers.labels_below`` with the paper's t̃ = 100."""
    from keras_etsdm.samplers import labels_below as below

    return below(sampler, t_tilde)


# ----- testbeds ---------------------------------------------------------------------------------------
def eight_gaussians(std=0.02, radius=1.0):
    angles = 2 * np.pi * np.arange(8) / 8
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1), std


def build_mlp_denoiser(dim=2, width=256, depth=3, embed_dim=64, name="mlp_denoiser"):
    """``{"x": [B, 1, 1, dim], "t": [B]} -> ε̂ [B, 1, 1, dim]``: SiLU MLP on [x, emb(t)]."""
    from keras_etsdm.layers import TimestepEmbedding

    x_in = keras.Input((1, 1, dim), name="x")
    t_in = keras.Input((), name="t")
    emb = TimestepEmbedding(embed_dim, embed_dim, name="time_embedding")(t_in)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(x_in), emb])
    for i in range(depth):
        h = keras.layers.Dense(width, activation="silu", name=f"dense_{i}")(h)
    out = keras.layers.Dense(dim, name="out")(h)
    out = keras.layers.Reshape((1, 1, dim))(out)
    return keras.Model({"x": x_in, "t": t_in}, out, name=name)


def build_digits_unet():
    from keras_etsdm import build_unet

    return build_unet(image_size=8, channels=1, base_channels=16, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_heads=1,
                      resblock_updown=False, use_scale_shift_norm=True)


def make_model(testbed, etsdm, seed, ema_decay=0.999):
    """A fresh ``DiffusionModel``; the network weights depend only on ``seed`` (not the arm)."""
    from keras_etsdm import DiffusionModel, TimestepSharing

    keras.utils.set_random_seed(seed)
    network = build_mlp_denoiser() if testbed == "gauss2d" else build_digits_unet()
    sharing = TimestepSharing(100, 5) if etsdm else TimestepSharing(0, 0)
    return DiffusionModel(network, sharing=sharing, ema_decay=ema_decay, seed=seed)


def training_data(testbed, settings, seed=0):
    """float32 training data ``[N, H, W, C]`` (2-D points as 1×1×2 images)."""
    if testbed == "gauss2d":
        means, std = eight_gaussians()
        n = max(65536 if settings.gauss_steps > 1000 else 4096, settings.gauss_batch)
        points = GaussianMixtureEpsStar(means, std, None).sample(n, seed=1000 + seed)
        return points.astype(np.float32).reshape(n, 1, 1, 2)
    return digits_split()[0]


def digits_split():
    """The 8×8 digits split exactly as ``classifier_digits8`` was trained (class-stratified,
    ``split_indices(labels, 0.2, seed=0)``): float32 training images ``[1438, 8, 8, 1]`` in
    [−1, 1] (what both arms train on) and the 359 held-out images as uint8 (the FD / KID
    reference: neither the diffusion models nor the feature classifier saw them)."""
    from keras_etsdm.data import embedded
    from keras_etsdm.evaluation.classifier import split_indices

    images, labels = embedded.load_digits(8, with_labels=True)
    train_idx, test_idx = split_indices(np.asarray(labels), test_fraction=0.2, seed=0)
    return images[train_idx], to_uint8(images[test_idx])


def train(model, data, steps, batch_size, learning_rate, seed):
    """``model.fit`` for ``steps`` steps on a seeded, repeated, shuffled tf.data stream.

    Returns (seconds, final loss). The data order depends only on ``seed``, so both arms see
    identical batches.
    """
    import tensorflow as tf

    from keras_etsdm.training import make_optimizer

    dataset = (tf.data.Dataset.from_tensor_slices(data)
               .repeat()
               .shuffle(min(len(data), 10000), seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size, drop_remainder=True)
               .prefetch(2))
    model.compile(optimizer=make_optimizer(learning_rate, warmup_steps=min(500, steps // 10),
                                           grad_clip_norm=1.0))
    start = time.perf_counter()
    history = model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return time.perf_counter() - start, float(history.history["loss"][-1])


# ----- 2-D metrics ------------------------------------------------------------------------------------
def sliced_wasserstein_1(a, b, num_projections=128, seed=0):
    """Mean over random unit directions of the 1-D Wasserstein-1 distance (equal sizes)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    directions = np.random.default_rng(seed).standard_normal((a.shape[1], num_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def energy_distance(a, b, max_points=2000):
    """2 E‖X − Y‖ − E‖X − X′‖ − E‖Y − Y′‖ on the first ``max_points`` of each set."""
    a = np.asarray(a, np.float64)[:max_points]
    b = np.asarray(b, np.float64)[:max_points]

    def mean_dist(x, y):
        return float(np.mean(np.sqrt(np.maximum(
            np.sum(x**2, 1)[:, None] + np.sum(y**2, 1)[None] - 2 * x @ y.T, 0.0))))

    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def eps_error_near_zero(model, eps_star, x0, labels=(0, 2, 5, 10, 20, 50, 100, 500), seed=0):
    """E‖ε_θ(x_t, t) − ε*(x_t, t)‖² per label (the network's fit where sharing acts)."""
    fn = model_denoise_fn(model)
    noise = np.random.default_rng(seed).standard_normal(x0.shape)
    out = {}
    for t in labels:
        a, s = model.schedule.alphas[t], model.schedule.sigmas[t]
        x = (a * x0 + s * noise).astype(np.float32)
        tt = np.full(len(x), float(t), np.float32)
        diff = fn(x, tt).reshape(len(x), -1) - eps_star(x, tt).reshape(len(x), -1)
        out[str(t)] = float(np.mean(np.sum(diff**2, axis=1)))
    return out


# ----- evaluation ----------------------------------------------------------------------------------------
def draw(model, sampler, num_samples, seed, batch_size):
    from keras_etsdm.samplers import sampling

    return sampling.generate(model, sampler, num_samples, batch_size=batch_size, seed=seed)


def evaluate_samples(testbed, samples, reference):
    """Metrics of one sampler run. ``reference``: 2-D points or ``(extractor, stats)``."""
    if testbed == "gauss2d":
        points = samples.reshape(len(samples), -1)
        reference = reference[:len(points)]  # equal sizes: FD / energy biases match per row
        if not np.all(np.isfinite(points)):
            return {"sliced_w1": float("nan"), "energy": float("nan"), "fd_raw2d": float("nan")}
        return {"sliced_w1": sliced_wasserstein_1(points, reference),
                "energy": energy_distance(points, reference),
                "fd_raw2d": fid.frechet_distance_from_activations(points, reference)}
    extractor, stats = reference
    return fid.evaluate_images(to_uint8(samples), extractor, stats, batch_size=500)


PRIMARY_METRIC = {"gauss2d": "sliced_w1", "digits8": "fd"}
METRIC_LABELS = {"sliced_w1": "sliced W1", "energy": "energy distance",
                 "fd_raw2d": "FD (raw 2-D)", "fd": "FD (classifier_digits8)",
                 "kid": "KID (classifier_digits8)", "classifier_score": "classifier score"}


def run_comparison(output_dir, settings=None, log=print):
    """Train both arms on every testbed, evaluate every sampler, write the report.

    Writes into ``output_dir``: ``results.json`` (every number with its provenance),
    ``results.md`` (the tables), ``lipschitz_<testbed>.csv/png`` and ``samples_<testbed>_*.png``.
    Returns the results dict.
    """
    settings = settings or full_settings()
    os.makedirs(output_dir, exist_ok=True)
    started = time.perf_counter()
    results = {"settings": dataclasses.asdict(settings), "backend": keras.backend.backend(),
               "testbeds": {}}
    for testbed in settings.testbeds:
        results["testbeds"][testbed] = _run_testbed(testbed, settings, output_dir, log)
        _write_reports(output_dir, results)
    results["total_seconds"] = time.perf_counter() - started
    _write_reports(output_dir, results)
    log(f"done in {results['total_seconds']:.0f} s -> {output_dir}")
    return results


def _run_testbed(testbed, settings, output_dir, log):
    from keras_etsdm import DiscreteVPSchedule

    gauss = testbed == "gauss2d"
    steps = settings.gauss_steps if gauss else settings.digits_steps
    batch = settings.gauss_batch if gauss else settings.digits_batch
    lr = settings.gauss_lr if gauss else settings.digits_lr
    num_eval = settings.gauss_eval_samples if gauss else settings.digits_eval_samples
    num_ddpm = settings.gauss_ddpm_samples if gauss else settings.digits_ddpm_samples
    schedule = DiscreteVPSchedule()
    means, std = eight_gaussians()
    eps_star = GaussianMixtureEpsStar(means, std, schedule)
    if gauss:
        reference = eps_star.sample(num_eval, seed=12345)
        lipschitz_x0 = eps_star.sample(settings.lipschitz_images, seed=777).reshape(-1, 1, 1, 2)
    else:
        from keras_etsdm.evaluation.features import ClassifierExtractor

        extractor = ClassifierExtractor("digits8")
        train_images, heldout = digits_split()
        reference = (extractor, fid.compute_reference_statistics(heldout, extractor, 500))
        real = to_uint8(train_images)
        pick = np.random.default_rng(777).choice(len(real), settings.lipschitz_images, False)
        lipschitz_x0 = real[np.sort(pick)].astype(np.float32) / 127.5 - 1.0
    samplers = {name: make_sampler(name, schedule) for name in settings.samplers}
    num_samples = {name: min(num_ddpm, num_eval) if name.startswith("ddpm") else num_eval
                   for name in samplers}
    out = {"train_steps": steps, "batch_size": batch, "learning_rate": lr,
           "reference": ("fresh 2-D samples of the mixture (seed 12345)" if gauss else
                         f"{reference[1].count} held-out 8x8 digits (classifier_digits8's "
                         f"test split; both arms train on the other {len(train_images)})"),
           "num_eval_samples": num_eval, "num_samples": num_samples, "runs": [],
           "labels_below_t_tilde": {n: labels_below(s) for n, s in samplers.items()},
           "nfe": {n: s.num_iterations for n, s in samplers.items()}}
    timesteps = np.arange(0, schedule.num_timesteps - 1, settings.lipschitz_stride)
    curves = {}
    if gauss:
        curves["exact eps*"] = lipschitz_curve(eps_star, lipschitz_x0, schedule, timesteps)
    for seed in settings.seeds:
        data = training_data(testbed, settings, seed)
        for arm in ("ddpm", "etsdm"):
            model = make_model(testbed, arm == "etsdm", seed, settings.ema_decay)
            seconds, loss = train(model, data, steps, batch, lr, seed)
            log(f"[{testbed}] {arm} seed {seed}: {steps} steps in {seconds:.0f} s "
                f"(loss {loss:.4f})")
            run = {"arm": arm, "seed": seed, "train_seconds": seconds, "final_loss": loss,
                   "weights": "ema", "metrics": {}, "sample_seconds": {}}
            with model.ema_scope(True):
                if gauss:
                    run["eps_error"] = eps_error_near_zero(
                        model, eps_star, eps_star.sample(512, seed=99).reshape(-1, 1, 1, 2))
                for name, sampler in samplers.items():
                    t0 = time.perf_counter()
                    samples = draw(model, sampler, num_samples[name], seed=10_000 + seed,
                                   batch_size=num_samples[name] if gauss else 500)
                    run["sample_seconds"][name] = time.perf_counter() - t0
                    run["metrics"][name] = evaluate_samples(testbed, samples, reference)
                    if name == settings.samplers[0] or name == "dpm++2m-20":
                        _save_samples(output_dir, testbed, arm, seed, name, samples)
                    metric = PRIMARY_METRIC[testbed]
                    log(f"    {name:>18}: {metric} {run['metrics'][name][metric]:.4g} "
                        f"({run['sample_seconds'][name]:.1f} s)")
                if seed == settings.seeds[0]:
                    curves[f"{arm} (seed {seed})"] = lipschitz_curve(
                        model_denoise_fn(model), lipschitz_x0, schedule, timesteps,
                        sharing=model.sharing)
            out["runs"].append(run)
    csv_path, png_path = write_lipschitz_outputs(
        output_dir, curves, prefix=f"lipschitz_{testbed}",
        title=f"{testbed}: K(t) of the trained EMA networks")
    out["lipschitz"] = {"csv": os.path.basename(csv_path), "png": os.path.basename(png_path),
                        "k_at_0": {k: float(c["k_one_step"][0]) for k, c in curves.items()},
                        "shared_slope_at_0": {k: float(c["k_shared_slope"][0])
                                              for k, c in curves.items() if c["delta"] > 0}}
    return out


def _save_samples(output_dir, testbed, arm, seed, sampler_name, samples):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(output_dir, f"samples_{testbed}_{arm}_seed{seed}_{sampler_name}.png")
    fig, ax = plt.subplots(figsize=(4, 4))
    if testbed == "gauss2d":
        pts = samples.reshape(len(samples), -1)
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3)
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_aspect("equal")
    else:
        from keras_etsdm.io_utils import image_grid

        grid = image_grid(to_uint8(samples[:64]))
        ax.imshow(grid[..., 0], cmap="gray")
        ax.axis("off")
    ax.set_title(f"{arm} seed {seed} {sampler_name}", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----- report ------------------------------------------------------------------------------------------
def summarise(testbed_result, metric):
    """Per sampler: each arm's value per training seed, and the paired difference
    E-TSDM − DDPM per seed (same seed = same data order and evaluation noise)."""
    rows = {}
    for name in testbed_result["nfe"]:
        per_seed = {}
        for r in testbed_result["runs"]:
            if name in r["metrics"] and metric in r["metrics"][name]:
                per_seed.setdefault(str(r["seed"]), {})[r["arm"]] = r["metrics"][name][metric]
        seeds = sorted(per_seed)
        diffs = [per_seed[s]["etsdm"] - per_seed[s]["ddpm"] for s in seeds
                 if {"ddpm", "etsdm"} <= set(per_seed[s])]
        sign = None
        if diffs:
            sign = ("E-TSDM lower on every seed" if all(d < 0 for d in diffs) else
                    "E-TSDM higher on every seed" if all(d > 0 for d in diffs) else "mixed")
        rows[name] = {"seeds": seeds, "per_seed": per_seed, "diffs": diffs, "sign": sign}
    return rows


def format_markdown(results):
    lines = []
    for testbed, res in results["testbeds"].items():
        metrics = res.get("metrics") or (("sliced_w1", "energy", "fd_raw2d")
                                         if testbed == "gauss2d"
                                         else ("fd", "kid", "classifier_score"))
        labels = {**METRIC_LABELS, **res.get("metric_labels", {})}
        seeds = sorted({str(r["seed"]) for r in res["runs"]})
        lines.append(f"### {testbed}: {res['train_steps']} steps, batch {res['batch_size']}, "
                     f"{res['num_eval_samples']} samples, EMA weights, training seeds "
                     f"{', '.join(seeds)}")
        lines.append("")
        if res.get("reference"):
            lines += [f"Reference: {res['reference']}.", ""]
        for metric in metrics:
            better = "higher" if metric == "classifier_score" else "lower"
            lines.append(f"**{labels[metric]}** ({better} is better; values per training "
                         f"seed {' / '.join(seeds)}; paired difference E-TSDM − DDPM per seed; "
                         f"a difference counts only where its sign holds on every seed)")
            lines.append("")
            lines.append("| sampler | NFE | samples | DDPM | E-TSDM | E-TSDM − DDPM | sign | "
                         "labels visited in [0, 100) |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for name, row in summarise(res, metric).items():
                cells = [" / ".join(f"{row['per_seed'][s][arm]:.4g}" if arm in row["per_seed"][s]
                                    else "–" for s in row["seeds"]) for arm in ("ddpm", "etsdm")]
                diffs = " / ".join(f"{d:+.2g}" for d in row["diffs"]) or "–"
                visited = res["labels_below_t_tilde"][name]
                shown = (", ".join(f"{v:g}" for v in visited) if len(visited) <= 12
                         else f"{len(visited)} labels: {visited[0]:g} … {visited[-1]:g}")
                lines.append(f"| {name} | {res['nfe'][name]} | {res['num_samples'][name]} | "
                             f"{cells[0]} | {cells[1]} | {diffs} | {row['sign'] or '–'} | "
                             f"{shown} |")
            lines.append("")
        train = {arm: [r["train_seconds"] for r in res["runs"] if r["arm"] == arm]
                 for arm in ("ddpm", "etsdm")}
        line = ("Training time per model: "
                + ", ".join(f"{name} {np.mean(train[arm]):.0f} s" for arm, name in
                            (("ddpm", "DDPM"), ("etsdm", "E-TSDM")) if train[arm]) + ".")
        lipschitz = res.get("lipschitz")  # absent where no Lipschitz curve was measured
        if lipschitz:
            line = (line[:-1] + ". One-step K(0) = E‖ε(x,0) − ε(x,1)‖: "
                    + ", ".join(f"{k} {v:.3g}" for k, v in lipschitz["k_at_0"].items())
                    + "; E-TSDM slope between its shared values 0 and 20 at t = 0: "
                    + ", ".join(f"{k} {v:.3g}"
                                for k, v in lipschitz["shared_slope_at_0"].items())
                    + f". Plot: {lipschitz['png']}.")
        lines.append(line)
        if testbed == "gauss2d":
            lines.append("")
            lines.append("ε error E‖ε_θ − ε*‖² at label t (mean over seeds):")
            lines.append("")
            labels = list(res["runs"][0]["eps_error"])
            lines.append("| arm | " + " | ".join(f"t={t}" for t in labels) + " |")
            lines.append("|---|" + "---|" * len(labels))
            for arm in ("ddpm", "etsdm"):
                vals = [np.mean([r["eps_error"][t] for r in res["runs"] if r["arm"] == arm])
                        for t in labels]
                lines.append(f"| {arm} | " + " | ".join(f"{v:.3g}" for v in vals) + " |")
        lines.append("")
    if "total_seconds" in results:
        lines.append(f"Total wall time: {results['total_seconds'] / 60:.1f} min "
                     f"(backend {results['backend']}).")
    return "\n".join(lines) + "\n"


def _write_reports(output_dir, results):
    write_json(os.path.join(output_dir, "results.json"), results, indent=2)
    atomic_write_text(os.path.join(output_dir, "results.md"), format_markdown(results))
