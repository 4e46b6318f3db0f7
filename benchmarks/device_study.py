#!/usr/bin/env python
"""E-TSDM vs the DDPM baseline at scale, resumable in time-boxed calls (issue 15, item 3).

One command trains both arms (E-TSDM: the gin config as is; DDPM: ``USE_ETSDM = False``) for
every training seed, samples every sampler setting from the EMA weights in chunks of images
(.npz), scores each (arm, seed, setting) against reference statistics of HELD-OUT images, and
writes the paired per-seed report of ``benchmarks/comparison.py``. Each call works until its
time budget is nearly spent, saves, prints what remains and the command to continue, and exits
0; run the same command again until it prints ``done``.

    # CPU smoke run of the whole pipeline (tiny U-Net, embedded MNIST, mnist32 held-out judge)
    python benchmarks/device_study.py --workdir=/tmp/device_study_quick --quick

    # CIFAR-10 on an accelerator, in calls of <= 10 minutes (repeat until it says done)
    timeout 590 python benchmarks/device_study.py --workdir=runs/device_study \
        --gin_file=cifar10.gin --data_dir=/data/cifar10/train \
        --reference_data=/data/cifar10/test --inception_path=/models/tfgan_inception \
        --seeds=0,1,2 --num_samples=10000 --budget_minutes=8

Work directory::

    state.json                       the plan: every stage, its status and progress (atomic)
    reference_<extractor>.npz        reference statistics of the held-out images
    models/<arm>_seed<s>/            bin/train work directories (checkpoints, metrics.jsonl)
    samples/<arm>_seed<s>/<setting>/chunk-00000.npz   uint8 samples, one file per chunk
    scores/<arm>_seed<s>/<setting>.json               FD / KID / classifier score of a setting
    report.md, report.json           the paired report (partial until every stage is done)

Stages, in order: ``reference``; then per training seed ``train(ddpm)``, ``train(etsdm)``, and
per arm and setting ``sample`` (chunks) and ``score``; finally ``report``. A training stage
runs the gin-configured ``train`` of bin/train (``keras_etsdm.config``) with
``train.seed = train.data_seed = <seed>``: both arms start from the same weights and see the
same batches. It stops on a timer through the run driver's own SIGTERM path (checkpoint, then
stop) and resumes from the latest checkpoint on the next call. Every chunk of a seed uses the
same noise for both arms and every setting (noise seed from (seed, chunk index)). A killed call
loses at most the chunk / the training steps since the last checkpoint it was working on.

A setting ending in ``-aware`` samples the E-TSDM arm on its sharing-aware grid and the DDPM
arm on the same knots at its true labels; ``-knots`` samples both arms on those knots at the
true labels (``benchmarks/grid_variants.py`` pairs them with the plain settings).

A study can grow: calling it again with more ``--settings`` (the saved list first, new ones at
the end) appends their stages, setting by setting for every seed and arm, before ``report``;
everything already sampled and scored is kept. Any other change to the study is refused.
"""

import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
import time

from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO_ROOT, "gin")
STATE_FILE = "state.json"
STATE_VERSION = 1
ARMS = ("ddpm", "etsdm")

# Item 1 of issue 15: DDIM 10/20/50 (uniform and trailing), DPM-Solver++ 2M / 3M at 10/20
# (time_uniform and logSNR), DPM-Solver 3S at 10/20, DDPM with all 1000 steps.
FULL_SETTINGS = (
    [f"ddim-{n}-{g}" for g in ("uniform", "trailing") for n in (10, 20, 50)]
    + [f"dpm++{o}-{n}-{g}" for o in ("2m", "3m") for g in ("time_uniform", "logSNR")
       for n in (10, 20)]
    + ["dpm3s-10-logSNR", "dpm3s-20-logSNR", "ddpm-1000"])
QUICK_SETTINGS = ("ddim-5-uniform", "dpm++2m-5-logSNR")  # both visit labels below t~ = 100

# The tiny CPU configuration of --quick: default.gin (embedded MNIST 32x32), a one-level U-Net
# on the 2x2-folded image, no attention, batch 8, no grids or in-training evaluation; no EMA
# and a large learning rate, so that a few steps move the zero-initialised output layer and the
# two arms' samples differ (a pipeline check, not an experiment).
QUICK_BINDINGS = (
    "build_network.fold = 2", "build_network.base_channels = 8", "build_model.ema_decay = 0.0",
    "make_optimizer.learning_rate = 3e-3",
    "build_network.channel_mult = (1,)", "build_network.num_res_blocks = 1",
    "build_network.attention_resolutions = ()", "build_network.dropout = 0.0",
    "train.batch_size = 8", "train.log_every = 1", "train.checkpoint_every = 0",
    "train.sample_every = 0", "train.distribution = 'none'", "make_optimizer.warmup_steps = 2")

FLAGS = flags.FlagValues()  # private: importing this module (tests) defines no global flags
flags.DEFINE_string("workdir", None, "Study directory (state.json, models, samples, report).",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("gin_file", [], "gin config(s) of the E-TSDM arm (default "
                          "default.gin: embedded MNIST); the DDPM arm adds USE_ETSDM = False.",
                          flag_values=FLAGS)
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings (also --gin.NAME=VALUE).",
                          flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Training images (sets the gin macro DATA_PATH), e.g. a "
                    "folder of the CIFAR-10 training PNGs.", flag_values=FLAGS)
flags.DEFINE_list("seeds", None, "Training seeds, the same for both arms (default 0,1,2; "
                  "--quick: 0,1).", flag_values=FLAGS)
flags.DEFINE_integer("train_steps", None, "Training steps per model (default: the gin "
                     "config's train.max_steps; --quick: 4).", flag_values=FLAGS)
flags.DEFINE_list("settings", None, "Sampler settings <kind>-<NFE>[-<grid>][-aware|-knots], "
                  "kind in ddim, ddpm, dpm++2m, dpm++3m, dpm2s, dpm3s; grid: DDIM spacing or "
                  "DPM-Solver skip_type; -aware: the E-TSDM arm's sharing-aware grid, the same "
                  "knots at the true labels for DDPM; -knots: those knots at the true labels "
                  "for both arms (default: the 17 settings of issue 15). On an "
                  "existing study, settings added at the end of its list are appended.",
                  flag_values=FLAGS)
flags.DEFINE_integer("num_samples", None, "N: samples per (arm, seed, setting) (default "
                     "10000; --quick: 16).", flag_values=FLAGS)
flags.DEFINE_integer("ddpm_num_samples", None, "N for ddpm-1000 (1000 NFE per image; "
                     "default --num_samples).", flag_values=FLAGS)
flags.DEFINE_integer("chunk_size", None, "Images per saved chunk (default 1000; --quick: 8).",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "Sampling / feature batch (default 500; --quick: 8).",
                     flag_values=FLAGS)
flags.DEFINE_integer("eval_seed", 0, "Base of the evaluation-noise seeds.", flag_values=FLAGS)
flags.DEFINE_string("reference_stats", None, "Held-out reference statistics: a shipped name "
                    "(mnist32_test) or a .npz from `bin/eval --compute_stats` (default for "
                    "default.gin / --quick: mnist32_test).", flag_values=FLAGS)
flags.DEFINE_string("reference_data", None, "Held-out images to compute the reference "
                    "statistics from (a folder or a .npz of uint8 'images'), e.g. the CIFAR-10 "
                    "TEST split when training on the train split.", flag_values=FLAGS)
flags.DEFINE_string("extractor", "inception", "Extractor for --reference_data: inception | "
                    "classifier_mnist32_heldout | ...", flag_values=FLAGS)
flags.DEFINE_string("inception_path", None, "Local Inception-v3 (tfgan TF-Hub module / "
                    "SavedModel); nothing is downloaded.", flag_values=FLAGS)
flags.DEFINE_float("budget_minutes", 8.0, "Wall time this call may use, minutes.",
                   flag_values=FLAGS)
flags.DEFINE_float("margin_seconds", None, "Reserve at the end of the budget (checkpoint, "
                   "report); default 45 (--quick: 2).", flag_values=FLAGS)
flags.DEFINE_integer("max_units_per_call", 0, "Stop after this many units of work (a "
                     "training chunk, a sample chunk, a score); 0: no limit (tests).",
                     flag_values=FLAGS)
flags.DEFINE_integer("train_chunk_steps", 0, "At most this many training steps per training "
                     "unit (0: until the time budget says stop).", flag_values=FLAGS)
flags.DEFINE_multi_string("trained_models", [], "Models trained elsewhere, used instead of "
                          "training that (arm, seed): arm:seed=<bin/train work directory>, e.g. "
                          "etsdm:2=runs/recipe_study/no_attention_ematracks-seed2 (repeat the "
                          "flag or separate entries by commas). The directory is only read; its "
                          "operative_config.gin must say the arm (USE_ETSDM) and seed "
                          "(train.seed, train.data_seed, build_model.seed) and its latest "
                          "checkpoint be at the study's step count.", flag_values=FLAGS)
flags.DEFINE_boolean("quick", False, "Tiny CPU pipeline (seconds of compute, not an "
                     "experiment).", flag_values=FLAGS)


class StudyError(Exception):
    """A setup problem, reported as one line (missing data, extractor, mismatched state)."""


# ----- options ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    workdir: str
    gin_files: list
    gin_bindings: list
    data_dir: str
    seeds: list
    train_steps: int
    settings: list
    num_samples: int
    ddpm_num_samples: int
    chunk_size: int
    batch_size: int
    eval_seed: int
    reference_stats: str
    reference_data: str
    extractor: str
    inception_path: str
    budget_seconds: float
    margin_seconds: float
    max_units_per_call: int
    train_chunk_steps: int
    quick: bool
    command: str
    backend: str
    trained_models: dict = dataclasses.field(default_factory=dict)  # (arm, seed) -> work dir

    def study_config(self):
        """What defines the study (must not change between calls); budgets may."""
        return {"gin_files": self.gin_files, "gin_bindings": self.gin_bindings,
                "data_dir": self.data_dir, "seeds": self.seeds, "train_steps": self.train_steps,
                "settings": self.settings, "num_samples": self.num_samples,
                "ddpm_num_samples": self.ddpm_num_samples, "chunk_size": self.chunk_size,
                "eval_seed": self.eval_seed, "reference_stats": self.reference_stats,
                "reference_data": self.reference_data, "extractor": self.extractor,
                "quick": self.quick,
                "trained_models": {f"{arm}:{seed}": path for (arm, seed), path
                                   in sorted(self.trained_models.items())},
                # the backends draw different sampling noise from the same seeds: one study,
                # one backend
                "backend": self.backend}


def split_gin_flags(argv):
    """``--gin.NAME=VALUE`` arguments → gin bindings (as bin/train)."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return rest, bindings


def parse_options(argv):
    """Options from a command line (``argv[0]`` is the program)."""
    rest, extra = split_gin_flags(list(argv))
    FLAGS.unparse_flags()
    FLAGS(rest)
    if not FLAGS.workdir:
        raise StudyError("--workdir is required.")
    quick = FLAGS.quick
    gin_files = list(FLAGS.gin_file) or ["default.gin"]
    backend = _backend()
    quick_bindings = list(QUICK_BINDINGS) if quick else []
    if quick and backend == "tensorflow":
        # TF's XLA compilation of even the tiny train step takes ~20 s per model on 2 cores;
        # a graph-mode (tf.function) step is traced in less than half that. Devices: XLA.
        quick_bindings.append("train.jit_compile = False")
    bindings = quick_bindings + list(FLAGS.gin_bindings) + extra
    num_samples = FLAGS.num_samples or (16 if quick else 10000)
    reference_stats = FLAGS.reference_stats
    if reference_stats is None and FLAGS.reference_data is None and \
            gin_files == ["default.gin"]:
        reference_stats = "mnist32_test"  # the shipped held-out MNIST test statistics
    settings = list(FLAGS.settings or (QUICK_SETTINGS if quick else FULL_SETTINGS))
    for name in settings:
        parse_setting(name)  # fail now on a typo
    seeds = [int(s) for s in (FLAGS.seeds or (["0", "1"] if quick else ["0", "1", "2"]))]
    trained_models = parse_trained_models(
        [e for value in FLAGS.trained_models for e in value.split(",") if e.strip()], seeds)
    command = "python " + " ".join(shlex.quote(a) for a in argv)
    margin = FLAGS.margin_seconds
    return Options(
        workdir=FLAGS.workdir, gin_files=gin_files, gin_bindings=bindings,
        data_dir=FLAGS.data_dir, seeds=seeds,
        train_steps=FLAGS.train_steps or (4 if quick else None), settings=settings,
        num_samples=num_samples, ddpm_num_samples=FLAGS.ddpm_num_samples or num_samples,
        chunk_size=FLAGS.chunk_size or (8 if quick else 1000),
        batch_size=FLAGS.batch_size or (8 if quick else 500), eval_seed=FLAGS.eval_seed,
        reference_stats=reference_stats, reference_data=FLAGS.reference_data,
        extractor=FLAGS.extractor, inception_path=FLAGS.inception_path,
        budget_seconds=FLAGS.budget_minutes * 60.0,
        margin_seconds=margin if margin is not None else (2.0 if quick else 45.0),
        max_units_per_call=FLAGS.max_units_per_call, train_chunk_steps=FLAGS.train_chunk_steps,
        quick=quick, command=command, backend=backend, trained_models=trained_models)


def parse_trained_models(entries, seeds):
    """``["etsdm:2=runs/x", ...]`` → ``{("etsdm", 2): "runs/x"}`` (checked: arm, seed, folder)."""
    models = {}
    for entry in entries:
        key, sep, path = entry.partition("=")
        arm, colon, seed = key.partition(":")
        if not (sep and colon and path and seed.strip().lstrip("-").isdigit()):
            raise StudyError(f"--trained_models entry {entry!r} is not arm:seed=<work directory> "
                             f"(e.g. etsdm:2=runs/recipe_study/no_attention_ematracks-seed2).")
        arm, seed = arm.strip(), int(seed)
        if arm not in ARMS:
            raise StudyError(f"--trained_models entry {entry!r}: arm {arm!r} is not one of "
                             f"{', '.join(ARMS)}.")
        if seed not in seeds:
            raise StudyError(f"--trained_models entry {entry!r}: seed {seed} is not one of the "
                             f"study's --seeds {seeds}.")
        if (arm, seed) in models:
            raise StudyError(f"--trained_models names {arm}:{seed} twice.")
        # the directory is checked when its stage comes up: it may still be training now
        models[(arm, seed)] = path
    return models


def check_trained_model(opts, arm, seed, target_steps):
    """The path of a given model's latest checkpoint, after checking that its operative config
    is this (arm, seed) of the study and that the checkpoint is at the study's step count."""
    from keras_etsdm.checkpoint import list_checkpoints

    workdir = opts.trained_models[(arm, seed)]
    if not os.path.isdir(workdir):
        raise StudyError(f"--trained_models {arm}:{seed}: {workdir} is not a directory.")
    config_path = os.path.join(workdir, "operative_config.gin")
    if not os.path.isfile(config_path):
        raise StudyError(f"--trained_models {arm}:{seed}: {config_path} is missing (expected a "
                         f"bin/train work directory).")
    with open(config_path) as f:
        text = f.read()
    expected = {"USE_ETSDM": str(arm == "etsdm"), "train.seed": str(seed),
                "train.data_seed": str(seed), "build_model.seed": str(seed)}
    for name, value in expected.items():
        found = [line.split("=", 1)[1].strip() for line in text.splitlines()
                 if line.split("=", 1)[0].strip() == name]
        if found != [value]:
            raise StudyError(f"--trained_models {arm}:{seed}: {config_path} has {name} = "
                             f"{found[0] if found else '(unset)'}, expected {value}.")
    checkpoints = list_checkpoints(workdir)
    step, checkpoint = checkpoints[-1] if checkpoints else (None, None)
    if step != target_steps:
        raise StudyError(f"--trained_models {arm}:{seed}: the latest checkpoint in {workdir} is "
                         f"at step {step}, the study's models train {target_steps} steps.")
    return checkpoint


# ----- sampler settings ---------------------------------------------------------------------------
_DPM = {"dpm++2m": {"order": 2, "method": "multistep", "algorithm": "dpmsolver++"},
        "dpm++3m": {"order": 3, "method": "multistep", "algorithm": "dpmsolver++"},
        "dpm2s": {"order": 2, "method": "singlestep", "algorithm": "dpmsolver"},
        "dpm3s": {"order": 3, "method": "singlestep", "algorithm": "dpmsolver"}}


GRID_SUFFIXES = ("aware", "knots")


def parse_setting(name):
    """``"ddim-10-trailing"`` → ``("ddim", 10, {"spacing": "trailing"})`` (build_sampler args).

    A final ``-aware`` asks for the sampler's sharing-aware grid (``sharing_aware=True``: knots
    on the E-TSDM model's piece boundaries, each step at its piece's shared label), e.g.
    ``dpm++3m-20-time_uniform-aware``; ``-knots`` for the same knots with the network at the
    true labels on both arms (``sharing_labels=False``)."""
    parts = name.split("-")
    suffix = parts[-1] if len(parts) > 2 and parts[-1] in GRID_SUFFIXES else None
    if suffix:
        parts = parts[:-1]
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise StudyError(f"Setting {name!r} is not <kind>-<NFE>[-<grid>][-aware|-knots] (e.g. "
                         f"ddim-20-trailing, dpm++2m-10-logSNR, ddpm-1000, "
                         f"dpm++3m-20-time_uniform-aware).")
    kind, steps = parts[0], int(parts[1])
    grid = parts[2] if len(parts) == 3 else None
    if grid is not None and kind in ("ddim", *_DPM):
        from keras_etsdm.samplers.ddim import DDIM_SPACINGS
        from keras_etsdm.samplers.dpm_solver import SKIP_TYPES

        grids = DDIM_SPACINGS if kind == "ddim" else SKIP_TYPES
        if grid not in grids:
            raise StudyError(f"Setting {name!r}: unknown grid {grid!r} for {kind}; expected one "
                             f"of {', '.join(grids)}.")
    extra = ({} if suffix is None else {"sharing_aware": True} if suffix == "aware"
             else {"sharing_aware": True, "sharing_labels": False})
    if kind == "ddim":
        return "ddim", steps, {"spacing": grid or "uniform", **extra}
    if kind == "ddpm":
        if grid:
            raise StudyError(f"Setting {name!r}: DDPM has no grid option.")
        return "ddpm", steps, extra
    if kind in _DPM:
        return "dpm_solver", steps, {**_DPM[kind], "skip_type": grid or "time_uniform", **extra}
    raise StudyError(f"Setting {name!r}: unknown kind {kind!r}; expected ddim, ddpm, "
                     f"{', '.join(_DPM)}.")


def build_setting_sampler(name, schedule, sharing=None, knots_of=None):
    """The sampler of a setting for a model with this ``sharing``.

    An ``-aware`` setting gets the sharing-aware grid when ``sharing`` is enabled (the E-TSDM
    arm). A model without sharing (the DDPM arm) gets the same knots, those of ``knots_of``
    (the E-TSDM arm's map), with the network at the true labels (``sharing_labels=False``):
    both arms of the pair run on one grid, and the relabelling is all that differs. A
    ``-knots`` setting runs both arms that way."""
    from keras_etsdm.samplers import build_sampler

    sampler, steps, options = parse_setting(name)
    if not options.pop("sharing_aware", False):
        return build_sampler(sampler, schedule, steps, options)
    if options.get("sharing_labels", True) and sharing is not None and sharing.enabled:
        return build_sampler(sampler, schedule, steps, {**options, "sharing_aware": True},
                             sharing)
    if knots_of is None or not knots_of.enabled:
        raise StudyError(f"Setting {name!r} on a model without E-TSDM sharing needs the "
                         f"E-TSDM arm's sharing map for its knots.")
    return build_sampler(sampler, schedule, steps,
                         {**options, "sharing_aware": True, "sharing_labels": False}, knots_of)


def noise_seed(eval_seed, training_seed, chunk):
    """The noise seed of one chunk: the same for both arms and every setting of a seed."""
    import numpy as np

    return int(np.random.SeedSequence([eval_seed, training_seed, chunk]).generate_state(1)[0]
               >> 1)


# ----- the plan -----------------------------------------------------------------------------------
def make_plan(opts):
    stages = [{"id": "reference", "kind": "reference", "status": "pending"}]
    for seed in opts.seeds:
        for arm in ARMS:
            stages.append({"id": f"train/{arm}/seed{seed}", "kind": "train", "arm": arm,
                           "seed": seed, "status": "pending", "step": 0, "calls": []})
        for arm in ARMS:
            for setting in opts.settings:
                stages += setting_stages(opts, setting, [seed], [arm])
    stages.append({"id": "report", "kind": "report", "status": "pending"})
    return stages


def setting_stages(opts, setting, seeds, arms=ARMS):
    """The sample and score stages of one setting, per seed and arm."""
    n = opts.ddpm_num_samples if setting.startswith("ddpm-") else opts.num_samples
    chunks = -(-n // opts.chunk_size)
    stages = []
    for seed in seeds:
        for arm in arms:
            stages.append({"id": f"sample/{arm}/seed{seed}/{setting}", "kind": "sample",
                           "arm": arm, "seed": seed, "setting": setting, "status": "pending",
                           "num_samples": n, "num_chunks": chunks, "chunks_done": 0,
                           "chunk_seconds": []})
            stages.append({"id": f"score/{arm}/seed{seed}/{setting}", "kind": "score",
                           "arm": arm, "seed": seed, "setting": setting,
                           "status": "pending"})
    return stages


def add_settings(opts, state, log=print):
    """Appends to a study the settings that ``opts.settings`` lists after the saved ones.

    The new stages run setting by setting (every seed and arm of one setting before the next),
    so a budget that runs out leaves whole settings scored; the report is rewritten at the end.
    Returns the names added (none when the lists agree)."""
    saved = state["config"]["settings"]
    if opts.settings[:len(saved)] != saved:
        raise StudyError(f"--settings may only append to the study's settings {saved} "
                         f"(same order, new ones at the end); got {opts.settings}. Use a new "
                         f"--workdir for another selection.")
    added = opts.settings[len(saved):]
    if added:
        new = [st for setting in added for st in setting_stages(opts, setting, opts.seeds)]
        report = [s for s in state["stages"] if s["kind"] == "report"]
        state["stages"] = [s for s in state["stages"] if s["kind"] != "report"] + new + report
        for stage in report:
            stage["status"] = "pending"
        state["config"]["settings"] = list(opts.settings)
        state.setdefault("settings_added", []).append({"time": time.time(), "settings": added})
        save_state(opts, state)
        log(f"Added {len(added)} setting(s) to the study ({', '.join(added)}): "
            f"{len(new)} new stages.")
    return added


def load_or_create_state(opts, log=print):
    path = os.path.join(opts.workdir, STATE_FILE)
    config = opts.study_config()
    if os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)
        saved = state.get("config", {})
        changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if changed == ["settings"]:  # a grown settings list: append, keep everything done
            add_settings(opts, state, log)
            changed = []
        if changed:
            raise StudyError(f"{path} is a study with other settings ({', '.join(changed)} "
                             f"differ: saved {[saved.get(k) for k in changed]}, now "
                             f"{[config.get(k) for k in changed]}); use the original command "
                             f"or a new --workdir.")
        return state
    os.makedirs(opts.workdir, exist_ok=True)
    state = {"version": STATE_VERSION, "config": config, "created": time.time(),
             "calls": [], "stages": make_plan(opts)}
    save_state(opts, state)
    return state


def save_state(opts, state):
    from keras_etsdm.io_utils import write_json

    write_json(os.path.join(opts.workdir, STATE_FILE), state, indent=1)  # temp + os.replace


def model_dir(opts, arm, seed):
    if (arm, seed) in opts.trained_models:
        return opts.trained_models[(arm, seed)]
    return os.path.join(opts.workdir, "models", f"{arm}_seed{seed}")


def chunk_path(opts, stage, chunk):
    return os.path.join(opts.workdir, "samples", f"{stage['arm']}_seed{stage['seed']}",
                        stage["setting"], f"chunk-{chunk:05d}.npz")


def score_path(opts, stage):
    return os.path.join(opts.workdir, "scores", f"{stage['arm']}_seed{stage['seed']}",
                        f"{stage['setting']}.json")


def reference_file(opts):
    return os.path.join(opts.workdir, f"reference_{opts.extractor}.npz")


# ----- set-up checks (one clear line each) --------------------------------------------------------
CIFAR_HELP = ("CIFAR-10 is not downloaded by this script: export the training and test splits "
              "of https://www.cs.toronto.edu/~kriz/cifar.html (python batches) to two folders of "
              "PNGs and pass --data_dir=<train folder> --reference_data=<test folder> (or a "
              "prepared TFDS copy: --gin.make_dataset.source=\"'tfds'\").")


def check_setup(opts):
    if opts.data_dir is not None and not os.path.exists(opts.data_dir):
        raise StudyError(f"--data_dir={opts.data_dir} does not exist. {CIFAR_HELP}")
    if opts.reference_stats is None and opts.reference_data is None:
        raise StudyError("No held-out reference: pass --reference_data=<images the models never "
                         "train on, e.g. the CIFAR-10 test split> (with --inception_path) or "
                         "--reference_stats=<.npz>. " + CIFAR_HELP)
    if opts.reference_data is not None:
        if not os.path.exists(opts.reference_data):
            raise StudyError(f"--reference_data={opts.reference_data} does not exist. "
                             + CIFAR_HELP)
        if opts.data_dir and os.path.realpath(opts.reference_data) == \
                os.path.realpath(opts.data_dir):
            raise StudyError("--reference_data is the training data: the reference must be "
                             "images the models never trained on (e.g. the test split).")
        if opts.extractor.startswith("inception") and not (
                opts.inception_path and os.path.isfile(
                    os.path.join(os.path.expanduser(opts.inception_path), "saved_model.pb"))):
            raise StudyError(f"--inception_path={opts.inception_path}: no Inception-v3 SavedModel "
                             f"(saved_model.pb) there; FID needs a local copy of the tfgan "
                             f"module (see keras_etsdm/evaluation/features.py for how to get "
                             f"it; nothing is downloaded).")
    elif not opts.reference_stats.endswith(".npz"):
        from keras_etsdm.evaluation import heldout

        if not os.path.isfile(heldout.reference_path(opts.reference_stats)):
            raise StudyError(f"--reference_stats={opts.reference_stats}: no such shipped "
                             f"statistics (expected e.g. mnist32_test) and not a .npz file.")
    elif not os.path.isfile(opts.reference_stats):
        raise StudyError(f"--reference_stats={opts.reference_stats} does not exist; create it "
                         f"with `bin/eval --compute_stats --data=<held-out images> "
                         f"--stats_path=...`.")
    parse_gin(opts, "etsdm", opts.seeds[0])  # a missing DATA_PATH etc. fails here


def parse_gin(opts, arm, seed, max_steps=None):
    """Parse the study's gin config for one (arm, seed); returns the bindings used."""
    import gin
    from keras_etsdm import config

    bindings = list(opts.gin_bindings)
    if opts.data_dir is not None:
        bindings.append(f"DATA_PATH = {opts.data_dir!r}")
    bindings += [f"USE_ETSDM = {arm == 'etsdm'}", f"train.seed = {seed}",
                 f"train.data_seed = {seed}", f"build_model.seed = {seed}",
                 "train.eval_every = 0"]
    if max_steps is not None:
        bindings.append(f"train.max_steps = {int(max_steps)}")
    gin.clear_config()
    try:
        config.parse(opts.gin_files, bindings, search_paths=[GIN_DIR])
    except ValueError as error:
        message = str(error).splitlines()[0]
        if "DATA_PATH" in message:
            raise StudyError(f"{opts.gin_files} needs training data: pass --data_dir. "
                             + CIFAR_HELP) from None
        raise StudyError(f"gin: {message}") from None
    return bindings


def gin_max_steps(opts):
    import gin

    parse_gin(opts, "etsdm", opts.seeds[0])
    return int(gin.query_parameter("train.max_steps"))


# ----- the runner ---------------------------------------------------------------------------------
class Runner:
    """Runs stages until the budget (or the unit limit) is spent."""

    def __init__(self, opts, state, log=print):
        self.opts, self.state, self.log = opts, state, log
        self.start = time.time()
        self.deadline = self.start + opts.budget_seconds - opts.margin_seconds
        self.units = 0
        self.stop_requested = False  # an external SIGTERM / SIGINT between units
        self.timer_fired = False
        self._models = {}
        self._samplers = {}
        self._reference = None
        self._extractor = None
        self.call = {"started": self.start, "units": [], "budget_seconds": opts.budget_seconds}

    # -- budget
    def remaining(self):
        return self.deadline - time.time()

    def may_start(self, estimate=0.0):
        if self.stop_requested:
            return False
        if self.opts.max_units_per_call and self.units >= self.opts.max_units_per_call:
            return False
        return self.remaining() > estimate

    def done_unit(self, stage, seconds, what):
        self.units += 1
        self.call["units"].append({"stage": stage["id"], "what": what,
                                   "seconds": round(seconds, 3)})
        save_state(self.opts, self.state)
        self.log(f"[{time.time() - self.start:7.1f} s] {stage['id']}: {what} ({seconds:.1f} s)")

    # -- stages
    def run(self):
        for stage in self.state["stages"]:
            if stage["status"] == "done":
                continue
            handler = getattr(self, f"_run_{stage['kind']}")
            finished = handler(stage)
            if not finished:
                return False
        return True

    def _run_reference(self, stage):
        if not self.may_start():
            return False
        t0 = time.time()
        opts = self.opts
        if opts.reference_data is not None:
            from keras_etsdm.evaluation import evaluate

            image_size, channels = self._image_shape()
            ref = evaluate.compute_stats(opts.reference_data, reference_file(opts),
                                         opts.extractor, opts.inception_path, image_size,
                                         channels, opts.batch_size)
            stage["file"] = os.path.basename(reference_file(opts))
            what = f"{ref.count} held-out images -> {stage['file']} ({ref.extractor})"
        else:
            ref = self.reference()
            what = f"shipped/given statistics {opts.reference_stats} ({ref.count} images)"
        expected = ref.metadata.get("image_shape")
        image_size, channels = self._image_shape()
        if expected is not None and list(expected) != [image_size, image_size, channels]:
            raise StudyError(f"The reference statistics are of {list(expected)} images but the "
                             f"models make {[image_size, image_size, channels]}; use held-out "
                             f"images of the training data's shape.")
        stage.update(status="done", extractor=ref.extractor, count=int(ref.count))
        self.done_unit(stage, time.time() - t0, what)
        return True

    def _image_shape(self):
        import gin

        parse_gin(self.opts, "etsdm", self.opts.seeds[0])
        return (int(gin.query_parameter("build_model.image_size")),
                int(gin.query_parameter("build_model.channels")))

    def reference(self):
        if self._reference is None:
            from keras_etsdm.evaluation import fid, heldout

            opts = self.opts
            if opts.reference_data is not None:
                self._reference = fid.ReferenceStatistics.load(reference_file(opts))
            elif opts.reference_stats.endswith(".npz"):
                self._reference = fid.ReferenceStatistics.load(opts.reference_stats)
            else:
                self._reference = heldout.load_reference(opts.reference_stats)
        return self._reference

    def extractor(self):
        if self._extractor is None:
            from keras_etsdm.evaluation.features import make_extractor

            self._extractor = make_extractor(self.reference().extractor,
                                             self.opts.inception_path)
        return self._extractor

    def _run_train(self, stage):
        from keras_etsdm import config
        from keras_etsdm.checkpoint import latest_checkpoint

        opts = self.opts
        target = self.state["train_steps"]
        workdir = model_dir(opts, stage["arm"], stage["seed"])
        if (stage["arm"], stage["seed"]) in opts.trained_models:
            t0 = time.time()
            checkpoint = check_trained_model(opts, stage["arm"], stage["seed"], target)
            stage.update(status="done", step=target, given=workdir,
                         checkpoint=os.path.abspath(checkpoint))
            self.done_unit(stage, time.time() - t0, f"trained elsewhere: {checkpoint}")
            return True
        while True:
            if stage["step"] >= target:
                stage["status"] = "done"
                save_state(opts, self.state)
                return True
            # A training unit needs time to build, compile and take steps; the first measured
            # call of this stage tells how long the start-up takes.
            startup = max([c["startup_seconds"] for s in self.state["stages"]
                           if s["kind"] == "train" for c in s["calls"]] or [0.0])
            if not self.may_start(startup + 1.0):
                return False
            stop_at = target
            if opts.train_chunk_steps:
                stop_at = min(target, stage["step"] + opts.train_chunk_steps)
            parse_gin(opts, stage["arm"], stage["seed"], max_steps=stop_at)
            t0 = time.time()
            result = self._train_with_timer(config, workdir)
            seconds = time.time() - t0
            checkpoint = latest_checkpoint(workdir)
            step = int(result.step)
            took = step - result.start_step
            rate = _steps_per_second(workdir, result.start_step, step)
            stage["calls"].append({"from": int(result.start_step), "to": step,
                                   "seconds": round(seconds, 2),
                                   "startup_seconds": round(
                                       max(0.0, seconds - took / rate) if rate else seconds, 2),
                                   "steps_per_second": rate})
            stage["step"] = step
            stage["checkpoint"] = checkpoint and os.path.relpath(checkpoint, opts.workdir)
            if step >= target:
                stage["status"] = "done"
            self._models.pop((stage["arm"], stage["seed"]), None)
            self.done_unit(stage, seconds, f"steps {result.start_step} -> {step} of {target}"
                           + (f" ({rate:.2f} steps/s)" if rate else ""))
            if result.interrupted and not self.timer_fired:
                self.stop_requested = True  # an external signal: saved, stop the call
                return False
            if self.timer_fired:
                return False

    def _train_with_timer(self, config, workdir):
        """bin/train's run (resumes from the latest checkpoint) that stops at the deadline:
        a timer sends this process SIGTERM, which the run driver turns into 'save a
        checkpoint after this step and stop'."""
        self.timer_fired = False
        in_main = threading.current_thread() is threading.main_thread()

        finished = threading.Event()

        def fire():
            # Repeated: a signal that lands before fit() installed the driver's handler (model
            # build, compile, checkpoint restore) only reaches this study's handler; the next one
            # reaches the driver, which checkpoints and stops.
            if finished.wait(max(0.0, self.remaining())):
                return
            self.timer_fired = True
            while not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.wait(2.0)

        timer = threading.Thread(target=fire, daemon=True) if in_main else None
        if timer is not None:
            timer.start()
        try:
            return config.run(workdir, handle_signals=in_main)
        finally:
            finished.set()
            if timer is not None:
                timer.join()

    def model(self, arm, seed):
        key = (arm, seed)
        if key not in self._models:
            from keras_etsdm.checkpoint import load_model

            self._models.clear()  # one model in memory at a time
            # a model trained elsewhere is read at the study's step, whatever came after
            step = self.state["train_steps"] if key in self.opts.trained_models else None
            self._models[key] = load_model(workdir=model_dir(self.opts, arm, seed), step=step,
                                           use_ema=True)
        return self._models[key]

    def sampler(self, setting, model, seed):
        key = (setting, id(model))
        if key not in self._samplers:
            self._samplers = {k: v for k, v in self._samplers.items() if k[1] == id(model)}
            aware = parse_setting(setting)[2].get("sharing_aware", False)
            knots_of = self.etsdm_sharing(seed) if aware else None
            self._samplers[key] = build_setting_sampler(setting, model.schedule, model.sharing,
                                                        knots_of)
        return self._samplers[key]

    def etsdm_sharing(self, seed):
        """The E-TSDM arm's sharing map (the knots of -aware settings for both arms), read from
        its work directory's model config."""
        from keras_etsdm import TimestepSharing
        from keras_etsdm.checkpoint import MODEL_CONFIG

        path = os.path.join(model_dir(self.opts, "etsdm", seed), MODEL_CONFIG)
        with open(path) as f:
            return TimestepSharing.from_config(json.load(f)["config"]["sharing"])

    def _run_sample(self, stage):
        import numpy as np

        from keras_etsdm.io_utils import atomic_write_bytes, to_uint8
        from keras_etsdm.samplers.sampling import generate

        opts = self.opts
        while stage["chunks_done"] < stage["num_chunks"]:
            chunk = stage["chunks_done"]
            # This stage's slowest chunk so far (the first one compiles), else the slowest
            # chunk of the same setting elsewhere: a DDPM-1000 chunk must not start at the end.
            estimate = max(stage["chunk_seconds"] or [
                t for s in self.state["stages"] if s.get("setting") == stage["setting"]
                for t in s.get("chunk_seconds", [])] or [0.0])
            if not self.may_start(estimate):
                return False
            path = chunk_path(opts, stage, chunk)
            t0 = time.time()
            if not os.path.isfile(path):  # a chunk file is complete once it exists (atomic)
                model = self.model(stage["arm"], stage["seed"])
                sampler = self.sampler(stage["setting"], model, stage["seed"])
                if "labels_below_t_tilde" not in stage:  # the grid this model really visits
                    from keras_etsdm.samplers import labels_below

                    stage["labels_below_t_tilde"] = labels_below(sampler, 100.0)
                n = min(opts.chunk_size, stage["num_samples"] - chunk * opts.chunk_size)
                seed = noise_seed(opts.eval_seed, stage["seed"], chunk)
                images = generate(model, sampler, n, batch_size=opts.batch_size, seed=seed)
                import io

                buf = io.BytesIO()
                np.savez(buf, images=to_uint8(images), noise_seed=seed,
                         checkpoint_step=getattr(model, "checkpoint_step", -1))
                atomic_write_bytes(path, buf.getvalue())
            seconds = time.time() - t0
            stage["chunks_done"] = chunk + 1
            stage["chunk_seconds"].append(round(seconds, 3))
            if stage["chunks_done"] == stage["num_chunks"]:
                stage["status"] = "done"
            self.done_unit(stage, seconds, f"chunk {chunk + 1}/{stage['num_chunks']}")
        stage["status"] = "done"
        return True

    def _run_score(self, stage):
        import numpy as np

        from keras_etsdm.evaluation import fid
        from keras_etsdm.io_utils import write_json

        if not self.may_start():
            return False
        t0 = time.time()
        sample_stage = self._stage(f"sample/{stage['arm']}/seed{stage['seed']}/"
                                   f"{stage['setting']}")
        images = []
        for chunk in range(sample_stage["num_chunks"]):
            with np.load(chunk_path(self.opts, sample_stage, chunk)) as f:
                images.append(f["images"])
        images = np.concatenate(images)
        metrics = fid.evaluate_images(images, self.extractor(), self.reference(),
                                      self.opts.batch_size)
        record = {"arm": stage["arm"], "seed": stage["seed"], "setting": stage["setting"],
                  "num_samples": len(images), "metrics": metrics, "weights": "ema",
                  "extractor": self.reference().extractor,
                  "reference": self.opts.reference_stats or self.opts.reference_data,
                  "reference_count": int(self.reference().count)}
        write_json(score_path(self.opts, stage), record, indent=1)
        stage.update(status="done", metrics=metrics, num_samples=len(images))
        self.done_unit(stage, time.time() - t0, f"FD {metrics['fd']:.4g} (N={len(images)})")
        return True

    def _run_report(self, stage):
        write_report(self.opts, self.state, final=True, current_call=self.call)
        stage["status"] = "done"
        save_state(self.opts, self.state)
        return True

    def _stage(self, stage_id):
        for stage in self.state["stages"]:
            if stage["id"] == stage_id:
                return stage
        raise KeyError(stage_id)


def _steps_per_second(workdir, start_step, end_step):
    """Training speed of the steps just taken, from bin/train's metrics.jsonl (excludes the
    build / compile time); None when too few steps were logged."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path) or end_step - start_step < 2:
        return None
    speeds = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if start_step < record.get("step", 0) <= end_step and "seconds_per_step" in record:
                speeds.append(record["seconds_per_step"])
    speeds = speeds[1:]  # the first interval of a call includes the compilation
    if not speeds:
        return None
    import numpy as np

    return float(1.0 / np.median(speeds))


def _training_seconds(workdir, stage):
    """Seconds of training steps the model's metrics.jsonl logged (a model trained before the
    study, e.g. by benchmarks/recipe_study.py, counts its own steps); else the calls' time."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return sum(c["seconds"] for c in stage["calls"])
    seconds, last = 0.0, 0
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "seconds_per_step" in record:
                seconds += record["seconds_per_step"] * (record["step"] - last)
                last = record["step"]
    return seconds


# ----- report -------------------------------------------------------------------------------------
def build_results(opts, state):
    """The scored stages in the shape ``comparison.format_markdown`` renders."""
    from keras_etsdm import DiscreteVPSchedule
    from keras_etsdm.samplers import labels_below

    schedule = DiscreteVPSchedule()
    # an -aware setting's grid depends on the E-TSDM model's sharing: the one its sample
    # stages recorded, else (nothing sampled yet) the default sharing of the schedule
    samplers = {name: build_setting_sampler(name, schedule, schedule.default_sharing(),
                                            schedule.default_sharing())
                for name in opts.settings}
    visited = {name: labels_below(sampler, 100.0) for name, sampler in samplers.items()}
    visited.update({s["setting"]: s["labels_below_t_tilde"] for s in state["stages"]
                    if s["kind"] == "sample" and s["arm"] == "etsdm"
                    and "labels_below_t_tilde" in s})
    runs = {}
    for stage in state["stages"]:
        if stage["kind"] == "train":
            runs[(stage["arm"], stage["seed"])] = {
                "arm": stage["arm"], "seed": stage["seed"], "weights": "ema",
                "train_steps": stage["step"], "metrics": {},
                "train_seconds": _training_seconds(model_dir(opts, stage["arm"], stage["seed"]),
                                                   stage)}
        elif stage["kind"] == "score" and stage["status"] == "done":
            runs[(stage["arm"], stage["seed"])]["metrics"][stage["setting"]] = stage["metrics"]
    extractor = next((s.get("extractor") for s in state["stages"] if s["kind"] == "reference"),
                     None) or "?"
    metric_names = ("fd", "kid", "classifier_score")
    fd_name = "FID" if extractor == "inception_v3" else f"FD ({extractor})"
    labels = {"fd": fd_name, "kid": f"KID ({extractor})",
              "classifier_score": "Inception score" if extractor == "inception_v3"
              else f"classifier score ({extractor})"}
    num_samples = {name: opts.ddpm_num_samples if name.startswith("ddpm-") else opts.num_samples
                   for name in opts.settings}
    testbed = {"train_steps": state["train_steps"], "batch_size": state.get("batch_size"),
               "num_eval_samples": opts.num_samples, "num_samples": num_samples,
               "runs": [r for r in runs.values() if r["metrics"]],
               "labels_below_t_tilde": visited,
               "nfe": {n: s.num_iterations for n, s in samplers.items()},
               "metrics": metric_names, "metric_labels": labels}
    name = "+".join(os.path.splitext(os.path.basename(g))[0] for g in opts.gin_files)
    return {"testbeds": {name: testbed}, "backend": _backend(), "settings": opts.study_config()}


def _backend():
    import keras

    return keras.backend.backend()


def write_report(opts, state, final=False, current_call=None):
    """report.md / report.json from the state; ``current_call``: the running call's record,
    which ``state["calls"]`` gets only when the call ends (its units count in the wall time)."""
    sys.path.insert(0, REPO_ROOT)
    from benchmarks import comparison
    from keras_etsdm.io_utils import atomic_write_text, write_json

    results = build_results(opts, state)
    pending = [s["id"] for s in state["stages"] if s["status"] != "done" and s["kind"] != "report"]
    calls = state["calls"] + ([current_call] if current_call is not None else [])
    wall = sum(sum(u["seconds"] for u in c.get("units", [])) for c in calls)
    results["complete"] = final and not pending
    results["pending_stages"] = pending
    results["total_seconds"] = wall
    header = [f"# E-TSDM vs DDPM: {'complete' if results['complete'] else 'PARTIAL'} report",
              "", f"Command: `{opts.command}`", "",
              (f"Reference: {opts.reference_stats or opts.reference_data} (held-out images; "
               f"extractor as in the table titles). Samples from the EMA weights; the same "
               f"noise for both arms of a seed and for every setting. Training seeds "
               f"{', '.join(map(str, opts.seeds))}; {state['train_steps']} steps per model."),
              ""]
    if pending:
        header += [f"{len(pending)} stages still pending (first: {pending[0]}).", ""]
    text = "\n".join(header) + comparison.format_markdown(results)
    atomic_write_text(os.path.join(opts.workdir, "report.md"), text)
    write_json(os.path.join(opts.workdir, "report.json"), results, indent=1)
    return text


# ----- entry point --------------------------------------------------------------------------------
def run_study(opts, log=print):
    """One call: runs stages until done or the budget is spent. Returns (done, state)."""
    check_setup(opts)
    state = load_or_create_state(opts, log)
    if "train_steps" not in state:
        import gin

        state["train_steps"] = opts.train_steps or gin_max_steps(opts)
        parse_gin(opts, "etsdm", opts.seeds[0])
        state["batch_size"] = int(gin.query_parameter("train.batch_size"))
        save_state(opts, state)
    runner = Runner(opts, state, log)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            runner.stop_requested = True
            log(f"Received {signal.Signals(signum).name}: stopping after this unit.")
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        done = runner.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        runner.call["seconds"] = time.time() - runner.start
        state["calls"].append(runner.call)
        save_state(opts, state)
    if not done and any(s["kind"] == "score" and s["status"] == "done" for s in state["stages"]):
        write_report(opts, state, final=False)
    pending = [s for s in state["stages"] if s["status"] != "done"]
    if done:
        log(f"done: {len(state['stages'])} stages in {len(state['calls'])} call(s). Report: "
            f"{os.path.join(opts.workdir, 'report.md')}")
    else:
        log(f"{len(pending)} of {len(state['stages'])} stages remain, next "
            f"{pending[0]['id']}" + (f" (step {pending[0]['step']}/{state['train_steps']})"
                                     if pending[0]["kind"] == "train" else "")
            + (f" (chunk {pending[0]['chunks_done']}/{pending[0]['num_chunks']})"
               if pending[0]["kind"] == "sample" else "") + ".")
        log(f"Continue with: {opts.command}")
    return done, state


def main(argv):
    try:
        opts = parse_options(argv)
        run_study(opts)
    except (StudyError, flags.Error) as error:
        print(f"device_study: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(REPO_ROOT, "bin"))
    sys.path.insert(0, REPO_ROOT)
    import _startup  # bin/_startup.py: huge-page malloc re-exec, XLA CPU flags (as bin/train)

    _startup.tune_process()
    sys.exit(main(sys.argv))
