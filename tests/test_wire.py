"""The object-store transport (``wire``): tensors cross Ray as numpy payloads and come back bit-identical, with
their dtypes (bf16 included), and a read-only object-store view is copied before anyone may write into it."""

from __future__ import annotations

import pytest
import ray
import torch

from euphonium_ray.trajectory import Trajectories
from euphonium_ray.wire import Packed, pack, unpack


def test_pack_then_unpack_gives_identical_tensors_of_every_dtype_inside_nested_containers():
    g = torch.Generator().manual_seed(0)
    obj = {"f32": torch.randn(3, 4, generator=g), "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
           "i64": torch.arange(6).reshape(2, 3), "mask": torch.tensor([True, False]),
           "terms": [(1.0, torch.randn(2, 2, generator=g))], "plain": "text", "n": 3}
    packed = pack(obj)
    assert isinstance(packed["bf16"], Packed) and packed["bf16"].shape == (5,)
    assert isinstance(packed["terms"][0][1], Packed) and packed["terms"][0][0] == 1.0 and packed["plain"] == "text"
    back = unpack(packed)
    for key in ("f32", "bf16", "i64", "mask"):
        assert back[key].dtype == obj[key].dtype and torch.equal(back[key], obj[key])
    assert torch.equal(back["terms"][0][1], obj["terms"][0][1]) and back["n"] == 3


def test_a_non_contiguous_tensor_is_packed_by_value():
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(unpack(pack(t)), t)


@pytest.mark.ray
def test_through_the_object_store_tensors_come_back_writable_unless_a_reader_asks_for_views(local_ray):
    t = torch.arange(1000.0)
    got = ray.get(ray.put(pack({"x": t})))
    assert not got["x"].array.flags.writeable  # the object store's read-only view
    copy = unpack(got)["x"]
    copy += 1  # a writable copy: the stored object is untouched
    view = unpack(got, writable=False)["x"]
    assert torch.equal(view, t) and torch.equal(copy, t + 1)


def _traj(b: int = 4, n: int = 2) -> Trajectories:
    from euphonium_ray.models.base import TextConditioning

    g = torch.Generator().manual_seed(1)
    return Trajectories(
        latents=torch.randn(b, n + 1, 2, 1, 2, 2, generator=g), sigmas=torch.linspace(1, 0, n + 1),
        log_probs=torch.randn(b, n, generator=g), process_rewards=torch.zeros(b, n),
        process_evaluated=torch.zeros(b, n, dtype=torch.bool), guidance_norms=torch.zeros(b, n),
        guided_steps=torch.zeros(0, dtype=torch.long), x0_hat_final=torch.randn(b, 2, 1, 2, 2, generator=g),
        group_ids=torch.arange(b) // 2, prompt_indices=torch.arange(b) // 2, sample_seeds=torch.arange(b),
        cond=TextConditioning(torch.randn(b, 3, 4, generator=g), torch.ones(b, 3, dtype=torch.long),
                              torch.randn(b, 5, generator=g)),
        captions=[f"c{i}" for i in range(b)], group_size=2)


def test_selecting_every_row_in_order_or_catting_one_batch_shares_the_tensors_instead_of_copying():
    traj = _traj()
    same = traj.select(torch.arange(4))
    assert same.latents.data_ptr() == traj.latents.data_ptr() and same.captions == traj.captions
    assert Trajectories.cat([traj]).latents.data_ptr() == traj.latents.data_ptr()
    part = traj.select([2, 3])  # anything else still copies the rows asked for
    assert torch.equal(part.latents, traj.latents[2:]) and part.latents.data_ptr() != traj.latents.data_ptr()


def test_a_trajectory_round_trips_through_pack_and_from_dict():
    traj = _traj()
    back = Trajectories.from_dict(unpack(pack(traj.to_dict())))
    for name in ("latents", "log_probs", "x0_hat_final", "sample_seeds", "process_evaluated"):
        assert torch.equal(getattr(back, name), getattr(traj, name))
    assert back.captions == traj.captions and back.group_size == 2 and torch.equal(back.cond.pooled, traj.cond.pooled)
