"""Averages of the weights: EMA decay profiles and extra EMA tracks kept beside a run.

The model keeps one exponential moving average of its weights (``DiffusionModel.ema_decay``:
constant decay with warm-up), which is what ``sample(use_ema=True)`` and every checkpoint
loader use. Which average samples best depends on the run's length and learning rate, and
finding out by training once per candidate is expensive. So ``bin/train`` can keep extra EMA
*tracks* of the same weight trajectory (``train.ema_tracks``) and write them beside every
checkpoint; afterwards each track loads into a model (``load_ema_track``) and is evaluated
like the model's own EMA, with no retraining — the post-hoc EMA idea of Karras et al. 2024
("Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2), with the
candidate profiles chosen up front instead of reconstructed.

Profiles (strings, so that gin and the command line can name them):

- ``"decay:β"``: constant decay β with the model's warm-up, ``min(β, (1 + k) / (10 + k))``
  at the update after ``k`` earlier ones (``model.ema_decay_at``); ``"decay:0.999"`` is the
  embedded default's own EMA.
- ``"power:γ"``: the power-function EMA of EDM2, decay ``(1 − 1/(k + 1))^(γ + 1)``: the
  average of the weights over the run with weight ∝ step^γ, so its width stays a fixed
  fraction of the run's length however long it trains (γ > 0).
- ``"sigma_rel:s"``: the power EMA named by that relative width (EDM2's σ_rel: the standard
  deviation of the averaging profile over the steps so far, as a fraction of the step count),
  0 < s < 0.2887 (γ = 0, the plain mean, is s = 1/√12); 0.05 is γ = 16.97, 0.10 is γ = 6.94.
"""

import collections
import glob
import io
import os
import re

import numpy as np

from keras_etsdm import backend as etsdm_backend
from keras_etsdm.io_utils import atomic_write_bytes
from keras_etsdm.model import ema_decay_at

TRACKS_DIR = "ema_tracks"
_FILE_RE = re.compile(r"^step-(\d+)\.npz$")
_SIGMA_REL_MAX = 1.0 / np.sqrt(12.0)  # the plain mean (γ = 0)

EMAProfile = collections.namedtuple("EMAProfile", ["name", "kind", "value"])
EMAProfile.__doc__ = """A parsed profile: ``kind`` "decay" (value β) or "power" (value γ)."""


def power_gamma_from_sigma_rel(sigma_rel):
    """γ of the power EMA whose relative standard deviation is ``sigma_rel`` (EDM2 eq. 3).

    The profile ∝ τ^γ on [0, t] has relative std σ_rel with
    ``σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3))``; this solves it for the one root γ > 0.
    """
    s = float(sigma_rel)
    if not 0.0 < s < _SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {_SIGMA_REL_MAX:.4f}) (γ > 0), got {s}.")
    # s²(γ + 2)²(γ + 3) − (γ + 1) = 0, expanded in γ.
    roots = np.roots([s * s, 7 * s * s, 16 * s * s - 1.0, 12 * s * s - 1.0])
    positive = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    return float(max(positive))


def parse_profile(spec):
    """``"decay:0.999"`` / ``"power:6.94"`` / ``"sigma_rel:0.1"`` → ``EMAProfile``."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"An EMA profile is 'decay:<β>', 'power:<γ>' or 'sigma_rel:<s>', "
                         f"got {spec!r}.")
    kind, text = spec.split(":")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"EMA profile {spec!r}: {text!r} is not a number.") from None
    if kind == "decay":
        if not 0.0 <= value < 1.0:
            raise ValueError(f"EMA profile {spec!r}: the decay must be in [0, 1).")
        return EMAProfile(spec, "decay", value)
    if kind == "power":
        if not value > 0.0:
            raise ValueError(f"EMA profile {spec!r}: γ must be > 0.")
        return EMAProfile(spec, "power", value)
    if kind == "sigma_rel":
        return EMAProfile(spec, "power", power_gamma_from_sigma_rel(value))
    raise ValueError(f"EMA profile {spec!r}: unknown kind {kind!r} (expected 'decay', 'power' "
                     f"or 'sigma_rel').")


def profile_decay(profile, count):
    """The decay of the update that follows ``count`` earlier updates (a float).

    A constant decay uses the model's own warm-up rule (``model.ema_decay_at``), so a
    ``decay:β`` track averages exactly as ``DiffusionModel(ema_decay=β)`` does."""
    if profile.kind == "decay":
        return float(etsdm_backend.to_numpy(ema_decay_at(count, profile.value)))
    k = float(count)
    return (1.0 - 1.0 / (k + 1.0)) ** (profile.value + 1.0)


class EMATracks:
    """Extra EMA tracks of a list of weight variables, in float32 numpy on the host.

    Args:
        profiles: profile strings (see the module docstring); names must be distinct.
        variables: the weight variables to average (``model._network_weights``).

    ``update()`` after every optimizer step, ``save(directory, step)`` / ``restore(...)``
    with the checkpoints. Each track is one flat float32 vector, so a step costs one read of
    the weights and two vector operations per track.
    """

    def __init__(self, profiles, variables):
        self.profiles = [parse_profile(p) for p in profiles]
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"EMA tracks must be distinct, got {names}.")
        self.variables = list(variables)
        self._shapes = [tuple(v.shape) for v in self.variables]
        self._offsets = np.cumsum([0] + [int(np.prod(s)) for s in self._shapes])
        self._flat = None  # {name: float32 vector of all variables}
        self.count = 0

    @property
    def values(self):
        """``{name: [array per variable]}`` (views of the flat tracks)."""
        if self._flat is None:
            return None
        return {name: self._split(flat) for name, flat in self._flat.items()}

    def _split(self, flat):
        return [flat[a:b].reshape(shape)
                for a, b, shape in zip(self._offsets[:-1], self._offsets[1:], self._shapes)]

    def _read(self):
        return etsdm_backend.variables_to_flat_numpy(self.variables)

    def start(self):
        """Start every track at the variables' current values (count 0)."""
        weights = self._read()
        self._flat = {p.name: weights.copy() for p in self.profiles}
        self.count = 0

    def update(self):
        """One EMA step of every track towards the variables' current values."""
        if self._flat is None:
            self.start()
        weights = self._read()
        scaled = np.empty_like(weights)
        for p in self.profiles:
            decay = np.float32(profile_decay(p, self.count))
            track = self._flat[p.name]
            track *= decay
            track += np.multiply(weights, np.float32(1.0) - decay, out=scaled)
        self.count += 1

    def save(self, directory, step):
        """Write ``<directory>/step-<step>.npz`` atomically (every track and the count)."""
        arrays = {"count": np.int64(self.count), "names": np.array([p.name for p in self.profiles]),
                  "paths": np.array([v.path for v in self.variables])}
        for i, p in enumerate(self.profiles):
            for j, value in enumerate(self._split(self._flat[p.name])):
                arrays[f"t{i}_v{j:05d}"] = value
        os.makedirs(directory, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = track_file(directory, step)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def restore(self, directory, step):
        """Load the tracks saved at ``step``; False (and nothing changed) when there is no file
        or it holds other tracks."""
        path = track_file(directory, step)
        if not os.path.isfile(path):
            return False
        saved = read_tracks(path)
        if sorted(saved["tracks"]) != sorted(p.name for p in self.profiles):
            return False
        self._flat = {name: np.concatenate([np.ravel(v) for v in values]).astype(np.float32)
                      for name, values in saved["tracks"].items()}
        self.count = saved["count"]
        return True

    def prune(self, directory, keep):
        """Keep the newest ``keep`` track files (0: keep all)."""
        if keep:
            for _, path in list_track_files(directory)[:-keep]:
                os.remove(path)


def track_file(directory, step):
    return os.path.join(directory, f"step-{int(step):08d}.npz")


def list_track_files(directory):
    """``[(step, path)]`` of the track files in ``directory``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(directory, "step-*.npz")):
        match = _FILE_RE.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_tracks(path):
    """``{"count": int, "paths": [variable path], "tracks": {name: [array]}}`` of one file."""
    with np.load(path) as data:
        names = [str(n) for n in data["names"]]
        paths = [str(p) for p in data["paths"]]
        tracks = {name: [data[f"t{i}_v{j:05d}"] for j in range(len(paths))]
                  for i, name in enumerate(names)}
        return {"count": int(data["count"]), "paths": paths, "tracks": tracks}


def load_ema_track(model, workdir, name, step=None):
    """Put EMA track ``name`` of run ``workdir`` (at ``step``; default the newest) into ``model``.

    Afterwards the model's ``ema_weights`` AND its network hold the track (as
    ``checkpoint loaders`` do for ``use_ema=True``), so ``sample(use_ema=True)``, the
    evaluation and export all use it. Returns the step of the file read.
    """
    directory = os.path.join(workdir, TRACKS_DIR)
    files = dict(list_track_files(directory))
    if not files:
        raise FileNotFoundError(f"{directory!r} holds no EMA tracks; train with "
                                f"train.ema_tracks = ['decay:0.9995', ...] to keep some.")
    step = max(files) if step is None else int(step)
    if step not in files:
        raise FileNotFoundError(f"No EMA tracks at step {step} in {directory!r}; there are "
                                f"steps {sorted(files)}.")
    saved = read_tracks(files[step])
    if name not in saved["tracks"]:
        raise ValueError(f"No EMA track {name!r} in {files[step]!r}; it holds "
                       f"{sorted(saved['tracks'])}.")
    weights = model._network_weights
    if [w.path for w in weights] != saved["paths"]:
        raise ValueError(f"The EMA tracks in {directory!r} are of another network "
                         f"({len(saved['paths'])} weights) than the model's ({len(weights)}).")
    for var, ema, value in zip(weights, model.ema_weights, saved["tracks"][name]):
        ema.assign(value)
        var.assign(value)
    return step
