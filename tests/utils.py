"""Test helpers: the shared ones live in lorakernels.testing (the verification script uses them too)."""

import faulthandler
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from lorakernels.testing import (  # noqa: F401
    ERROR_FACTOR,
    assert_close_to_reference,
    make_inputs,
    reference_grads,
    replay_keep_mask,
)

# The device the suite runs on (tests/conftest.py): CPU through the interpreter, or CUDA.
DEVICE = torch.device(os.environ.get("LORAKERNELS_TEST_DEVICE", "cpu"))


def run(model, x):
    """Output and every gradient (x and the trainable parameters) of sum(y^2), for comparing two
    models (PEFT's and a patched or converted one) on one input."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.float().pow(2).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"y": y.detach(), "dx": x.grad, **grads}


def assert_same(actual, expected, tol=1e-5):
    """`run` results: same keys and dtypes; values within `tol` of each tensor's largest magnitude
    (fp32: a few ulps of the largest value, whatever the summation order)."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(actual[key], expected[key], rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{key}: {m}")


# --- gloo worker processes (tests/test_distributed.py, tests/test_peft_patch_distributed.py) ---------------

# What spawned workers start with, whatever device the suite runs on: the CPU suite's settings (the
# kernels through the interpreter) and no GPU in sight. Two ranks cannot share one GPU under NCCL, and
# gloo workers that see one place things on it anyway (FSDP2's default mesh is a CUDA mesh wherever
# CUDA is available).
CPU_WORKER_ENV = {"LORAKERNELS_TEST_DEVICE": "cpu", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
WORKER_TIMEOUT = 180  # seconds for a whole multi-process run; they take a few


def worker_log(out_dir, rank, timeout=WORKER_TIMEOUT):
    """In a worker: a function `step(what)` that writes the worker's progress to out_dir/rank<rank>.log
    (line-buffered). A crash (SIGSEGV included) writes the worker's Python stacks there, and so does
    a worker still running near the time limit."""
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    faulthandler.enable(file=log)
    faulthandler.dump_traceback_later(timeout - 15, file=log)
    start = time.monotonic()

    def step(what):
        log.write(f"{time.monotonic() - start:7.2f} s  {what}\n")

    step("started")
    return step


def exit_worker():
    """End a worker whose work succeeded (results saved, process group destroyed) without the
    interpreter's teardown: a worker that had logged "done" once died there of SIGBUS in torch's
    own cleanup, which would fail a test whose work had passed. A worker that raised does not get
    here: its exception reaches `spawn_cpu_workers`."""
    os._exit(0)


def spawn_cpu_workers(fn, args, out_dir, world, timeout=WORKER_TIMEOUT):
    """Runs fn(rank, *args) in `world` fresh processes on the CPU (CPU_WORKER_ENV). A worker that
    dies (an exception, a signal) or a run past `timeout` seconds ends every worker and fails the
    test with the workers' logs (`worker_log`), instead of leaving the suite waiting on a rendezvous."""
    saved = {key: os.environ.get(key) for key in CPU_WORKER_ENV}
    os.environ.update(CPU_WORKER_ENV)  # read by the workers as they start; this process keeps its GPU
    try:
        context = mp.spawn(fn, args=args, nprocs=world, join=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} worker processes did not finish within {timeout} s")
    except Exception as error:  # noqa: BLE001 - a worker's exception, its death by a signal, or the deadline
        for process in context.processes:
            if process.is_alive():
                process.kill()
        for process in context.processes:
            process.join(timeout=10)
        logs = "\n".join(f"--- rank {rank} (exit code {process.exitcode}) ---\n"
                         + _read(os.path.join(out_dir, f"rank{rank}.log"))
                         for rank, process in enumerate(context.processes))
        pytest.fail(f"{type(error).__name__}: {error}\n{logs}")


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        return f"(no log: {exc})"
