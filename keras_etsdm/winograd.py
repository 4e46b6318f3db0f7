"""3×3 "same" convolutions by Winograd's minimal filtering F(2×2, 3×3), in ``keras.ops``.

A stride-1 3×3 convolution computes each 2×2 block of outputs from a 4×4 tile of the input.
Winograd's F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
2016) does that with 16 multiplications per channel pair instead of 36: the tile and the kernel
are carried to a 4×4 transform domain by small fixed matrices (``Bᵀ d B`` and ``G g Gᵀ``),
multiplied pointwise, and brought back by ``Aᵀ · A``. Over channels the pointwise products are
16 matmuls ``[tiles, C_in] × [C_in, C_out]``, so the multiply count of the convolution falls by
9 / 4 = 2.25×. The input's transform is additions over the tiles in the forward pass
(:func:`_input_transform`); the output's transform, its adjoint and the backward pass's input
transform are small constant matmuls (``Aᵀ ⊗ Aᵀ``, ``[4, 16]``; ``Bᵀ ⊗ Bᵀ``, ``[16, 16]``:
entries 0 and ±1), memory-bound like the additions they stand for, but compiled by XLA as
library calls rather than arithmetic loops, one set per convolution shape: the CIFAR-10 U-Net's
training step compiles ~4 s sooner (:func:`_input_transform_by_matmul`).

The entries of the three matrices are 0, ±1 and ±1/2, so in float32 the result differs from a
direct convolution only by summation order (relative error ~1e-6, like two direct algorithms).
F(4×4, 3×3) would save more multiplications, but its entries (up to 8 and 1/24) cost about a
decimal digit of float32 accuracy (~1e-5 relative in a one-off check), so it is not used.

The gradient is defined here rather than left to autodiff, so that a backward pass keeps the
memory of a plain convolution (the input and the kernel) instead of the 4× larger transformed
input:
the input gradient of a stride-1 "same" 3×3 convolution is the same convolution of the
output gradient with the kernel turned by 180° and its channels swapped (itself computed by
this algorithm), and the kernel gradient is ``Gᵀ (Σ_tiles Vᵀ · Aᵀ-adjoint(dY)) G``: 16
matmuls over the tiles, with the transformed input ``V`` recomputed from the input.

Where it pays was measured with ``benchmarks/winograd.py`` (``benchmarks/results/winograd/``;
AMD EPYC Zen 4, 2 cores, AVX-512, jaxlib 0.10.2, batch 8, paired rounds): single convolutions
with 128–512 channels at 8–64 px ran their forward 1.31–1.72× as fast as XLA's direct
convolution; with 64 or 32 channels 0.78–1.33× (mixed), hence :data:`MIN_CHANNELS`. The DDPM
CIFAR-10 U-Net's forward pass (the samplers' network evaluation): 1.32× [1.30, 1.34] on JAX and
1.36× [1.32, 1.37] on TensorFlow with XLA. Its training step (forward and both gradients),
with the transforms made separable (two stacked stages each, cheaper to compile): 1.16× [1.11,
1.21] on JAX, 1.19× [1.18, 1.22] on TensorFlow with XLA (``benchmarks/small_conv.py --part
network --switch winograd_training``), and against diffusers in ``bin/train``'s recipe on JAX
1.13× [1.10, 1.17] — but the first call took 38.8 instead of 25.8 s and the process peaked at
2,843 instead of 2,484 MiB (XLA's temporaries for the step 286 → 578 MiB, 394 with the form
kept out of the 32×32 level, whose transformed tiles are 4× its activations; measured before
the fix below, not since), past the project's limits of 30 s and 1.5× eager diffusers' memory.
On an AVX2 CPU (AMD EPYC Zen 3, 2 cores; ``benchmarks/results/avx2/winograd/``) it gains more:
single convolutions' forward + backward 1.21–1.78× at the U-Net's shapes, the training step
1.24× [1.20, 1.30], and beside eager diffusers in ``bin/train``'s recipe 1.39–1.44× its speed
in three runs (1.08–1.20× with the direct form). The memory figures above were inflated: the
backward pass recomputed ``V`` by the forward's own transform, which XLA's
common-subexpression elimination merged with the forward's ``V``, keeping every convolution's
tiles alive from the forward to the backward pass. The backward transform was then made to
run its two stages in the other order: the step's XLA temporaries 896 → 651 MiB (599 direct),
peak RSS beside diffusers 2,564 MiB (1.45× eager diffusers', within the project's 1.5×)
against 2,771–2,826 before; the first call stayed longer (37.5–44.5 instead of 25.0–35.5 s
cold in single fresh processes; with ``bin/train``'s persistent compilation cache warm ~16 s).
Since then the backward pass recomputes ``V`` by a matmul (:func:`_input_transform_by_matmul`,
also kept apart from the forward's ``V`` by XLA) and the output transforms are matmuls: in one
process, alternated with the additions' form and the direct one (5–6 rounds each,
``benchmarks/results/avx2/winograd_transforms/``), the first call 27.3 s against 31.3 (×0.87
[0.82, 0.94]) and 24.3 direct (fresh processes: 27.7–37.6 s, 29.6 direct in a pair), the step's
speed unchanged (1.00× [0.98, 1.05]) and the forward
pass's too (JAX 1.01× [0.98, 1.03], TensorFlow 1.02× [0.96, 1.05]); XLA's temporaries 698 MiB
(the backward's raw tiles of one convolution, ~48 MiB, live beside its ``V``).
So ``train`` uses the form in JAX's training steps by default
on AVX2 CPUs without AVX-512 (``train(winograd_training="auto")``,
``cpu_tuning.jax_winograd_training``); elsewhere training steps keep the direct form and take
this one on request (:data:`IN_TRAINING`; ``train(winograd_training=True)``), or only at the
smaller levels (:data:`TRAINING_MAX_SIZE`; ``train(winograd_training=16)``, measured before
the fix: 1.26× [1.23, 1.29] eager diffusers). ``backend.conv2d_same`` uses it where
:func:`applies`.
"""

from fractions import Fraction

import keras
import numpy as np
from keras import ops

# F(2×2, 3×3): output tile m = 2, input tile m + 2 = 4 (Lavin & Gray, eq. 7-8).
TILE = 2
_BT = ((1, 0, -1, 0),
       (0, 1, 1, 0),
       (0, -1, 1, 0),
       (0, 1, 0, -1))
_G = ((1, 0, 0),
      (Fraction(1, 2), Fraction(1, 2), Fraction(1, 2)),
      (Fraction(1, 2), Fraction(-1, 2), Fraction(1, 2)),
      (0, 0, 1))
_AT = ((1, 1, 1, 0),
       (0, 1, -1, -1))


def _kron_square(matrix):
    """``M ⊗ M`` as float32: row ``r·a + b``, column ``c·i + j`` holds ``M[a][i] · M[b][j]``
    for an ``r × c`` matrix ``M``, so ``(M ⊗ M) · vec(X) = vec(M X Mᵀ)`` for a ``c × c`` tile
    ``X`` flattened row by row."""
    m = np.array([[float(c) for c in row] for row in matrix], dtype="float32")
    return np.kron(m, m)


def _tiles(size):
    return -(-size // TILE)


def _padded_to_tiles(x):
    """``x`` zero-padded by 1 ("same" padding) and at the end to whole tiles, with the tile
    counts: ``([B, 2·t_h + 2, 2·t_w + 2, C], t_h, t_w)``."""
    height, width = x.shape[1], x.shape[2]
    t_h, t_w = _tiles(height), _tiles(width)
    padded = ops.pad(x, ((0, 0), (1, 1 + TILE * t_h - height), (1, 1 + TILE * t_w - width),
                         (0, 0)))
    return padded, t_h, t_w


def _combine(matrix, items):
    """``[Σ_j matrix[i][j] · items[j] for each row i]`` for a matrix of 0 and ±1 (``Bᵀ``, the
    forward pass's input transform; the others are matmuls now): sums and differences of
    whole tensors, the zero terms left out."""
    out = []
    for row in matrix:
        total = None
        for coefficient, item in zip(row, items):
            if coefficient == 0:
                continue
            if total is None:
                total = item if coefficient == 1 else -item
            else:
                total = total + item if coefficient == 1 else total - item
        out.append(total)
    return out


def _split_taps(tensor, axis, tiles):
    """The 4 taps of every tile along ``axis``: 4 tensors like ``tensor`` with that axis
    replaced by ``tiles``, the i-th holding entries ``2·t + i``. Taps 0–1 and 2–3 are the two
    halves of ``tensor[0 : 2·tiles]`` and ``tensor[2 : 2·tiles + 2]`` reshaped to (tile, 2):
    contiguous reads, where stride-2 slices would gather."""
    head = (slice(None),) * axis
    shape = tuple(tensor.shape)
    taps = []
    for start in (0, TILE):
        part = tensor[head + (slice(start, start + TILE * tiles),)]
        part = ops.reshape(part, shape[:axis] + (tiles, TILE) + shape[axis + 1:])
        taps.extend(part[head + (slice(None), i)] for i in range(TILE))
    return taps


def _input_transform(x):
    """``[B, H, W, C]`` → ``V``, ``[16, B·⌈H/2⌉·⌈W/2⌉, C]``: ``Bᵀ d B`` of every 4×4 input tile
    (stride 2, the input zero-padded by 1 as "same" padding, and at the end to whole tiles).

    As additions over the tiles, separably (along W, then along H), each stage one stacked
    tensor that XLA makes one loop fusion: the forward pass's transform, where it reads the
    input once and writes ``V`` once. As a matmul of the raw tiles
    (:func:`_input_transform_by_matmul`) it compiles faster but runs the forward pass ~4 %
    slower (one more pass over 4× the input).
    """
    batch, _, _, channels = x.shape
    padded, t_h, t_w = _padded_to_tiles(x)
    cols = _split_taps(padded, axis=2, tiles=t_w)  # 4 × [B, H + 2, t_w, C]
    cols = ops.stack(_combine(_BT, cols), axis=0)  # [4 (b), B, H + 2, t_w, C]
    rows = _split_taps(cols, axis=2, tiles=t_h)  # 4 × [4, B, t_h, t_w, C]
    stacked = ops.stack(_combine(_BT, rows), axis=0)  # [4 (a), 4 (b), B, t_h, t_w, C]
    return ops.reshape(stacked, (16, batch * t_h * t_w, channels))


def _raw_tiles(x):
    """The 4×4 input tiles ``d`` (stride 2, "same" padding), one row per tap: ``([16,
    B·t_h·t_w·C], taps)``, row ``r`` holding tap ``taps[r] = (i, j)`` (input row ``2·t + i``,
    column ``2·s + j`` of tile ``(t, s)``), channels last within a row.

    Tap ``i = 2·half + phase``: with the padded input viewed as 2×2 blocks, ``[B, t_h + 1, 2,
    t_w + 1, 2, C]``, the taps of a tile are the phases of blocks ``t`` and ``t + 1``. So the
    phases are moved to the front (a transpose) and the 4 (half along H, half along W) shifts
    of that stacked: XLA makes the pad, the transpose and the stack one copy loop.
    """
    batch, _, _, channels = x.shape
    padded, t_h, t_w = _padded_to_tiles(x)
    blocks = ops.reshape(padded, (batch, t_h + 1, TILE, t_w + 1, TILE, channels))
    phases = ops.transpose(blocks, (2, 4, 0, 1, 3, 5))  # [p_h, p_w, B, t_h + 1, t_w + 1, C]
    d = ops.stack([phases[:, :, :, h_h:h_h + t_h, h_w:h_w + t_w]
                   for h_h in range(2) for h_w in range(2)], axis=0)
    taps = [(2 * h_h + p_h, 2 * h_w + p_w) for h_h in range(2) for h_w in range(2)
            for p_h in range(2) for p_w in range(2)]
    return ops.reshape(d, (16, batch * t_h * t_w * channels)), taps


def _input_transform_by_matmul(x):
    """:func:`_input_transform` as one ``[16, 16] × [16, B·t_h·t_w·C]`` matmul of ``Bᵀ ⊗ Bᵀ``
    with the raw tiles (:func:`_raw_tiles`): the same ``V`` up to float summation order, for
    the backward pass. Computed differently from the forward's, it cannot be merged with it by
    XLA's common-subexpression elimination, which would keep the forward's ``V`` (4× the
    input) alive until the backward pass instead of recomputing it; and XLA compiles it as a
    library call instead of two arithmetic loops
    (``benchmarks/results/avx2/winograd_transforms/``)."""
    channels = x.shape[-1]
    d, taps = _raw_tiles(x)
    # the columns of Bᵀ ⊗ Bᵀ (tap 4·i + j) in the row order of d
    matrix = _kron_square(_BT)[:, [4 * i + j for i, j in taps]]
    v = ops.matmul(ops.convert_to_tensor(matrix, dtype=x.dtype), d)
    return ops.reshape(v, (16, -1, channels))


def _kernel_transform(kernel):
    """``[3, 3, C_in, C_out]`` → ``U = G g Gᵀ``, ``[16, C_in, C_out]``: one ``[16, 9]`` matmul
    (one small op to compile per convolution instead of 16)."""
    _, _, c_in, c_out = kernel.shape
    flat = ops.reshape(kernel, (9, c_in * c_out))
    u = ops.matmul(ops.convert_to_tensor(_kron_square(_G), dtype=kernel.dtype), flat)
    return ops.reshape(u, (16, c_in, c_out))


def _kernel_transform_adjoint(grad_u):
    """The adjoint of :func:`_kernel_transform`: ``[16, C_in, C_out]`` → ``[3, 3, C_in, C_out]``."""
    _, c_in, c_out = grad_u.shape
    flat = ops.reshape(grad_u, (16, c_in * c_out))
    matrix = ops.convert_to_tensor(_kron_square(_G).T, dtype=grad_u.dtype)
    return ops.reshape(ops.matmul(matrix, flat), (3, 3, c_in, c_out))


def _output_transform(m, batch, height, width):
    """``M``, ``[16, B·t_h·t_w, C]`` → ``Aᵀ m A`` of every tile, assembled and cropped to
    ``[B, H, W, C]``: one ``[4, 16]`` matmul of ``Aᵀ ⊗ Aᵀ``, then the 2×2 blocks put in place
    (a transpose)."""
    t_h, t_w = _tiles(height), _tiles(width)
    channels = m.shape[-1]
    matrix = ops.convert_to_tensor(_kron_square(_AT), dtype=m.dtype)
    y = ops.matmul(matrix, ops.reshape(m, (16, -1)))  # [4 (2i + j), B·t_h·t_w·C]
    y = ops.reshape(y, (TILE, TILE, batch, t_h, t_w, channels))
    y = ops.transpose(y, (2, 3, 0, 4, 1, 5))  # [B, t_h, i, t_w, j, C]
    out = ops.reshape(y, (batch, TILE * t_h, TILE * t_w, channels))
    if TILE * t_h != height or TILE * t_w != width:
        out = out[:, :height, :width]
    return out


def _output_transform_adjoint(grad_y):
    """The adjoint of :func:`_output_transform`: ``[B, H, W, C]`` → ``[16, B·t_h·t_w, C]``."""
    batch, height, width, channels = grad_y.shape
    t_h, t_w = _tiles(height), _tiles(width)
    if TILE * t_h != height or TILE * t_w != width:
        grad_y = ops.pad(grad_y, ((0, 0), (0, TILE * t_h - height), (0, TILE * t_w - width),
                                  (0, 0)))
    blocks = ops.reshape(grad_y, (batch, t_h, TILE, t_w, TILE, channels))
    blocks = ops.transpose(blocks, (2, 4, 0, 1, 3, 5))  # [i, j, B, t_h, t_w, C]
    blocks = ops.reshape(blocks, (TILE * TILE, -1))
    matrix = ops.convert_to_tensor(_kron_square(_AT).T, dtype=grad_y.dtype)
    return ops.reshape(ops.matmul(matrix, blocks), (16, -1, channels))


def _forward(x, kernel):
    batch, height, width, _ = x.shape
    m = ops.matmul(_input_transform(x), _kernel_transform(kernel))
    return _output_transform(m, batch, height, width)


@ops.custom_gradient
def conv3x3_same(x, kernel):
    """``keras.ops.conv(x, kernel, padding="same")`` for a 3×3 kernel, stride 1, by F(2×2, 3×3).

    Args:
        x: ``[B, H, W, C_in]`` with static B, H and W (any H, W ≥ 1).
        kernel: ``[3, 3, C_in, C_out]``.
    Returns:
        ``[B, H, W, C_out]``; equal to the direct convolution up to float summation order. Its
        gradients are those of the convolution, computed by the same algorithm (module
        docstring), and keep only ``x`` and ``kernel`` for the backward pass.
    """

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        # input gradient: the same convolution with the kernel turned 180°, C_in ↔ C_out
        turned = ops.transpose(ops.flip(ops.flip(kernel, axis=0), axis=1), (0, 1, 3, 2))
        grad_x = _forward(upstream, turned)
        grad_m = _output_transform_adjoint(upstream)  # [16, P, C_out]
        # V recomputed, by a matmul XLA cannot merge with the forward's additions
        grad_u = ops.einsum("tpi,tpo->tio", _input_transform_by_matmul(x), grad_m)
        return grad_x, _kernel_transform_adjoint(grad_u)

    return _forward(x, kernel), grad


# Module flag for A/B measurements (read at trace time): False keeps the direct convolution.
WINOGRAD = True
# Whether ``layers.Conv2D`` uses it in training steps (``training=True``) too: off here,
# faster but slower to compile (module docstring); ``training.train``'s ``winograd_training``
# sets it for a run ("auto": on for JAX on AVX2 CPUs without AVX-512).
IN_TRAINING = False
# Largest output side (px) at which a training step uses it while :data:`IN_TRAINING` (None:
# every size from :data:`MIN_SIZE`). The largest levels hold the most transformed tiles (4× the
# activations), so capping the size trades part of the speed for memory: on the CIFAR-10 U-Net
# (AVX2; measured before the backward transform was reordered, with 896 MiB for every size)
# 16 kept XLA's temporaries at 695 MiB (599 direct) for 1.14× [1.05, 1.30] the direct step's
# speed instead of 1.24×; it did not shorten the compile.
TRAINING_MAX_SIZE = None
# Smallest output side (px) and channel count where it is used (benchmarks/results/winograd/):
# at 4×4 the forward gained 1.11× [1.07, 1.41] but compiled 0.97 s longer; with 64 channels the
# forward ran 0.78–1.33× and with 32 channels 1.13× [0.51, 1.32], against 1.31–1.72× from 128.
MIN_SIZE = 8
MIN_CHANNELS = 128


def training_setting(winograd_training):
    """``(IN_TRAINING, TRAINING_MAX_SIZE)`` for ``train(winograd_training=...)`` (which
    resolves ``"auto"`` first: ``backend.default_winograd_training``).

    Args:
        winograd_training: False or None (the direct form in training steps), True (the form at
            every size it applies to), or an int ≥ :data:`MIN_SIZE`: the form only where the
            output's height and width are at most that many pixels (e.g. 16: the CIFAR-10
            U-Net's 16×16 and 8×8 levels, not its 32×32 one).
    Raises:
        ValueError: anything else.
    """
    if winograd_training is None or winograd_training is False:
        return False, None
    if winograd_training is True:
        return True, None
    if (isinstance(winograd_training, (int, np.integer))
            and winograd_training >= MIN_SIZE):
        return True, int(winograd_training)
    raise ValueError(f"winograd_training must be 'auto', True, False or a largest output "
                     f"side in pixels of at least {MIN_SIZE} (the form's smallest size), got "
                     f"{winograd_training!r}.")


def in_training(input_shape):
    """Whether a training step's convolution of a ``[B, H, W, C]`` input may use the form:
    :data:`IN_TRAINING`, and H and W at most :data:`TRAINING_MAX_SIZE` (when set and known).
    :func:`applies` still decides for the shapes."""
    if not IN_TRAINING:
        return False
    if TRAINING_MAX_SIZE is None:
        return True
    height, width = input_shape[1], input_shape[2]
    return (height is not None and width is not None
            and max(height, width) <= TRAINING_MAX_SIZE)


def applies(input_shape, kernel_shape, strides, dtype, xla_cpu):
    """Whether ``backend.conv2d_same`` uses :func:`conv3x3_same` for these static shapes.

    True when :data:`WINOGRAD` is on, the kernel is 3×3 with stride 1, the batch, height and
    width are static ints (a symbolic batch, as in the exported SavedModel's signatures, keeps
    the direct convolution: exports stay portable), height and width are at least
    :data:`MIN_SIZE`, both channel counts at least :data:`MIN_CHANNELS`, the input is float32
    (in bfloat16 the transforms would round), and
    ``xla_cpu`` (XLA compiles the call for a CPU; without XLA TensorFlow's oneDNN convolutions
    ran the forward 2.2–4.2× as fast as this algorithm's separate, unfused ops at 128–512
    channels; on GPUs cuDNN chooses its own algorithms).

    Args:
        input_shape: ``[B, H, W, C_in]`` (static entries may be None).
        kernel_shape: ``[kh, kw, C_in, C_out]``.
        strides: a pair.
        dtype: the input's dtype.
        xla_cpu: whether XLA compiles the call for a CPU (``backend._xla_cpu_context()``).
    """
    if not WINOGRAD or not xla_cpu:
        return False
    if tuple(kernel_shape[:2]) != (3, 3) or tuple(strides) != (1, 1):
        return False
    # static sizes only: the tile count fixes the transforms' shapes (a symbolic batch, as in
    # the SavedModel export's signatures, keeps the direct form)
    if not all(isinstance(size, int) for size in input_shape[:3]):
        return False
    height, width = input_shape[1], input_shape[2]
    if min(height, width) < MIN_SIZE or min(kernel_shape[2], kernel_shape[3]) < MIN_CHANNELS:
        return False
    return keras.backend.standardize_dtype(dtype) == "float32"


def network_uses_it(network):
    """Whether ``network`` (a Keras model or layer) has a float32 3×3 convolution kernel with at
    least :data:`MIN_CHANNELS` input and output channels, i.e. one that XLA on a CPU would run
    in this form at inference (sizes from :data:`MIN_SIZE`). TensorFlow's sampling loops use XLA
    on a CPU for such networks (``backend.default_sample_jit_compile``)."""
    if not WINOGRAD:
        return False
    policy = getattr(network, "dtype_policy", None)
    if policy is not None and keras.backend.standardize_dtype(policy.compute_dtype) != "float32":
        return False
    return any(len(w.shape) == 4 and tuple(w.shape[:2]) == (3, 3)
               and min(w.shape[2], w.shape[3]) >= MIN_CHANNELS for w in network.weights)
