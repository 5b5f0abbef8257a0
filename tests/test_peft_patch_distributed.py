"""A patched PEFT model under DistributedDataParallel and FSDP2 (2 gloo processes on the CPU):
the same LoRA gradients as PEFT unpatched in one process on the whole batch, with the fused path
taken. Would catch a patch that DDP's or FSDP2's wrapping bypasses or breaks (FSDP2 swaps the
layer's class and unshards its parameters around the forward).

The workers run on the CPU whatever device the suite runs on (tests.utils.spawn_cpu_workers: the
CPU suite's environment, no GPU visible, FSDP2 on an explicit CPU mesh)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from lorakernels import patch_peft, peft_patch_stats
from tests.utils import exit_worker, spawn_cpu_workers, worker_log

pytest.importorskip("peft")
from tests.test_peft_patch import lora_mlp  # noqa: E402

WORLD = 2


def _batch():
    return torch.randn(8, 20, generator=torch.Generator().manual_seed(1))


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name.replace("module.", "")] = g.detach().clone()
    return out


def _wrap(model, mode):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from peft.tuners.lora import LoraLayer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))  # the default mesh is a CUDA one wherever CUDA is
    for layer in [m for m in model.modules() if isinstance(m, LoraLayer)]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _worker(rank, init_file, out_dir, mode):
    # Where a worker is stuck or crashed, if it is: its progress and its stacks (tests.utils.worker_log).
    step = worker_log(out_dir, rank)
    # A peer that died makes a collective fail after this long instead of waiting for ever.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    step("process group ready")
    try:
        with torch.device("cpu"):
            model = lora_mlp()
            patch_peft(model, backend="torch")
            step("patched")
            wrapped = _wrap(model, mode)
            step(f"wrapped ({mode})")
            wrapped(_batch().chunk(WORLD)[rank]).pow(2).mean().backward()
            step("backward done")
        torch.save({"grads": _grads(model), "fused": peft_patch_stats(model)["fused"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks finish before either tears down: a rank exiting while the other still talks to
        # it can abort or stall gloo.
        dist.barrier()
        step("barrier passed")
    finally:
        dist.destroy_process_group()
        step("done")
    exit_worker()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_patched_peft_model_under_ddp_and_fsdp2(tmp_path, mode):
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    with torch.device("cpu"):
        model = lora_mlp()
        model(_batch()).pow(2).mean().backward()
    expected = _grads(model)
    spawn_cpu_workers(_worker, (str(tmp_path / "init"), str(tmp_path), mode), str(tmp_path), WORLD)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["fused"] == 2  # both LoRA layers ran the fused path
        assert set(result["grads"]) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-6)
