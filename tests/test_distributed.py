"""DistributedDataParallel (and FSDP2 where this torch supports it on CPU) over 2 gloo processes
give the same LoRA gradients as one process on the whole batch. The processes are started here
and finish in seconds; dropout is 0 so that both runs compute the same function.

The workers run on the CPU whatever device the suite runs on (tests.utils.spawn_cpu_workers: the
CPU suite's environment, no GPU visible, FSDP2 on an explicit CPU mesh): two ranks cannot share
one GPU under NCCL, and gloo is the route CI takes."""

import datetime
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from lorakernels import LoRALinear
from tests.utils import exit_worker, spawn_cpu_workers, worker_log

WORLD = 2


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(LoRALinear(12, 16, r=4, lora_alpha=8), torch.nn.GELU(), LoRALinear(16, 8, r=4))
    for m in model:
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B)
    return model


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=generator)


def _single_process_grads():
    with torch.device("cpu"):  # the gloo workers run on the CPU, whatever device the suite runs on
        model = _model()
        model(_batch()).pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, init_file, out_dir, mode):
    step = worker_log(out_dir, rank)
    # A peer that died makes a collective fail after this long instead of waiting for ever.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    step("process group ready")
    try:
        model = _model()
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))  # the default mesh is a CUDA one wherever CUDA is
            for layer in model:
                if isinstance(layer, LoRALinear):
                    fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        step(f"wrapped ({mode})")
        shard = _batch().chunk(WORLD)[rank]
        wrapped(shard).pow(2).mean().backward()
        step("backward done")
        grads = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name.replace("module.", "")] = g.detach().clone()
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
        # Both ranks finish before either tears down: a rank exiting while the other still talks to
        # it can abort gloo ("terminate called without an active exception").
        dist.barrier()
        step("barrier passed")
    finally:
        dist.destroy_process_group()
        step("done")
    exit_worker()


def _run(tmp_path, mode):
    spawn_cpu_workers(_worker, (str(tmp_path / "init"), str(tmp_path), mode), str(tmp_path), WORLD)
    return [torch.load(tmp_path / f"grads{r}.pt") for r in range(WORLD)]


def test_ddp_matches_single_process(tmp_path):
    expected = _single_process_grads()
    for grads in _run(tmp_path, "ddp"):
        assert set(grads) == set(expected)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6)


def test_fsdp2_matches_single_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    expected = _single_process_grads()
    for grads in _run(tmp_path, "fsdp"):
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6)


def _crashing_worker(rank, init_file, out_dir):
    step = worker_log(out_dir, rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    step("process group ready")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    dist.barrier()  # rank 0 waits here for a peer that is gone


def test_a_crashing_worker_fails_the_test_with_its_stack(tmp_path):
    """Catches a worker's death that hangs the suite (its peer waiting in a collective) or that fails
    without saying where it happened."""
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="SIGSEGV") as failure:
        spawn_cpu_workers(_crashing_worker, (str(tmp_path / "init"), str(tmp_path)), str(tmp_path), WORLD)
    assert "Fatal Python error: Segmentation fault" in str(failure.value)  # the crashed worker's stack
    assert "_crashing_worker" in str(failure.value)
    assert time.monotonic() - start < 60
