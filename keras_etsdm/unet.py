"""The ADM / DDPM U-Net as a functional Keras model ``(x_t, t_cond) -> ε̂``.

``t_cond`` is whatever time condition the caller feeds (``DiffusionModel.denoise`` feeds the
E-TSDM-shared label); the network itself knows nothing about sharing.
"""

import keras
from keras import layers

from keras_etsdm import layers as etsdm_layers


def build_unet(image_size=32, channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
               num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, num_heads=1,
               resblock_updown=False, use_scale_shift_norm=False, conv_resample=True,
               out_channels=None, num_classes=None, num_head_channels=None, name="unet"):
    """Build the U-Net.

    Args:
        image_size: input height = width in pixels; must be divisible by
            ``2 ** (len(channel_mult) - 1)``.
        channels: image channels (input and, unless ``out_channels``, output).
        base_channels: width of the first level; level i has ``base_channels * channel_mult[i]``.
        channel_mult: per-level width multipliers; one downsampling between consecutive levels.
        num_res_blocks: ResBlocks per level on the way down (``+1`` on the way up).
        attention_resolutions: resolutions (in pixels, e.g. ``(16,)``) with self-attention.
        dropout: dropout rate inside ResBlocks.
        num_heads: attention heads.
        num_head_channels: channels per attention head (ADM's ``num_head_channels``, e.g. 64);
            overrides ``num_heads`` (heads = channels / num_head_channels at each block).
        resblock_updown: resample with ResBlocks (ADM) instead of conv / nearest+conv (DDPM).
        use_scale_shift_norm: ADM's FiLM-style time conditioning (``GN(h)(1+s)+b``).
        conv_resample: DDPM's learned (conv) resampling when ``resblock_updown`` is off.
        num_classes: K for a class-conditional network (ADM): a learned embedding of the class
            id is added to the time embedding. Ids ``0..K−1`` are classes and id ``K`` is the
            null class (unconditional, for classifier-free guidance). None: unconditional.

    Returns:
        ``keras.Model`` with inputs ``x [B, image_size, image_size, channels]``, ``t [B]``
        (float labels) and, when ``num_classes`` is set, ``y [B]`` (int32 class ids in
        ``[0, K]``), and output ``ε̂`` of the shape of ``x``.

    The DDPM CIFAR-10 configuration (the defaults) has 35.7 M parameters.
    """
    channel_mult = tuple(channel_mult)
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by {factor}, the total "
                         f"downsampling of channel_mult={channel_mult}; pick a size divisible by "
                         f"{factor} or fewer levels.")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}.")
    check_num_classes(num_classes)
    attention_resolutions = tuple(attention_resolutions)
    out_channels = out_channels or channels
    emb_dim = 4 * base_channels

    def attention(channels, name):
        if num_head_channels:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by "
                                 f"num_head_channels={num_head_channels}.")
            heads = channels // num_head_channels
        else:
            heads = num_heads
        return etsdm_layers.AttentionBlock(heads, name=name)

    def res(ch, resample=None, name=None):
        return etsdm_layers.ResBlock(ch, dropout=dropout,
                                     use_scale_shift_norm=use_scale_shift_norm,
                                     resample=resample, name=name)

    x_in = keras.Input((image_size, image_size, channels), name="x")
    t_in = keras.Input((), name="t")
    emb = etsdm_layers.TimestepEmbedding(base_channels, emb_dim, name="time_embed")(t_in)
    inputs = {"x": x_in, "t": t_in}
    if num_classes:
        y_in = keras.Input((), dtype="int32", name="y")
        inputs["y"] = y_in
        label_emb = etsdm_layers.ClassEmbedding(num_classes, emb_dim, name="label_embed")(y_in)
        emb = layers.Add(name="time_label_embed")([emb, label_emb])

    h = layers.Conv2D(base_channels, 3, padding="same", name="conv_in")(x_in)
    skips = [h]
    resolution = image_size
    for level, mult in enumerate(channel_mult):
        for i in range(num_res_blocks):
            h = res(base_channels * mult, name=f"down_{level}_res_{i}")([h, emb])
            if resolution in attention_resolutions:
                h = attention(h.shape[-1], name=f"down_{level}_attn_{i}")(h)
            skips.append(h)
        if level != len(channel_mult) - 1:
            if resblock_updown:
                h = res(h.shape[-1], resample="down", name=f"down_{level}_resample")([h, emb])
            else:
                h = etsdm_layers.Downsample(conv_resample, name=f"down_{level}_resample")(h)
            resolution //= 2
            skips.append(h)

    mid_ch = h.shape[-1]
    h = res(mid_ch, name="mid_res_0")([h, emb])
    h = attention(mid_ch, name="mid_attn")(h)
    h = res(mid_ch, name="mid_res_1")([h, emb])

    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            h = layers.Concatenate(axis=-1, name=f"up_{level}_concat_{i}")([h, skips.pop()])
            h = res(base_channels * mult, name=f"up_{level}_res_{i}")([h, emb])
            if resolution in attention_resolutions:
                h = attention(h.shape[-1], name=f"up_{level}_attn_{i}")(h)
        if level != 0:
            if resblock_updown:
                h = res(h.shape[-1], resample="up", name=f"up_{level}_resample")([h, emb])
            else:
                h = etsdm_layers.Upsample(conv_resample, name=f"up_{level}_resample")(h)
            resolution *= 2

    h = etsdm_layers.group_norm(h.shape[-1], name="norm_out")(h)
    h = layers.Activation("silu", name="silu_out")(h)
    out = layers.Conv2D(out_channels, 3, padding="same", kernel_initializer="zeros",
                        name="conv_out")(h)
    return keras.Model(inputs, out, name=name)


def check_num_classes(num_classes):
    """``num_classes`` must be None (unconditional) or an integer >= 1."""
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be None (unconditional) or a positive integer, got "
                         f"{num_classes!r}.")


def network_num_classes(network):
    """K of a class-conditional network (its ``ClassEmbedding``), or None if unconditional."""
    for layer in getattr(network, "layers", []):
        if isinstance(layer, etsdm_layers.ClassEmbedding):
            return layer.num_classes
        inner = network_num_classes(layer)  # nested models (the folding wrapper)
        if inner is not None:
            return inner
    return None


# Published configurations (Ho et al. 2020).
DDPM_CIFAR10 = dict(image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2),
                    num_res_blocks=2, attention_resolutions=(16,), dropout=0.1)
DDPM_256 = dict(image_size=256, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4),
                num_res_blocks=2, attention_resolutions=(16,), dropout=0.0)
# ADM's class-conditional ImageNet 64×64 U-Net (Dhariwal & Nichol 2021, guided-diffusion flags
# --num_channels 192 --num_res_blocks 3 --attention_resolutions 32,16,8 --num_head_channels 64
# --resblock_updown --use_scale_shift_norm --class_cond --dropout 0.1). ADM also learns the
# variance (6 output channels); this library predicts ε only (3), as the E-TSDM paper does.
ADM_IMAGENET64 = dict(image_size=64, base_channels=192, channel_mult=(1, 2, 3, 4),
                      num_res_blocks=3, attention_resolutions=(32, 16, 8), dropout=0.1,
                      num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True,
                      num_classes=1000)
