"""The shard plan: deterministic, complete, and independent of how work runs."""

from pipeline.build.plan import plan_build, plan_split


def test_train_plan_is_a_seeded_permutation_cut_into_shards():
    items = [f"item{i:03d}" for i in range(25)]
    plans = plan_split("train", items, shard_size=10, seed=3)
    assert [plan.name for plan in plans] == ["train-000000", "train-000001", "train-000002"]
    assert [len(plan.samples) for plan in plans] == [10, 10, 5]
    indices = [sample.index for plan in plans for sample in plan.samples]
    assert sorted(indices) == list(range(25))
    assert indices != list(range(25))
    assert all(sample.item == items[sample.index] for plan in plans for sample in plan.samples)
    again = plan_split("train", items, shard_size=10, seed=3)
    assert [s.index for p in again for s in p.samples] == indices
    other_seed = plan_split("train", items, shard_size=10, seed=4)
    assert [s.index for p in other_seed for s in p.samples] != indices


def test_val_plan_keeps_sorted_order():
    items = [f"v{i}" for i in range(7)]
    plans = plan_split("val", items, shard_size=3, seed=0)
    assert [[s.index for s in plan.samples] for plan in plans] == [[0, 1, 2], [3, 4, 5], [6]]


def test_build_plan_puts_train_first():
    plans = plan_build({"val": ["a"], "train": ["b", "c"]}, shard_size=5, seed=0)
    assert [plan.name for plan in plans] == ["train-000000", "val-000000"]
