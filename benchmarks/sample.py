"""Wall time per NFE of each sampler vs one bare network forward pass (a table, not a test).

    KERAS_BACKEND=jax python benchmarks/sample.py --batch=16 --size=16

The sampler's own arithmetic and loop overhead = time per NFE / forward time − 1 (target < 5 %).
Also prints the first-call (compile) time.
"""

import argparse
import time

import keras
import numpy as np
from keras import ops

from keras_etsdm import DiffusionModel, build_unet
from keras_etsdm.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    network = build_unet(image_size=args.size, channels=3, base_channels=16, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
    model = DiffusionModel(network)
    noise = np.random.default_rng(0).standard_normal(
        (args.batch, args.size, args.size, 3)).astype(np.float32)

    # The bare forward pass, compiled by the same machinery: a 1-step DDIM is one NFE + 3 axpys,
    # so time a loop of N network calls instead through a sampler whose step is the network.
    forward_steps = 50
    bare = DDIMSampler(forward_steps)
    ops.convert_to_numpy(bare.sample(model, noise))
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        ops.convert_to_numpy(model.denoise(noise, np.full((args.batch,), 500.0, np.float32)))
    eager_forward = (time.perf_counter() - t0) / args.repeats
    forward = keras.ops  # placeholder for readability
    del forward

    rows = []
    for name, sampler in [("ddpm-100", DDPMSampler(100)), ("ddim-50", DDIMSampler(50)),
                          ("ddim-50 eta=1", DDIMSampler(50, eta=1.0)),
                          ("dpm++ 2M-20", DPMSolverSampler(20, order=2)),
                          ("dpm++ 3M-20", DPMSolverSampler(20, order=3)),
                          ("dpm 3S-20", DPMSolverSampler(20, order=3, method="singlestep",
                                                        algorithm="dpmsolver"))]:
        t0 = time.perf_counter()
        ops.convert_to_numpy(sampler.sample(model, noise))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            ops.convert_to_numpy(sampler.sample(model, noise))
        per_nfe = (time.perf_counter() - t0) / args.repeats / sampler.num_iterations
        rows.append((name, first, per_nfe))
    # Reference: per-NFE time of DDIM-50 is the network plus the cheapest possible step.
    print(f"backend={keras.backend.backend()} batch={args.batch} size={args.size} "
          f"eager forward={eager_forward * 1e3:.2f} ms")
    base = min(r[2] for r in rows)
    print(f"{'sampler':16s} {'compile+first s':>16s} {'ms/NFE':>8s} {'vs fastest':>10s}")
    for name, first, per_nfe in rows:
        print(f"{name:16s} {first:16.2f} {per_nfe * 1e3:8.2f} {per_nfe / base - 1:+10.1%}")


if __name__ == "__main__":
    main()
