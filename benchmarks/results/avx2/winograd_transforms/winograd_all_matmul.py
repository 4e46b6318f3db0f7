"""A screen of ``compile_pair.py --variant`` / ``transform_pair.py --variant`` (not the library):
``keras_etsdm.winograd.conv3x3_same`` with the forward pass's input transform a matmul too (raw
tiles in one order for the forward pass and in another for the backward pass, so that XLA does
not merge the two). The kernel and output transforms are the library's. Measured against the
library's form in ``README.md`` here.
"""

from keras import ops

from keras_etsdm.winograd import (_BT, TILE, _kernel_transform, _kernel_transform_adjoint,
                                  _kron_square, _output_transform, _output_transform_adjoint,
                                  _padded_to_tiles)


def _raw_tiles(x, for_gradient=False):
    """The 4×4 input tiles ``d`` (stride 2, "same" padding), one row per tap: ``([16,
    B·t_h·t_w·C], taps)``, row ``r`` holding tap ``taps[r] = (i, j)`` (input row ``2·t + i``,
    column ``2·s + j`` of tile ``(t, s)``), channels last within a row.

    Tap ``i = 2·half + phase``: with the padded input viewed as 2×2 blocks, ``[B, t_h + 1, 2,
    t_w + 1, 2, C]``, the taps of a tile are the phases of blocks ``t`` and ``t + 1``. So the
    phases are moved to the front (one transpose) and the two halves stacked along H and along
    W (two slices each): XLA makes it two copy loops, no arithmetic. ``for_gradient`` builds the
    same tiles in another row order (phases swapped, W stacked before H), so that XLA cannot
    merge the backward pass's tiles with the forward's and keep those (4× the input) alive
    in between; recomputing them is cheaper than holding them.
    """
    batch, _, _, channels = x.shape
    padded, t_h, t_w = _padded_to_tiles(x)
    blocks = ops.reshape(padded, (batch, t_h + 1, TILE, t_w + 1, TILE, channels))
    if not for_gradient:
        t = ops.transpose(blocks, (2, 4, 0, 1, 3, 5))  # [p_h, p_w, B, t_h + 1, t_w + 1, C]
        d = ops.stack([t[:, :, :, h_h:h_h + t_h, h_w:h_w + t_w]
                       for h_h in range(2) for h_w in range(2)], axis=0)
        taps = [(2 * h_h + p_h, 2 * h_w + p_w) for h_h in range(2) for h_w in range(2)
                for p_h in range(2) for p_w in range(2)]
    else:
        t = ops.transpose(blocks, (4, 2, 0, 1, 3, 5))  # [p_w, p_h, B, t_h + 1, t_w + 1, C]
        d = ops.stack([t[:, :, :, h_h:h_h + t_h, h_w:h_w + t_w]
                       for h_w in range(2) for h_h in range(2)], axis=0)
        taps = [(2 * h_h + p_h, 2 * h_w + p_w) for h_w in range(2) for h_h in range(2)
                for p_w in range(2) for p_h in range(2)]
    return ops.reshape(d, (16, batch * t_h * t_w * channels)), taps


def _input_transform(x, for_gradient=False):
    """``[B, H, W, C]`` → ``V``, ``[16, B·⌈H/2⌉·⌈W/2⌉, C]``: ``Bᵀ d B`` of every 4×4 input tile
    (stride 2, the input zero-padded by 1 as "same" padding, and at the end to whole tiles).

    One ``[16, 16] × [16, B·t_h·t_w·C]`` matmul of ``Bᵀ ⊗ Bᵀ`` with the raw tiles
    (:func:`_raw_tiles`) rather than additions over the tiles: a 16-term matmul runs as fast
    here (the transform is memory-bound), and XLA compiles it as a library call instead of
    an elementwise loop per convolution, which more than halves the form's share of the
    compile (``benchmarks/results/avx2/winograd_transforms/``). ``for_gradient``: the same
    ``V`` computed apart from the forward's (:func:`_raw_tiles`).
    """
    channels = x.shape[-1]
    d, taps = _raw_tiles(x, for_gradient)
    # the columns of Bᵀ ⊗ Bᵀ (tap 4·i + j) in the row order of d
    matrix = _kron_square(_BT)[:, [4 * i + j for i, j in taps]]
    v = ops.matmul(ops.convert_to_tensor(matrix, dtype=x.dtype), d)
    return ops.reshape(v, (16, -1, channels))


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
        # V recomputed, in an order XLA cannot merge with the forward's (see _raw_tiles)
        grad_u = ops.einsum("tpi,tpo->tio", _input_transform(x, for_gradient=True), grad_m)
        return grad_x, _kernel_transform_adjoint(grad_u)

    return _forward(x, kernel), grad
