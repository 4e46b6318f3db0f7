"""Two-process data-parallel training on one machine against one process, same global batch.

The cluster is 2 processes with one CPU device each, on localhost ports: TensorFlow
``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``, JAX ``jax.distributed`` (Gloo collectives
on CPU) from ``KERAS_DISTRIBUTION_*``; both train with ``distribution="multi_worker"``
(tests/multiworker_worker.py). The reference trains the same model in one process:

* JAX: one device. ``DataParallel`` draws t and ε for the global batch and each process feeds
  its half of it, so 2 processes × 1 device must equal 1 device to float rounding.
* TensorFlow: ``MirroredStrategy`` over 2 logical CPU devices. Each replica draws its own noise,
  seeded by its replica id (``backend.ReplicaSeedGenerator``); worker i runs replica i and gets
  the i-th half of each global batch, as replica i of one process does, so the two runs must
  agree to float rounding (only the all-reduce differs: gRPC ring vs. in-process).

Also: only the chief writes (checkpoint, metrics, TensorBoard), and its checkpoint loads.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

# Three fresh processes that import the backend and compile a tiny U-Net (1–1.5 min per backend
# on 2 cores): run in CI, since the README promises multi-worker training.

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiworker_worker.py")
BACKEND = keras.backend.backend()
NUM_PROCESSES = 2
STEPS = 3
TIMEOUT = 600  # seconds for the whole run
# Once one process has finished training, the others have too (every step is a collective);
# one that has not written its result this long after is stuck in work of its own.
STRAGGLER_GRACE = 30
# A port taken between choosing it and binding it: start the cluster again on new ports.
PORT_CLASH = re.compile(r"could not start grpc server|failed to start rpc server|"
                        r"address already in use", re.IGNORECASE)
CLUSTER_VARIABLES = ("TF_CONFIG", "KERAS_DISTRIBUTION_JOB_ADDRESSES",
                     "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID",
                     "JAX_COORDINATOR_ADDRESS")


def _free_ports(count):
    """``count`` distinct free localhost ports (held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _base_env(subprocess_env):
    """The test environment, without any cluster settings and with one CPU device for JAX."""
    env = {k: v for k, v in subprocess_env.items() if k not in CLUSTER_VARIABLES}
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(flags.split())
    return env


def _worker_env(env, index, ports):
    env = dict(env)
    if BACKEND == "tensorflow":
        env["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"localhost:{port}" for port in ports]},
            "task": {"type": "worker", "index": index}})
    else:
        env.update(KERAS_DISTRIBUTION_JOB_ADDRESSES=f"localhost:{ports[0]}",
                   KERAS_DISTRIBUTION_NUM_PROCESSES=str(NUM_PROCESSES),
                   KERAS_DISTRIBUTION_PROCESS_ID=str(index),
                   # The default in jax 0.10; explicit, since without cross-process CPU
                   # collectives the processes cannot all-reduce at all.
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    return env


class _Process:
    """A started worker process, its log file and its result file."""

    def __init__(self, name, role, env, out, index=None):
        self.name, self.index = name, index
        self.log_path = out / f"{name}.log"
        self.result_path = out / f"{name}.npz"
        with open(self.log_path, "w") as log:
            self.popen = subprocess.Popen([sys.executable, WORKER, role, str(out)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
        self.killed = False

    def running(self):
        return self.popen.poll() is None

    def finished_training(self):
        return self.result_path.exists()

    def kill(self):
        """Dump the stacks (the worker's faulthandler), then kill."""
        if not self.running():
            return
        self.popen.send_signal(signal.SIGUSR1)
        time.sleep(2)
        self.popen.kill()
        self.popen.wait()
        self.killed = True

    def log(self, tail=6000):
        text = self.log_path.read_text(errors="replace")
        # Drop the C++ stack frames of an abort; the Python stacks say more.
        text = "\n".join(line for line in text.splitlines() if not line.startswith("    @ "))
        return text[-tail:]


def _wait(processes, deadline):
    """Wait for all to exit; kill a cluster that is stuck or that lost a process."""
    first_done = None
    while any(p.running() for p in processes):
        now = time.monotonic()
        if first_done is None and any(p.finished_training() for p in processes):
            first_done = now
        failed = any(not p.running() and p.popen.returncode != 0 for p in processes)
        if (now > deadline or failed
                or (first_done is not None and now - first_done > STRAGGLER_GRACE)):
            if failed:
                time.sleep(5)  # let the others report the lost peer first
            for p in processes:
                p.kill()
            break
        time.sleep(0.5)


class _Run:
    """What the fixture hands the tests: the processes and their results."""

    def __init__(self, workers, reference):
        self.workers, self.reference = workers, reference
        self.chief = workers[0]

    def result(self, process):
        """The process's result; fails with its log if it did not finish training."""
        assert process.finished_training(), (
            f"{process.name} did not finish training (exit status {process.popen.returncode}"
            f"{', killed as stuck' if process.killed else ''}):\n{process.log()}")
        with np.load(str(process.result_path)) as saved:
            return {k: saved[k] for k in saved.files}

    def metrics(self, process):
        """The ``metrics.jsonl`` records of a process that writes them."""
        path = process.result_path.parent / process.name / "metrics.jsonl"
        assert path.is_file(), f"{process.name} wrote no {path.name}:\n{process.log()}"
        with open(path) as f:
            return [json.loads(line) for line in f]

    def workdir(self, process):
        return process.result_path.parent / process.name


@pytest.fixture(scope="module")
def run(tmp_path_factory, subprocess_env):
    """Start the reference and the 2-process cluster together (both fit 2 cores: the workers
    wait on each other) and wait for all; start the cluster again on new ports if one was
    taken before a worker could bind it."""
    env = _base_env(subprocess_env)
    deadline = time.monotonic() + TIMEOUT
    root = tmp_path_factory.mktemp("multiworker")
    started = [_Process("reference", "reference", env, root)]
    try:
        for attempt in range(3):
            out = root / f"cluster{attempt}"
            out.mkdir()
            ports = _free_ports(NUM_PROCESSES)
            workers = [_Process(f"worker{i}", "worker", _worker_env(env, i, ports), out, i)
                       for i in range(NUM_PROCESSES)]
            started += workers
            _wait(workers, deadline)
            if not any(w.popen.returncode != 0 and PORT_CLASH.search(w.log()) for w in workers):
                break
        _wait(started[:1], deadline)
        yield _Run(workers, started[0])
    finally:
        for process in started:  # still running only if the test run was interrupted
            process.kill()


def _weights(result):
    return [result[f"w{i}"] for i in range(int(result["num_weights"]))]


def _finished_workers(run):
    """The workers that finished training; the non-chief always must."""
    finished = [w for w in run.workers if w.finished_training()]
    for w in run.workers[1:]:
        run.result(w)  # fails with its log
    return finished


def test_each_process_runs_one_of_two_replicas(run):
    for worker in _finished_workers(run):
        result = run.result(worker)
        assert int(result["replicas"]) == NUM_PROCESSES
        # One device per process; on TensorFlow worker i holds replica i, which fixes its
        # noise stream and its half of each global batch.
        assert result["local_replica_ids"].tolist() == [worker.index]
        if BACKEND == "jax":
            assert int(result["process_count"]) == NUM_PROCESSES
            assert int(result["local_devices"]) == 1
        assert int(result["final_step"]) == STEPS
    reference = run.result(run.reference)
    if BACKEND == "tensorflow":
        assert reference["local_replica_ids"].tolist() == [0, 1]


def test_loss_curve_matches_single_process(run):
    chief = run.metrics(run.chief)  # written every step, before any chief-only work
    reference = run.metrics(run.reference)
    assert [r["step"] for r in chief] == [r["step"] for r in reference] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in chief], [r["loss"] for r in reference],
                               rtol=1e-5)
    # The norm of the all-reduced (global-batch) gradient, before clipping.
    np.testing.assert_allclose([r["grad_norm"] for r in chief],
                               [r["grad_norm"] for r in reference], rtol=1e-5)
    # Every process reports the same global loss.
    for worker in _finished_workers(run):
        np.testing.assert_allclose(run.result(worker)["losses"], [r["loss"] for r in chief],
                                   rtol=1e-6)


def test_final_weights_match_single_process(run):
    reference = _weights(run.result(run.reference))
    finished = [_weights(run.result(w)) for w in _finished_workers(run)]
    for weights in finished:
        assert len(weights) == len(reference)
        for a, b in zip(reference, weights):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    for weights in finished[1:]:  # the replicas stay in sync exactly
        for a, b in zip(finished[0], weights):
            np.testing.assert_array_equal(b, a)


def test_non_chief_writes_nothing(run):
    for worker in run.workers[1:]:
        run.result(worker)
        assert sorted(os.listdir(run.workdir(worker))) == []


def test_chief_checkpoint_is_written_and_loads(run):
    from keras_etsdm import checkpoint

    chief = run.result(run.chief)
    assert run.chief.popen.returncode == 0, run.chief.log()
    workdir = str(run.workdir(run.chief))
    assert [step for step, _ in checkpoint.list_checkpoints(workdir)] == [STEPS]
    reloaded = checkpoint.load_checkpoint(workdir, use_ema=False)
    assert reloaded.checkpoint_step == STEPS
    weights = [np.asarray(keras.ops.convert_to_numpy(w.value)) for w in reloaded.weights]
    assert len(weights) == int(chief["num_weights"])
    for a, b in zip(_weights(chief), weights):
        np.testing.assert_array_equal(b, a)
