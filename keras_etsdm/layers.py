"""Building blocks of the ADM / DDPM U-Net, as serialisable Keras layers.

All layers work channels-last (``[B, H, W, C]``) on every backend and use ``keras.ops`` only.
"""

import math

import keras
from keras import layers, ops

from keras_etsdm import backend as etsdm_backend
from keras_etsdm import winograd

PACKAGE = "keras_etsdm"


def num_groups(channels, max_groups=32, min_group_size=4):
    """GroupNorm group count: the largest divisor of ``channels`` that is <= ``max_groups`` and
    leaves at least ``min_group_size`` channels per group.

    Why the minimum: DDPM adds the time embedding as a per-channel offset right before a
    GroupNorm. With one channel per group (e.g. 32 channels in 32 groups) the norm subtracts
    each channel's mean and so removes that offset entirely: the network would ignore t. The
    published configurations (>= 128 channels) keep their 32 groups.
    """
    limit = max(1, min(max_groups, channels // min_group_size))
    for g in range(limit, 0, -1):
        if channels % g == 0:
            return g
    return 1


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupNorm(layers.GroupNormalization):
    """``keras.layers.GroupNormalization`` with a faster channels-last forward and backward.

    Same weights (``gamma``, ``beta``), config and math (two-pass mean and variance over
    ``H·W·C/G`` values per group, in float32), but the sums run first over the spatial
    positions (a reduction over major axes, vectorised along the channels) and only then over
    the channels of each group, instead of reducing a ``[B, H, W, G, C/G]`` view over three
    non-adjacent axes. Forward + backward is ~2.5× faster on JAX / XLA CPU and ~1.5× on
    TensorFlow (benchmarks/profile_components.py). Inputs other than rank-4 channels-last use
    the parent implementation.

    ``[B, H, W, C]`` → ``[B, H, W, C]``.
    """

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs)
        channels = inputs.shape[-1]
        groups = self.groups
        per_group = channels // groups
        x = ops.cast(inputs, _statistics_dtype(inputs.dtype))
        batch = ops.shape(x)[0]
        x = ops.reshape(x, (batch, -1, channels))  # [B, H·W, C]
        count = ops.cast(ops.shape(x)[1] * per_group, x.dtype)

        def group_mean(per_channel_sum):  # [B, C] sums over H·W → [B, 1, C] group means
            sums = ops.sum(ops.reshape(per_channel_sum, (batch, groups, per_group)), axis=2,
                           keepdims=True)
            means = ops.broadcast_to(sums / count, (batch, groups, per_group))
            return ops.reshape(means, (batch, 1, channels))

        centred = x - group_mean(ops.sum(x, axis=1))
        inv_std = ops.rsqrt(group_mean(ops.sum(ops.square(centred), axis=1)) + self.epsilon)
        if self.scale:
            inv_std = inv_std * ops.cast(self.gamma, x.dtype)
        out = centred * inv_std
        if self.center:
            out = out + ops.cast(self.beta, x.dtype)
        return ops.cast(ops.reshape(out, ops.shape(inputs)), self.compute_dtype)


def _statistics_dtype(dtype):
    """float32 for half-precision inputs (group statistics overflow in float16), else as is."""
    return keras.backend.result_type(dtype, "float32")


def group_norm(channels, name=None):
    return GroupNorm(groups=num_groups(channels), epsilon=1e-5, name=name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Conv2D(layers.Conv2D):
    """``keras.layers.Conv2D`` (same weights and outputs) whose "same" convolutions go through
    ``backend.conv2d_same``, which is much faster under XLA on a CPU for outputs smaller than
    the kernel, runs 3×3 convolutions by Winograd's algorithm there, and has a faster kernel
    gradient on JAX CPU with YNNPACK convolutions.

    ``training`` decides whether the Winograd form may be used: always at inference, in a
    training step (``training=True``) only where ``winograd.in_training`` (off unless set;
    ``train(winograd_training="auto")`` sets it for JAX on AVX2 CPUs without AVX-512, where
    the CIFAR-10 U-Net's training step ran 1.19–1.25× as fast; ``keras_etsdm.winograd``).
    """

    def call(self, inputs, training=None):
        # read by convolution_op, while this call is traced
        self._winograd = not training or winograd.in_training(inputs.shape)
        try:
            return super().call(inputs)
        finally:
            self._winograd = True

    def convolution_op(self, inputs, kernel):
        if (tuple(self.dilation_rate) == (1, 1) and self.padding == "same"
                and self.data_format == "channels_last" and self.groups == 1
                and (tuple(self.strides) != (1, 1) or all(k % 2 for k in self.kernel_size))):
            return etsdm_backend.conv2d_same(inputs, kernel, strides=self.strides,
                                             winograd=getattr(self, "_winograd", True))
        return super().convolution_op(inputs, kernel)


# Nearest 2x upsampling followed by a 3x3 "same" convolution, computed on the low-resolution
# input ("sub-pixel" form). Output pixel (2i + a, 2j + b) sees input rows i - 1 + a .. i + a and
# columns j - 1 + b .. j + b only, so for each parity (a, b) the 3x3 kernel collapses to a 2x2
# one whose taps are sums of the original taps: 16 instead of 36 multiply-adds per output
# channel, input channel and input pixel. ``_PARITY_TAPS[a, u, i]`` is 1 where tap i of the 3x3
# kernel (rows -1, 0, +1) lands on tap u of parity a's 2x2 kernel.
_PARITY_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),   # a = 0: taps at rows i - 1, i
                ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))   # a = 1: taps at rows i, i + 1

# Smallest input height and width at which the sub-pixel form is used. Measured on an AVX-512
# CPU (batch 8, 256 channels; benchmarks/upsample_conv.py, results/subpixel_upsample/): from
# 16x16 inputs on it took 0.55-0.65x the time of upsample-then-convolve (forward, and forward +
# backward) on both backends; at 8x8 0.81-1.34x, at 4x4 1.5-3.1x (there the parities' window
# overlap, (H + 1)^2 / H^2, and the interleave cost more than the saved multiply-adds).
SUBPIXEL_MIN_SIZE = 16
# False: always upsample, then convolve (the textbook order; for A/B measurements)
SUBPIXEL_UPSAMPLE = True


def nearest_upsample(x):
    """Nearest-neighbour 2x upsampling: ``[B, H, W, C]`` → ``[B, 2H, 2W, C]``."""
    return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)


def subpixel_pays(shape):
    """Whether :func:`upsample_nearest_conv3x3` is used for an input of static ``shape``
    ``[B, H, W, C]`` (both H and W known and at least :data:`SUBPIXEL_MIN_SIZE`)."""
    height, width = shape[1], shape[2]
    return (SUBPIXEL_UPSAMPLE and height is not None and width is not None
            and min(height, width) >= SUBPIXEL_MIN_SIZE)


def upsample_nearest_conv3x3(x, kernel):
    """``conv3x3_same(nearest_upsample(x), kernel)`` without forming the upsampled image.

    One 2x2 "valid" convolution of the zero-padded input with the four parities' collapsed
    kernels stacked along the output channels, then the parities interleaved. The same values
    as the direct form up to float summation order; 16 / 36 of its multiply-adds (times
    ``(H + 1)(W + 1) / (H W)`` for the overlap of the parities' windows).

    Args:
        x: ``[B, H, W, C_in]`` with static H and W.
        kernel: ``[3, 3, C_in, C_out]`` (no bias).
    Returns:
        ``[B, 2H, 2W, C_out]``.
    """
    height, width, c_out = x.shape[1], x.shape[2], kernel.shape[-1]
    taps = ops.convert_to_tensor(_PARITY_TAPS, dtype=kernel.dtype)
    collapsed = ops.einsum("aui,bvj,ijco->uvcabo", taps, taps, kernel)
    collapsed = ops.reshape(collapsed, (2, 2, kernel.shape[2], 4 * c_out))
    padded = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = ops.conv(padded, collapsed, strides=1, padding="valid")  # [B, H+1, W+1, 4·C_out]
    y = ops.reshape(y, (-1, height + 1, width + 1, 2, 2, c_out))
    # parity (a, b) of output pixel (i, j) is window (i + a, j + b) of the valid convolution
    rows = [ops.stack([y[:, a:a + height, b:b + width, a, b, :] for b in (0, 1)], axis=3)
            for a in (0, 1)]  # each [B, H, W, 2 (b), C_out]
    return ops.reshape(ops.stack(rows, axis=2), (-1, 2 * height, 2 * width, c_out))


def _conv(filters, kernel_size=3, strides=1, name=None, zero_init=False):
    kwargs = {}
    if zero_init:
        kwargs["kernel_initializer"] = "zeros"
    return Conv2D(filters, kernel_size, strides=strides, padding="same", name=name, **kwargs)


def sinusoidal_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of (float) time labels.

    Args:
        t: ``[B]`` float labels (e.g. 0..999; fractional values are fine).
        dim: embedding width (even).
    Returns:
        ``[B, dim]``: ``[sin(t·f_0..f_{d/2−1}), cos(...)]`` with ``f_i = max_period^(−i/(d/2−1))``
        as in DDPM (guided-diffusion uses ``/ (d/2)``; the difference is negligible).
    """
    half = dim // 2
    exponent = -math.log(max_period) / max(half - 1, 1)
    freqs = ops.exp(ops.arange(half, dtype="float32") * exponent)
    args = ops.cast(ops.reshape(t, (-1, 1)), "float32") * ops.reshape(freqs, (1, -1))
    emb = ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)
    if dim % 2:
        emb = ops.pad(emb, [[0, 0], [0, 1]])
    return emb


@keras.saving.register_keras_serializable(package=PACKAGE)
class TimestepEmbedding(layers.Layer):
    """Sinusoidal embedding of the (shared) time label followed by a 2-layer SiLU MLP.

    Input ``[B]`` float labels → output ``[B, embed_dim]``.
    """

    def __init__(self, base_dim, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.base_dim = base_dim
        self.embed_dim = embed_dim
        self.dense_0 = layers.Dense(embed_dim, name="dense_0")
        self.dense_1 = layers.Dense(embed_dim, name="dense_1")

    def build(self, input_shape):
        self.dense_0.build((None, self.base_dim))
        self.dense_1.build((None, self.embed_dim))

    def call(self, t):
        h = sinusoidal_embedding(t, self.base_dim)
        h = self.dense_0(h)
        return self.dense_1(ops.silu(h))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embed_dim)

    def get_config(self):
        return {**super().get_config(), "base_dim": self.base_dim, "embed_dim": self.embed_dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassEmbedding(layers.Layer):
    """Learned class embedding added to the time embedding (ADM's ``label_emb``).

    ``num_classes + 1`` rows: ids ``0..K−1`` are the classes, id ``K`` (``null_id``) is the
    "no label" class that classifier-free guidance trains with label dropout and queries for the
    unconditional branch.

    Input int ``[B]`` class ids in ``[0, K]`` → output ``[B, embed_dim]``.
    """

    def __init__(self, num_classes, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)

    @property
    def null_id(self):
        return self.num_classes

    def build(self, input_shape):
        # N(0, 1) as torch's nn.Embedding in ADM; Keras' Embedding default (uniform ±0.05)
        # starts the class signal ~30x weaker than the time embedding it is added to.
        self.table = self.add_weight(shape=(self.num_classes + 1, self.embed_dim),
                                     initializer=keras.initializers.RandomNormal(stddev=1.0),
                                     name="table")

    def call(self, y):
        y = ops.cast(ops.reshape(y, (-1,)), "int32")
        return ops.cast(ops.take(self.table, y, axis=0), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embed_dim)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "embed_dim": self.embed_dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResBlock(layers.Layer):
    """ADM residual block with time conditioning.

    ``h = conv(SiLU(GN(x)))``; time: ``h += Dense(SiLU(emb))`` or, with ``use_scale_shift_norm``,
    ``GN(h)·(1 + scale) + shift``; then ``conv(dropout(SiLU(GN(h))))`` (zero-initialised, so the
    block starts as the identity) plus a 1×1 skip when the channel count changes.
    ``resample`` = "down" / "up" halves / doubles the resolution inside the block (ADM's
    ``resblock_updown``): average-pool / nearest-upsample applied to both paths.

    Inputs ``(x [B,H,W,C], emb [B,E])`` → ``[B,H',W',out_channels]``.
    """

    def __init__(self, out_channels, dropout=0.0, use_scale_shift_norm=False, resample=None,
                 **kwargs):
        super().__init__(**kwargs)
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}.")
        self.out_channels = out_channels
        self.dropout_rate = dropout
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample

    def build(self, input_shape):
        x_shape, emb_shape = input_shape
        in_ch = x_shape[-1]
        out = self.out_channels
        self.norm_in = group_norm(in_ch, name="norm_in")
        self.norm_in.build(x_shape)
        self.conv_in = _conv(out, name="conv_in")
        self.conv_in.build(tuple(x_shape[:-1]) + (in_ch,))
        self.emb_proj = layers.Dense(2 * out if self.use_scale_shift_norm else out,
                                     name="emb_proj")
        self.emb_proj.build(emb_shape)
        self.norm_out = group_norm(out, name="norm_out")
        self.norm_out.build((None, None, None, out))
        self.drop = layers.Dropout(self.dropout_rate)
        self.conv_out = _conv(out, name="conv_out", zero_init=True)
        self.conv_out.build((None, None, None, out))
        if in_ch != out:
            self.skip = Conv2D(out, 1, padding="same", name="skip")
            self.skip.build((None, None, None, in_ch))
        else:
            self.skip = None

    def _resample(self, x):
        if self.resample == "down":
            return ops.average_pool(x, 2, strides=2, padding="valid")
        if self.resample == "up":
            return nearest_upsample(x)
        return x

    def call(self, inputs, training=False):
        x, emb = inputs
        h = ops.silu(self.norm_in(x))
        skip = self.skip
        if self.resample == "up" and subpixel_pays(h.shape):
            # conv_in(upsample(h)) in the sub-pixel form; the 1x1 skip convolution commutes
            # with nearest upsampling, so it runs at the low resolution
            h = self.conv_in.bias + upsample_nearest_conv3x3(h, self.conv_in.kernel)
            x = nearest_upsample(skip(x) if skip is not None else x)
            skip = None
        else:
            h = self.conv_in(self._resample(h))
            x = self._resample(x)
        e = self.emb_proj(ops.silu(emb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = ops.split(e, 2, axis=-1)
            h = self.norm_out(h) * (1.0 + scale) + shift
        else:
            h = self.norm_out(h + e)
        h = self.conv_out(self.drop(ops.silu(h), training=training))
        return (skip(x) if skip is not None else x) + h

    def compute_output_shape(self, input_shape):
        x_shape = input_shape[0]
        h, w = x_shape[1], x_shape[2]
        if self.resample == "down":
            h, w = (h // 2 if h else h), (w // 2 if w else w)
        elif self.resample == "up":
            h, w = (h * 2 if h else h), (w * 2 if w else w)
        return (x_shape[0], h, w, self.out_channels)

    def get_config(self):
        return {**super().get_config(), "out_channels": self.out_channels,
                "dropout": self.dropout_rate,
                "use_scale_shift_norm": self.use_scale_shift_norm, "resample": self.resample}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionBlock(layers.Layer):
    """Multi-head self-attention over the spatial positions, with a residual connection.

    ``x + proj(attention(qkv(GN(x))))``; the output projection is zero-initialised.
    ``[B,H,W,C]`` → ``[B,H,W,C]``; ``C`` must be divisible by ``num_heads``.
    """

    def __init__(self, num_heads=1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by "
                             f"num_heads={self.num_heads}.")
        self.norm = group_norm(channels, name="norm")
        self.norm.build(input_shape)
        self.qkv = layers.Dense(3 * channels, name="qkv")
        self.qkv.build((None, channels))
        self.proj = layers.Dense(channels, name="proj", kernel_initializer="zeros")
        self.proj.build((None, channels))

    def call(self, x):
        shape = ops.shape(x)
        b, h, w, c = shape[0], shape[1], shape[2], x.shape[-1]
        heads = self.num_heads
        head_dim = c // heads
        qkv = self.qkv(ops.reshape(self.norm(x), (b, h * w, c)))  # [B, L, 3C]: q | k | v
        # Explicit batched matmuls instead of ops.dot_product_attention: same math, but it
        # avoids the [B, L, heads, d] ↔ [B, heads, L, d] layout shuffles (none at all with one
        # head); fwd + bwd ~1.1× faster on JAX CPU with 1 head, 2× with 4, ~1.5× on TF.
        q = qkv[..., :c] * (1.0 / math.sqrt(head_dim))
        k, v = qkv[..., c:2 * c], qkv[..., 2 * c:]
        if heads > 1:
            q, k, v = (ops.transpose(ops.reshape(a, (b, h * w, heads, head_dim)), (0, 2, 1, 3))
                       for a in (q, k, v))
        weights = ops.softmax(ops.matmul(q, ops.swapaxes(k, -1, -2)), axis=-1)  # [.., L, L]
        out = ops.matmul(weights, v)
        if heads > 1:
            out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, h * w, c))
        out = self.proj(out)
        return x + ops.reshape(out, (b, h, w, c))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Downsample(layers.Layer):
    """Halve the resolution: a stride-2 3×3 conv (``with_conv``) or 2×2 average pooling."""

    def __init__(self, with_conv=True, **kwargs):
        super().__init__(**kwargs)
        self.with_conv = with_conv

    def build(self, input_shape):
        if self.with_conv:
            self.conv = _conv(input_shape[-1], strides=2, name="conv")
            self.conv.build(input_shape)

    def call(self, x):
        if self.with_conv:
            return self.conv(x)
        return ops.average_pool(x, 2, strides=2, padding="valid")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, h // 2 if h else h, w // 2 if w else w, c)

    def get_config(self):
        return {**super().get_config(), "with_conv": self.with_conv}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Upsample(layers.Layer):
    """Double the resolution: nearest-neighbour upsampling, then a 3×3 conv (``with_conv``)."""

    def __init__(self, with_conv=True, **kwargs):
        super().__init__(**kwargs)
        self.with_conv = with_conv

    def build(self, input_shape):
        if self.with_conv:
            self.conv = _conv(input_shape[-1], name="conv")
            self.conv.build(input_shape)

    def call(self, x):
        if self.with_conv and subpixel_pays(x.shape):
            return self.conv.bias + upsample_nearest_conv3x3(x, self.conv.kernel)
        x = nearest_upsample(x)
        return self.conv(x) if self.with_conv else x

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, h * 2 if h else h, w * 2 if w else w, c)

    def get_config(self):
        return {**super().get_config(), "with_conv": self.with_conv}
