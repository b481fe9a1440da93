"""finetune under DistributedDataParallel and FSDP2 `fully_shard` (gloo, CPU processes): every rank ends with
the same state."""

from __future__ import annotations

import math
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fxquant as fxq

pytestmark = pytest.mark.slow  # minutes: see the marker in pyproject.toml

_CONFIG = fxq.QuantConfig(weight=fxq.QuantSpec(bits=8), activation=fxq.QuantSpec(bits=8), first_last_bits=None)


def _calibrated_on_rank(rank: int, world: int, init_file: str) -> tuple:
    """Join the gloo group; the small_models MLP, this rank's own 4 batches, and the module prepared and
    calibrated on them (rank-specific clamps)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from small_models import make

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, _ = make("mlp")
    torch.manual_seed(100 + rank)  # each rank sees different data
    batches = [torch.randn(16, 16) for _ in range(4)]
    qm = fxq.prepare(model, batches[0], _CONFIG)
    fxq.calibrate(qm, batches)
    return model, batches, qm


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    model, batches, qm = _calibrated_on_rank(rank, world, init_file)
    try:  # DDP broadcasts rank 0's state when it wraps
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


def _nonfinite_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    model, batches, qm = _calibrated_on_rank(rank, world, init_file)
    if rank == 1:  # only this rank's second batch is broken
        batches[1] = batches[1].clone()
        batches[1][0, 0] = float("nan")
    try:
        ddp = DistributedDataParallel(qm)
        with pytest.warns(fxq.FinetuneWarning, match="non-finite"):
            result = fxq.finetune(ddp, batches, teacher=model, steps=8, target_bits=6, progress=False)
        state = {k: v.detach().cpu() for k, v in qm.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"state": state, "nonfinite": result.nonfinite_steps}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank_instead_of_hanging() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.spawn(_nonfinite_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=False)
        limit = 240.0
        deadline = time.monotonic() + limit
        # join() answers False each time one rank ends while another still runs; it raises if a rank failed
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for p in context.processes:
                    p.kill()
                pytest.fail(f"the ranks did not finish within {limit:.0f} s: a rank waits for another")
        a = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
        b = torch.load(os.path.join(tmp, "rank1.pt"), weights_only=True)
    assert a["nonfinite"] == b["nonfinite"] == [2, 6]  # the broken batch comes back every 4 steps
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, batches, qm = _calibrated_on_rank(rank, world, init_file)
    from small_models import make  # on the path _calibrated_on_rank set
    try:  # finetune starts every rank from rank 0's quantizers
        fully_shard(qm, ignored_params=set(qm.fxq_quantizers.parameters()))
        result = fxq.finetune(qm, batches, teacher=model, steps=12, target_bits=6, progress=False)
        sharded = {n: isinstance(p, DTensor) for n, p in qm.named_parameters()}
        full = get_model_state_dict(qm, options=StateDictOptions(full_state_dict=True))
        torch.manual_seed(7)
        x = torch.randn(8, 16)
        qm.eval()
        with torch.no_grad():
            out = qm(x)
        # the gathered checkpoint, saved and loaded back into a fresh (unsharded) prepared module
        path = os.path.join(out_dir, f"ckpt{rank}.pt")
        torch.save(full, path)
        fresh = fxq.prepare(make("mlp")[0], x, _CONFIG)
        fxq.load_state_dict(fresh, torch.load(path, weights_only=True))
        with torch.no_grad():
            fresh_out = fresh.eval()(x)
        state = {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}
        record = {"state": state, "best_step": result.best_step, "met": result.met_target, "sharded": sharded}
        record.update(out=out, fresh_out=fresh_out, float_fc1=model.fc1.weight.detach().clone())
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_finetune_gives_the_same_quantizers_on_every_rank_and_a_checkpoint_that_loads_back() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_fsdp_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        a, b = (torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    # weights sharded (DTensor), quantizer parameters replicated, as finetune's docstring states
    assert a["sharded"]["fc1.weight"] and a["sharded"]["fc2.bias"]
    assert not any(s for n, s in a["sharded"].items() if n.startswith("fxq_quantizers."))
    assert a["best_step"] == b["best_step"] and a["met"] and b["met"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    bits = [v for k, v in a["state"].items() if k.endswith("bits_param")]
    assert bits and all(float(v.max()) < 1.0 for v in bits)  # every bit-width moved from 8 to the target
    assert not torch.equal(a["state"]["fc1.weight"], a["float_fc1"])  # the sharded weights trained too
    assert torch.equal(a["out"], b["out"])
    assert torch.equal(a["fresh_out"], a["out"]) and torch.equal(b["fresh_out"], b["out"])


def _fsdp_errors_worker(rank: int, world: int, init_file: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from small_models import make
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x = make("mlp")

        def prepared() -> torch.nn.Module:
            qm = fxq.prepare(model, x, _CONFIG)
            fxq.calibrate(qm, [x])
            return qm

        def finetune(qm: torch.nn.Module) -> None:
            fxq.finetune(qm, [x], teacher=model, steps=2, target_bits=6, progress=False)

        quantizers = lambda qm: set(qm.fxq_quantizers.parameters())  # noqa: E731
        qm = prepared()
        fully_shard(qm.fc1)  # a block the flat graph never calls: its weights would never be gathered
        fully_shard(qm, ignored_params=quantizers(qm))
        with pytest.raises(fxq.ConfigError, match=r"fully_shard was applied to \['fc1'\], whose forward the prepared"):
            finetune(qm)
        qm = prepared()
        fully_shard(qm.fc1)
        with pytest.raises(fxq.ConfigError, match="but not to the module itself"):
            finetune(qm)
        qm = prepared()  # only the scalar bits left out: the clamps would be sharded
        fully_shard(qm, ignored_params={p for p in quantizers(qm) if p.dim() == 0})
        with pytest.raises(fxq.ConfigError, match=r"sharded the quantizer parameters fxq_quantizers\.fc1_weight\.hi"):
            finetune(qm)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_sharding_that_finetune_cannot_follow_is_refused_with_the_fix() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp_errors_worker, args=(1, os.path.join(tmp, "init")), nprocs=1, join=True)


def test_gradient_norm_scales_only_when_it_exceeds_the_maximum() -> None:
    """`clip_grad_norm` returns the global norm; with an infinite maximum (fine-tuning's default, which reads the
    norm to skip non-finite steps) it leaves the gradients as they are, with a finite one it scales them to it, as
    `torch.nn.utils.clip_grad_norm_` does; a non-finite gradient gives a non-finite norm."""
    from fxquant.distributed import clip_grad_norm

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.full((2, 2), 2.0)
    before = [p.grad.clone() for p in params if p.grad is not None]
    assert clip_grad_norm(params, float("inf")) == pytest.approx(5.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    reference = [p.detach().clone().requires_grad_(True) for p in params[:2]]
    for r, b in zip(reference, before):
        r.grad = b.clone()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert clip_grad_norm(params, 1.0) == pytest.approx(5.0)
    assert all(torch.allclose(p.grad, r.grad) for p, r in zip(params, reference))
    params[2].grad = torch.tensor([float("nan")])
    assert not math.isfinite(clip_grad_norm(params, float("inf")))
    # small gradients normed together, a large one on its own: the same norm to float rounding, infinities seen
    large = torch.nn.Parameter(torch.zeros(5000))
    large.grad = torch.full((5000,), 0.01)
    params[2].grad = torch.tensor([1.0])
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params) + 5000 * 0.01 ** 2)
    assert clip_grad_norm(params + [large], float("inf")) == pytest.approx(expected, rel=1e-6)
    large.grad[7] = float("inf")
    assert not math.isfinite(clip_grad_norm(params + [large], float("inf")))
