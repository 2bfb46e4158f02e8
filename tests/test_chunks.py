"""Chunk plans checked by brute force over many clip, chunk and overlap lengths; window
assignments against explicit containment loops; the automatic chunk length against a linear
scan; per-frame tap rows gathered from their owners."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vggt4d.chunks import (
    ChunkStep,
    FrameRows,
    auto_chunk_length,
    forward_bytes,
    plan_chunks,
    resolve_plan,
    window_chunks,
)
from vggt4d.errors import UserError
from vggt4d.resources import GIB

PLANS = [(t, c, o) for t in range(1, 41) for c in range(2, 13) for o in range(1, c)]
OFFSETS = ([-2, 2], [-6, -4, -2, 2, 4, 6], [-2, -1, 1, 2], [1, 3], [-5], [])


def centrality_by_hand(frame: int, start: int, stop: int) -> int:
    """Distance to the nearest edge of the chunk."""
    return min(frame - start, stop - 1 - frame)


def most_central_by_hand(frame: int, holders: list[int], ranges) -> int:
    best, best_value = -1, -1
    for i in holders:  # increasing order: strict > keeps the earliest on ties
        value = centrality_by_hand(frame, *ranges[i])
        if value > best_value:
            best, best_value = i, value
    return best


@pytest.mark.parametrize(("num_frames", "chunk", "overlap"), [(10, 4, 1), (100, 12, 5)])
def test_a_hand_checked_plan(num_frames, chunk, overlap):
    plan = plan_chunks(num_frames, chunk, overlap)
    if num_frames == 10:  # step 3: 0-4, 3-7, 6-10 reaches the end
        assert plan.ranges == ((0, 4), (3, 7), (6, 10))
        assert plan.owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # ties: the earlier
        assert list(plan.shared_frames(0)) == [3] and list(plan.owned_frames(1)) == [4, 5, 6]
    else:  # step 7: starts 0, 7, ..., 84 (ends 96), then the last is extended back to 88-100
        assert [r[0] for r in plan.ranges] == [*range(0, 85, 7), 88]
        assert plan.ranges[-1] == (88, 100) and list(plan.shared_frames(12)) == list(range(88, 96))


def test_plans_by_brute_force():
    for num_frames, chunk, overlap in PLANS:
        plan = plan_chunks(num_frames, chunk, overlap)
        ranges = plan.ranges
        label = (num_frames, chunk, overlap)
        assert ranges[0][0] == 0 and ranges[-1][1] == num_frames, label
        assert all(stop - start == min(chunk, num_frames) for start, stop in ranges), label
        step = chunk - overlap
        assert all(ranges[i][0] == i * step for i in range(len(ranges) - 1)), label
        assert all(ranges[i][1] < num_frames for i in range(len(ranges) - 1)), label  # none extra
        for i in range(len(ranges) - 1):
            shared = ranges[i][1] - ranges[i + 1][0]
            assert ranges[i][0] < ranges[i + 1][0] and shared >= overlap, label
            assert list(plan.shared_frames(i)) == [
                f for f in range(num_frames)
                if ranges[i][0] <= f < ranges[i][1] and ranges[i + 1][0] <= f < ranges[i + 1][1]]
        owned = []
        for frame in range(num_frames):
            holders = [i for i, (start, stop) in enumerate(ranges) if start <= frame < stop]
            assert holders, label  # every frame covered
            assert plan.owner[frame] == most_central_by_hand(frame, holders, ranges)
        for i in range(len(ranges)):
            owned.extend(plan.owned_frames(i))
        assert owned == list(range(num_frames)), label  # contiguous runs, in chunk order


def test_windows_by_brute_force():
    checked = refused = 0
    for num_frames, chunk, overlap in PLANS:
        plan = plan_chunks(num_frames, chunk, overlap)
        for offsets in OFFSETS:
            span = max([0, *offsets]) - min([0, *offsets])
            if len(plan) > 1 and overlap < span:
                with pytest.raises(UserError, match=f"overlap to at least {span}$"):
                    window_chunks(plan, offsets)
                refused += 1
                continue
            assigned = window_chunks(plan, offsets)
            for frame in range(num_frames):
                needed = [frame] + [frame + o for o in offsets if 0 <= frame + o < num_frames]
                holders = [i for i, (start, stop) in enumerate(plan.ranges)
                           if all(start <= f < stop for f in needed)]
                assert assigned[frame] == most_central_by_hand(frame, holders, plan.ranges), (
                    num_frames, chunk)
                if plan.owner[frame] in holders:
                    assert assigned[frame] == plan.owner[frame]
            checked += 1
    assert checked > 9_000 and refused > 1_000


def test_overlap_below_the_window_leaves_a_frame_without_a_chunk():
    """The requirement is tight: with overlap span − 1 frame 14's window [8, 20] fits neither
    (0, 20) nor (9, 29)."""
    plan = plan_chunks(60, 20, 11)  # offsets ±6 span 12
    assert plan.ranges[:2] == ((0, 20), (9, 29))
    assert not any(start <= 8 and stop > 20 for start, stop in plan.ranges)
    with pytest.raises(UserError, match="at least 12"):
        window_chunks(plan, [-6, -4, -2, 2, 4, 6])


@pytest.mark.parametrize(("args", "message"), [
    ((0, 4, 1), "at least one frame"),
    ((10, 1, 0), "too short"),
    ((10, 4, 0), "overlap 0 must be at least 1"),
    ((10, 4, 4), "below the chunk length 4"),
])
def test_bad_plans_are_refused(args, message):
    with pytest.raises(UserError, match=message):
        plan_chunks(*args)


def test_a_short_clip_is_one_chunk_whatever_the_overlap():
    plan = plan_chunks(5, 8, 0)
    assert plan.ranges == ((0, 5),) and plan.owner.tolist() == [0] * 5
    assert window_chunks(plan, [-6, 6]).tolist() == [0] * 5


def quadratic(n: int) -> int:
    return 3 * GIB + 40_000_000 * n + 1_500_000 * n * n


def test_auto_chunk_length_is_the_largest_that_fits():
    for limit in range(3 * GIB, 12 * GIB, GIB // 7):
        for num_frames, minimum in ((500, 2), (30, 13), (5, 13)):
            if quadratic(min(minimum, num_frames)) > limit:
                with pytest.raises(UserError, match="even a chunk of"):
                    auto_chunk_length(limit, quadratic, num_frames, minimum)
                continue
            scan = max(n for n in range(min(minimum, num_frames), num_frames + 1)
                       if quadratic(n) <= limit)
            assert auto_chunk_length(limit, quadratic, num_frames, minimum) == scan


def test_auto_chunk_length_grows_with_the_limit_on_the_forward_estimate():
    network = dict(num_params=24_800_000, height=280, width=504, embed_dim=384,
                   head_features=64, dtype=torch.float32)
    estimate = forward_bytes(captured_bytes_per_frame=3_000_000, **network)
    assert estimate(10) - forward_bytes(**network)(10) == 30_000_000
    lengths = []
    for limit in range(3 * GIB, 40 * GIB, GIB // 2):
        n = auto_chunk_length(limit, estimate, 2000, minimum=13)
        assert estimate(n) <= limit and (n == 2000 or estimate(n + 1) > limit)
        lengths.append(n)
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_frame_rows_take_each_frame_from_its_owner():
    """Per-frame results of every chunk's forward (rows tagged with their clip frame and
    chunk), gathered: frame f's row is the one its owner computed."""
    plan = plan_chunks(23, 8, 3)
    rows = FrameRows()
    for index, (start, stop) in enumerate(plan.ranges):
        rows.start(ChunkStep(plan, index))
        rows.put(torch.tensor([[f, index] for f in range(start, stop)]))
    assert rows.value[:, 0].tolist() == list(range(23))
    assert rows.value[:, 1].tolist() == plan.owner.tolist()
    unchunked = FrameRows()
    unchunked.put(np.arange(5))
    assert unchunked.value.tolist() == list(range(5))


def test_resolve_plan_splits_only_what_does_not_fit():
    def estimate(n: int) -> int:
        return 3 * GIB + n * GIB // 10

    assert resolve_plan(40, 0, 12, False, estimate, 10 * GIB) is None  # chunks off
    assert resolve_plan(40, 64, 12, False, estimate, 10 * GIB) is None  # the clip fits one
    assert resolve_plan(100, 32, 12, False, estimate, GIB).chunk == 32  # length as given
    auto = resolve_plan(500, 0, 12, True, estimate, 10 * GIB)
    assert auto.chunk == 70 and estimate(70) <= 10 * GIB < estimate(71)
    assert resolve_plan(500, 50, 12, True, estimate, 10 * GIB).chunk == 50  # capped
    assert resolve_plan(60, 0, 12, True, estimate, 10 * GIB) is None  # all 60 fit
    with pytest.raises(UserError, match="even a chunk of 13 frames"):
        resolve_plan(500, 0, 12, True, estimate, 4 * GIB)  # overlap + 1 frames do not fit
