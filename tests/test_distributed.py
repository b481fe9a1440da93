"""finetune under DistributedDataParallel (gloo, 2 CPU processes): every rank ends with the same state."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fxquant as fxq


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, _ = make("mlp")
        torch.manual_seed(100 + rank)  # each rank sees different data
        batches = [torch.randn(16, 16) for _ in range(4)]
        cfg = fxq.QuantConfig(weight=fxq.QuantSpec(bits=8), activation=fxq.QuantSpec(bits=8), first_last_bits=None)
        qm = fxq.prepare(model, batches[0], cfg)
        fxq.calibrate(qm, batches)  # rank-specific clamps: DDP broadcasts rank 0's state when it wraps
        ddp = DistributedDataParallel(qm)
        result = fxq.finetune(ddp, batches, teacher=model, steps=12, target_bits=6, progress=False)
        state = {k: v.detach().cpu() for k, v in qm.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"state": state, "best_step": result.best_step}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_finetune_gives_the_same_quantizer_state_on_every_rank() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        a = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
        b = torch.load(os.path.join(tmp, "rank1.pt"), weights_only=True)
    assert a["best_step"] == b["best_step"]
    assert a["state"].keys() == b["state"].keys()
    quantizer_keys = [k for k in a["state"] if k.startswith("fxq_quantizers.")]
    assert any(k.endswith("bits_param") for k in quantizer_keys)
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    # the quantizers did train: bits moved from 8 towards the target
    bits = [v for k, v in a["state"].items() if k.endswith("bits_param")]
    assert any(float(v.min()) < 1.0 for v in bits)
