"""JAX: how many of the weights XLA copies inside the compiled training step, per optimizer.

With the weights donated to the step, the update writes each new weight into the old weight's
buffer; XLA keeps the update in place only where it can prove that every read of the old weight
(forward, and the backward pass's input gradient) comes first. Plain Adam's update of a layer
does not depend on the gradients of the layers below it, so XLA cannot, and copies the weight
at the start of the step; bin/train's optimizer (global-norm clipping: every update depends on
every gradient) gives it that order. Prints the count and MiB of entry-parameter copies in the
optimized HLO of ``train_step`` for each optimizer (the CIFAR-10 U-Net of train_step.py, batch
8; one process each, start-up tuning as bin/ applies it). An ordering for any optimizer was
tried in commit de8c5a3 (no copies, but a slower step) and reverted.

    python benchmarks/results/step_variants/weight_copies.py
"""

import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, os.pardir, os.pardir, os.pardir)
OPTIMIZERS = ("adam", "clipped_adam")


def entry_parameter_copies(hlo_text):
    """(count, bytes) of ``copy`` instructions of an entry-computation parameter."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(\d+\)", entry))
    count = size = 0
    copies = re.findall(r"= (f32|bf16|f16)\[([\d,]*)\]\{[\d,]*\} copy\(%([\w.\-]+)\)", entry)
    for dtype, dims, operand in copies:
        if operand in params:
            elements = 1
            for d in filter(None, dims.split(",")):
                elements *= int(d)
            count += 1
            size += elements * (4 if dtype == "f32" else 2)
    return count, size


def child(optimizer, dump_dir):
    sys.path.insert(0, ROOT)
    from keras_etsdm import cpu_tuning

    cpu_tuning.tune_xla_for_cpu("jax")
    os.environ["XLA_FLAGS"] += (f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
                                " --xla_dump_hlo_module_re=.*train_step.*")
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import train_step

    # the as-is / clipped-Adam set-ups of train_step.py, built by its own helper
    variant = "clipped_adam" if optimizer == "clipped_adam" else "as_is"
    model = train_step.build_model(train_step.parse_args(
        ["--base_channels", "128", "--batch", "8", "--model_variant", variant]))
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    model.train_on_batch(x)


def main():
    print("keras_etsdm weight copies in JAX's compiled train_step (CIFAR-10 U-Net, batch 8)")
    for optimizer in OPTIMIZERS:
        with tempfile.TemporaryDirectory() as dump_dir:
            env = {**os.environ, "KERAS_BACKEND": "jax"}
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", optimizer,
                            dump_dir], env=env, check=True, stderr=subprocess.DEVNULL)
            files = [f for f in os.listdir(dump_dir)
                     if re.search(r"train_step\.cpu_after_optimizations\.txt$", f)]
            if len(files) != 1:
                raise SystemExit(f"expected one optimized train_step module, found {files}")
            with open(os.path.join(dump_dir, files[0])) as f:
                count, size = entry_parameter_copies(f.read())
        print(f"  {optimizer:<13} {count:4d} parameter copies, {size / 2**20:6.1f} MiB per step")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
