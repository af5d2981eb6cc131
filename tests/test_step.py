"""The pieces of one Euphonium step that route rows (which rows the learner trains on, how the data-parallel ranks
share them), the driver's rollout feed (sync now, async one step ahead on a thread), and the one atomic write and
YAML reader: each checked against a direct computation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from euphonium_ray.errors import ConfigError
from euphonium_ray.files import read_yaml_mapping, write_atomic
from euphonium_ray.learning import Advantages
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.step import LearnBatch, learning_batch, split_for_learners
from euphonium_ray.trajectory import Trajectories, group_rows


def _traj(groups: int, g: int, n: int = 2) -> Trajectories:
    """A batch whose latents hold each row's index, so that a selection can be read off the numbers."""
    b = groups * g
    rows = torch.arange(b, dtype=torch.float32)
    return Trajectories(latents=rows.reshape(b, 1, 1).expand(b, n + 1, 1).clone(),
                        sigmas=torch.linspace(1, 0, n + 1), log_probs=torch.zeros(b, n),
                        process_rewards=torch.zeros(b, n), process_evaluated=torch.zeros(b, n, dtype=torch.bool),
                        guidance_norms=torch.zeros(b, n), guided_steps=torch.zeros(0, dtype=torch.long),
                        x0_hat_final=torch.zeros(b, 1), group_ids=torch.arange(b) // g,
                        prompt_indices=torch.arange(b) // g, sample_seeds=torch.arange(b),
                        cond=TextConditioning(torch.zeros(b, 2, 4), torch.ones(b, 2, dtype=torch.long),
                                              torch.zeros(b, 3)),
                        captions=[f"c{i}" for i in range(b)], group_size=g)


def _rows_of(traj: Trajectories | None) -> list[int]:
    return [] if traj is None else traj.latents[:, 0, 0].long().tolist()


def test_group_rows_are_the_contiguous_blocks_of_the_named_groups():
    assert group_rows([2, 0], 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert group_rows(torch.tensor([1]), 4).tolist() == [4, 5, 6, 7]
    assert group_rows([], 4).tolist() == []


def test_learning_batch_keeps_only_the_kept_groups_or_nothing_when_all_were_skipped():
    traj = _traj(groups=3, g=2)
    kept = group_rows([0, 2], 2)
    adv = torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2)
    batch = learning_batch(traj, Advantages([(1.0, adv)], kept, {1: "nan"}))
    assert _rows_of(batch.traj) == [0, 1, 4, 5] and batch.num_groups == 2
    assert batch.terms[0][0] == 1.0 and torch.equal(batch.terms[0][1], adv)
    empty = learning_batch(traj, Advantages([], torch.zeros(0, dtype=torch.long), {0: "a", 1: "b", 2: "c"}))
    assert empty.traj is None and empty.terms == [] and empty.num_groups == 0


def test_an_ensemble_learning_batch_keeps_every_row_with_a_skipped_groups_advantages_at_zero():
    traj = _traj(groups=4, g=2)  # 2 members x 2 groups
    kept = group_rows([0, 1, 3], 2)
    adv = torch.arange(1.0, 7.0).reshape(6, 1)
    batch = learning_batch(traj, Advantages([(0.5, adv)], kept, {2: "nan"}), members=2)
    assert _rows_of(batch.traj) == list(range(8))
    assert batch.terms[0][1].reshape(-1).tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 6.0]


@pytest.mark.parametrize("groups,ranks,left_out", [(4, 2, 0), (5, 2, 1), (1, 2, 1), (6, 3, 0)])
def test_split_for_learners_gives_each_rank_the_same_number_of_whole_groups(groups, ranks, left_out):
    traj = _traj(groups=groups, g=3)
    adv = torch.arange(groups * 3, dtype=torch.float32).reshape(-1, 1) * 10
    shards, dropped = split_for_learners(LearnBatch(traj, [(1.0, adv)]), ranks)
    per = groups // ranks
    assert dropped == left_out and len(shards) == ranks
    for r, shard in enumerate(shards):
        expected = list(range(r * per * 3, (r + 1) * per * 3))  # rank r's groups, in order
        assert _rows_of(shard.traj) == expected
        got = [] if shard.traj is None else (shard.terms[0][1].reshape(-1) / 10).long().tolist()
        assert got == expected  # advantages travel with their rows
    nothing, dropped = split_for_learners(LearnBatch(None, []), ranks)
    assert dropped == 0 and all(s.traj is None for s in nothing)


def test_the_async_feed_collects_the_next_step_on_a_thread_while_the_driver_waits_for_the_learner():
    from euphonium_ray.driver import BatchFeed

    calls: list[tuple[int, int, bool]] = []

    def collect(step: int, version: int) -> tuple[int, int]:
        calls.append((step, version, threading.current_thread() is threading.main_thread()))
        time.sleep(0.3)
        return step, version

    feed = BatchFeed(collect, ahead=True, end=3)
    try:
        assert feed.take(0) == (0, 0)  # nothing ahead yet: now, with the step's own weights
        t0 = time.perf_counter()
        feed.prefetch(1)
        time.sleep(0.3)  # the learner's work on step 0
        learn = time.perf_counter() - t0
        assert feed.take(1) == (1, 0)  # made during step 0's learning, with weights one version old
        both = time.perf_counter() - t0
        assert learn < 0.45 and both < 0.55, (learn, both)  # overlapped, not one after the other (0.6 s)
        feed.prefetch(3)  # past the last step: nothing
        assert feed.pending is None
    finally:
        feed.close()
    assert calls == [(0, 0, True), (1, 0, False)]
    sync = BatchFeed(lambda s, v: (s, v), ahead=False, end=3)
    sync.prefetch(1)
    assert sync.pending is None and sync.take(1) == (1, 1)


def test_write_atomic_writes_text_bytes_or_a_callback_and_leaves_nothing_behind_on_failure(tmp_path):
    write_atomic(tmp_path / "a" / "t.txt", "héllo")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.bin", lambda fh: fh.write(b"cb"), mode=0o644)
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" and (tmp_path / "c.bin").read_bytes() == b"cb"
    assert (tmp_path / "c.bin").stat().st_mode & 0o777 == 0o644

    def fail(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "b.bin", fail)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.bin"]  # no temporary file left


def test_read_yaml_mapping_names_the_file_and_what_is_wrong(tmp_path):
    good, bad, empty, listed = (tmp_path / n for n in ("good.yaml", "bad.yaml", "empty.yaml", "list.yaml"))
    good.write_text("a: 1\nb: [2, 3]\n")
    bad.write_text("a: [1\n")
    empty.write_text("")
    listed.write_text("- 1\n")
    assert read_yaml_mapping(good, "config file") == {"a": 1, "b": [2, 3]}
    assert read_yaml_mapping(empty, "benchmark config") == {}
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'none.yaml'}"):
        read_yaml_mapping(tmp_path / "none.yaml", "config file")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid YAML"):
        read_yaml_mapping(bad, "config file")
    with pytest.raises(ConfigError, match=r"is empty \(no keys\)"):
        read_yaml_mapping(empty, "config file", empty="(no keys)")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        read_yaml_mapping(listed, "config file")


def test_a_learners_shard_names_the_rows_of_the_whole_rollout_batch_it_holds():
    """What lets a learner take its rows from the rollouts themselves (``TrainingSystem.learn`` with sources):
    the kept groups' rows, then each rank's share of them, as rows of the batch the rollout workers returned."""
    traj = _traj(groups=5, g=2)
    kept = group_rows([0, 2, 3, 4], 2)  # group 1 skipped
    adv = torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2)
    batch = learning_batch(traj, Advantages([(1.0, adv)], kept, {1: "nan"}))
    assert batch.rows is not None and batch.rows.tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    shards, _ = split_for_learners(batch, 2)
    assert [s.rows.tolist() for s in shards if s.rows is not None] == [[0, 1, 4, 5], [6, 7, 8, 9]]
    for shard in shards:
        assert shard.traj is not None and shard.rows is not None
        assert _rows_of(shard.traj) == _rows_of(traj.select(shard.rows))  # the same rows, taken either way
