"""The weight-publish buckets without Ray (``euphonium_ray.publish``): what every transport moves is bit-exact, the
cast is the rollout's, nothing is reallocated per version, and the cheap check catches what it claims to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from euphonium_ray.checkpoint import state_digest
from euphonium_ray.config import load_config
from euphonium_ray.publish import ALIGN_BYTES, BucketLayout, WeightBuckets, bitsum, fingerprint, unpack

ROOT = Path(__file__).resolve().parents[1]


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed shapes and dtypes, odd sizes (so alignment padding appears), special values, a counter."""
    g = torch.Generator().manual_seed(seed)
    state = {f"blocks.{i}.w": torch.randn(7 + i, 3 + 2 * i, generator=g) for i in range(5)}
    state["norm.bias"] = torch.randn(13, generator=g)
    state["special"] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 3.4e38, 1.0 + 2**-20])
    state["half.w"] = torch.randn(4, 5, generator=g).to(torch.bfloat16)
    state["step"] = torch.tensor([7], dtype=torch.int64)
    state["empty"] = torch.zeros(0, 3)
    return state


def test_pack_then_unpack_round_trips_bit_exact_in_the_source_dtypes():
    state = _state()
    buckets = WeightBuckets.for_state(state, None, "cpu")
    buckets.pack(state)
    got = unpack(buckets.buffers, buckets.layout)
    assert state_digest(got) == state_digest(state)
    assert set(buckets.buffers) == {"float32", "bfloat16", "int64"}


def test_every_tensor_starts_aligned_and_the_padding_stays_zero():
    state = _state()
    buckets = WeightBuckets.for_state(state, torch.bfloat16, "cpu")
    buckets.pack(state)
    for slot in buckets.layout.slots:
        size = torch.empty(0, dtype=getattr(torch, slot.dtype)).element_size()
        assert (slot.offset * size) % ALIGN_BYTES == 0
    used = torch.zeros(buckets.buffers["bfloat16"].numel(), dtype=torch.bool)
    for slot in buckets.layout.slots:
        if slot.dtype == "bfloat16":
            used[slot.offset: slot.offset + slot.numel] = True
    assert used.sum() < used.numel() and torch.all(buckets.buffers["bfloat16"][~used].view(torch.int16) == 0)


def test_floating_tensors_are_cast_to_the_rollout_dtype_exactly_as_tensor_to_does_and_counters_are_kept():
    state = _state()
    buckets = WeightBuckets.for_state(state, torch.bfloat16, "cpu")
    buckets.pack(state)
    assert set(buckets.buffers) == {"bfloat16", "int64"}
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    assert state_digest(buckets.views) == state_digest(want)  # round-to-nearest-even, inf and subnormals included
    assert buckets.views["step"].dtype == torch.int64 and int(buckets.views["step"]) == 7


def test_buckets_are_allocated_once_and_reused_for_every_version():
    state = _state()
    buckets = WeightBuckets.for_state(state, torch.bfloat16, "cpu")
    pointers = {d: b.data_ptr() for d, b in buckets.buffers.items()}
    digests = []
    for version in range(3):
        new = {k: v + version if v.is_floating_point() else v for k, v in state.items()}
        buckets.pack(new)
        digests.append(state_digest(buckets.views))
        assert state_digest(unpack(buckets.buffers, buckets.layout)) == state_digest(
            {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in new.items()})
    assert {d: b.data_ptr() for d, b in buckets.buffers.items()} == pointers and len(set(digests)) == 3


def test_a_bucket_copied_to_another_bucket_and_the_layout_through_json_give_the_same_tensors():
    state = _state()
    src = WeightBuckets.for_state(state, torch.bfloat16, "cpu")
    src.pack(state)
    layout = BucketLayout.from_json(src.layout.to_json())
    assert layout.key == src.layout.key
    dst = WeightBuckets(layout, "cpu")
    dst.copy_from(src)
    assert state_digest(dst.views) == state_digest(src.views)


def test_a_state_that_does_not_fit_the_layout_is_refused_by_name():
    state = _state()
    buckets = WeightBuckets.for_state(state, None, "cpu")
    with pytest.raises(KeyError, match="missing"):
        buckets.pack({k: v for k, v in state.items() if k != "norm.bias"})
    with pytest.raises(ValueError, match="norm.bias: shape"):
        buckets.pack({**state, "norm.bias": torch.zeros(14)})
    assert not buckets.layout.matches({**state, "norm.bias": torch.zeros(14)}, None)
    assert buckets.layout.matches(state, None) and not buckets.layout.matches(state, torch.bfloat16)


def test_bitsum_is_exact_and_independent_of_how_the_elements_are_split():
    x = torch.randn(1000).to(torch.bfloat16)
    whole = int(bitsum(x))
    assert whole == int(x.view(torch.int16).to(torch.int64).sum())
    assert whole == sum(int(bitsum(part)) for part in x.split(37))


def test_the_fingerprint_of_the_buckets_equals_that_of_the_tensors_they_were_unpacked_into():
    state = _state()
    buckets = WeightBuckets.for_state(state, torch.bfloat16, "cpu")
    buckets.pack(state)
    loaded = {k: v.clone() for k, v in buckets.views.items()}  # what a rollout worker holds after loading
    assert buckets.fingerprint(3) == fingerprint(loaded, buckets.layout, 3)
    # a worker keeping fp32 weights loaded from bf16 ones is compared after the cast back: still equal
    widened = {k: v.float() if v.is_floating_point() else v for k, v in loaded.items()}
    assert fingerprint(widened, buckets.layout, 3) == buckets.fingerprint(3)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_fingerprint_catches_any_single_changed_element_a_stale_version_and_a_changed_layout(dtype):
    """What the cheap check claims: every single-element change (one flipped bit anywhere: sign, exponent or
    lowest mantissa bit; or a value written twice by a torn copy), a version other than the published one, a
    tensor of another shape. Not claimed: permutations or changes that cancel in the sum."""
    state = _state()
    buckets = WeightBuckets.for_state(state, dtype, "cpu")
    buckets.pack(state)
    want = buckets.fingerprint(5)
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}
    for name, tensor in buckets.views.items():
        if tensor.numel() == 0:
            continue
        for bit in (0, 7, tensor.element_size() * 8 - 1):
            changed = {k: v.clone() for k, v in buckets.views.items()}
            kind = ints[tensor.element_size() * 8]
            flat = changed[name].reshape(-1).view(kind)
            flat[flat.numel() // 2] ^= torch.tensor(1, dtype=kind) << bit
            assert fingerprint(changed, buckets.layout, 5) != want, (name, bit)
    assert fingerprint(buckets.views, buckets.layout, 4) != want
    other = BucketLayout.for_state({**state, "norm.bias": torch.zeros(12)}, dtype)
    assert other.key != buckets.layout.key


def test_auto_weight_sync_picks_cuda_ipc_for_one_shared_gpu_nccl_for_whole_gpus_and_the_object_store_else():
    def backend(*sets: str) -> str:
        return load_config(None, list(sets), use_env=False).cluster.weight_sync_backend()

    assert backend("cluster.learner_gpus=0.5", "cluster.rollout_gpus=0.5") == "cuda_ipc"
    assert backend("cluster.learner_gpus=1", "cluster.rollout_gpus=1") == "collective"
    assert backend() == "object_store"
    assert backend("cluster.learner_gpus=0.5", "cluster.rollout_gpus=0.5", "cluster.num_learners=2") == "object_store"
    assert backend("cluster.learner_gpus=0.5", "cluster.rollout_gpus=0.5", "cluster.weight_sync=object_store") == \
        "object_store"


def test_the_rollout_dtype_is_bf16_on_gpu_rollouts_and_fp32_on_cpu_ones():
    from euphonium_ray.roles import rollout_weight_dtype

    assert rollout_weight_dtype(load_config(None, ["cluster.rollout_gpus=0.5"], use_env=False)) == torch.bfloat16
    assert rollout_weight_dtype(load_config(None, [], use_env=False)) == torch.float32
    assert rollout_weight_dtype(load_config(None, ["cluster.rollout_gpus=1", "model.dtype=fp32"],
                                            use_env=False)) == torch.float32


def test_publish_bench_runs_tiny_on_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "publish"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "publish.py"), "--device", "cpu", "--tiny", "--out",
                          str(out), "--deadline-s", "60", "--no-ray", "--reps", "3", "--warmup", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    report = json.loads((out / "publish.json").read_text())
    assert report["full"]["bit_identical"] and report["lora"]["bit_identical"]
    assert report["full"]["one_process"]["cast_exact"] and report["lora"]["one_process"]["cast_exact"]
    assert report["full"]["one_process"]["publish_s"] > 0 and (out / "publish.md").read_text().startswith("#")
    assert "ratio" in run.stdout


def test_the_cuda_ipc_layer_refuses_a_cpu_learner_and_a_gpu_this_process_cannot_see():
    """What of the IPC path runs without a GPU: its refusals. The mapping itself is untested here (no CUDA)."""
    from euphonium_ray.actors.weights import CudaIpcSync, make_weight_sync
    from euphonium_ray.publish import import_ipc

    sync = make_weight_sync("cuda_ipc", None, device="cpu", dtype=torch.bfloat16)
    assert isinstance(sync, CudaIpcSync) and sync.backend == "cuda_ipc"
    with pytest.raises(RuntimeError, match="needs the learner on a GPU"):
        sync.publish(0, _state())
    with pytest.raises(RuntimeError, match="GPU-elsewhere is not visible.*weight_sync=object_store"):
        import_ipc({"uuid": "GPU-elsewhere", "handles": {}})
