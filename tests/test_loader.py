"""The online loaders on real shards: DALI (CPU here, GPU when marked) against the torch reference.

The fixture's images are coordinate-encoded (red = x, green = y), so a crop's
offset and flip can be read back from the loader's output; the lighting
offset is isolated by a twin run with ``lighting_std=0`` (same seed, so the
same crops and flips).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import build_shard_dir
from PIL import Image
from scipy import stats as scipy_stats

from pipeline.load.augment import AugmentDraws, draw_augmentation
from pipeline.load.epochs import num_batches, plan_epoch, rank_batch_sizes, rank_batch_starts
from pipeline.load.interface import Device, Loader, ResumableLoader, parse_device
from pipeline.load.loader import create_loader
from pipeline.load.samples import SampleReader, _strict_member_columns, _uniform_member_columns
from shards.errors import UserError

BACKENDS = ["dali", "torch"]
LEVELS = 2.0  # allowed difference between decoders, in 0..255 units
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def shard_dir_420(tmp_path_factory):
    """The fixture's images with hard colour edges, stored 4:2:0 as builds store them: where
    decoders that upsample chroma differently give different pixels."""
    return build_shard_dir(tmp_path_factory.mktemp("shards-420"), subsampling=2, sharp=True)


def to_pixels(images: torch.Tensor, shard_dir, normalize: str) -> np.ndarray:
    """Undo mean subtraction and scaling (not lighting): [..., 3, 224, 224] in 0..255 units."""
    values = images.cpu().numpy().astype(np.float64)
    stats = json.loads((shard_dir / "stats.json").read_text())
    if normalize == "channel":
        std = np.asarray(stats["std_rgb"])[:, None, None]
        return values * std + np.asarray(stats["mean_rgb"])[:, None, None]
    mean_crop = np.load(shard_dir / "mean.npy")[16:240, 16:240].transpose(2, 0, 1)
    return values + mean_crop


def recover_geometry(pixels: np.ndarray) -> tuple[int, int, bool]:
    """(offset_x, offset_y, flipped) of a crop of a coordinate-encoded image.

    Red grows by one per column (falls, if mirrored), green by one per row;
    averaging over the whole patch cancels the JPEG error of single pixels.
    """
    steps = np.arange(pixels.shape[-1])
    red, green = pixels[0], pixels[1]
    flipped = bool(red[:, -1].mean() < red[:, 0].mean())
    x_steps = steps[::-1] if flipped else steps
    offset_x = int(round((red - x_steps[None, :]).mean()))
    offset_y = int(round((green - steps[:, None]).mean()))
    return offset_x, offset_y, flipped


def run_epochs(loader, epochs: int):
    """Concatenated (images, labels, indices) of ``epochs`` iterations, per epoch."""
    results = []
    for _ in range(epochs):
        batches = list(loader)
        parts = range(len(batches[0]))
        results.append(tuple(torch.cat([batch[part] for batch in batches]) for part in parts))
    return results


def index_to_position(loader) -> dict[int, int]:
    reader = SampleReader(loader.table)
    return {reader.read(position)[2]: position for position in range(loader.table.num_samples)}


def pinned_draws(seed, epoch, num_samples, spec) -> AugmentDraws:
    """Extreme and varied crops, alternating flips, strong lighting: what the oracle pins."""
    generator = np.random.default_rng(1234)
    offsets = generator.integers(0, 33, (2, num_samples)).astype(np.int16)
    offsets[:, :4] = [[0, 32, 0, 32], [0, 0, 32, 32]]
    alpha = generator.normal(0, 1.0, (num_samples, 3)).astype(np.float32)
    flip = np.arange(num_samples) % 2 == 1
    return AugmentDraws(offsets[0], offsets[1], flip, alpha)


# --- epoch plan (pure) --------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("batch_size", [2, 3, 5, 8])
def test_uneven_splits_give_equal_steps_and_every_sample_once(world_size, batch_size):
    for num_samples in range(world_size, 60):
        sizes = rank_batch_sizes(num_samples, batch_size, world_size)
        assert sizes.sum() == num_samples and sizes.min() >= 1 and sizes.max() <= batch_size
        assert sizes.shape[1] == num_batches(num_samples, batch_size, world_size)
        assert sizes.shape[1] == math.ceil(math.ceil(num_samples / world_size) / batch_size)
        seen = np.concatenate(
            [
                plan_epoch([num_samples], batch_size, rank, world_size, seed=1, epoch=2).positions
                for rank in range(world_size)
            ]
        )
        np.testing.assert_array_equal(np.sort(seen), np.arange(num_samples))


def test_plan_refuses_fewer_samples_than_ranks():
    with pytest.raises(UserError):
        rank_batch_sizes(3, 4, 4)


def test_rank_batch_starts_follow_the_step_major_order():
    sizes = rank_batch_sizes(23, 4, 3)  # steps of 3 ranks: [4,4,4], [4,4,3]; ranks 8, 8, 7
    assert [rank_batch_starts(sizes, rank).tolist() for rank in range(3)] == [
        [0, 12],
        [4, 16],
        [8, 20],
    ]
    plan = plan_epoch([23], 4, 2, 3, seed=0, epoch=0, shuffle=False)
    assert plan.positions.tolist() == [8, 9, 10, 11, 20, 21, 22]


def test_split_table_reads_what_the_tars_hold(shard_dir):
    from shards.reader import iter_shard

    loader = create_loader(shard_dir, "val", backend="torch")
    table, reader = loader.table, SampleReader(loader.table)
    expected = [
        (members["jpg"], int(members["cls"]), json.loads(members["json"])["index"])
        for path in table.paths
        for _key, members in iter_shard(path)
    ]
    assert table.num_samples == len(expected) == 13 and table.shard_sizes == (5, 5, 3)
    for position, (jpg, label, index) in enumerate(expected):
        read_jpg, read_label, read_index = reader.read(position)
        assert read_jpg.tobytes() == jpg and (read_label, read_index) == (label, index)
    # the fast index parser and the strict one agree
    text = table.paths[0].with_suffix(".idx").read_text()
    fast, strict = _uniform_member_columns(text), _strict_member_columns(text)
    assert list(fast) == ["cls", "jpg", "json"]
    for ext, (offsets, sizes) in strict.items():
        np.testing.assert_array_equal(fast[ext][0], offsets)
        np.testing.assert_array_equal(fast[ext][1], sizes)
    assert _uniform_member_columns(text.replace(".json", ".txt", 1)) is None


def test_batch_work_carries_each_samples_draws():
    from pipeline.load.torch_loader import batch_work

    plan = plan_epoch([10, 7], 4, rank=0, world_size=1, seed=1, epoch=0)
    draws = pinned_draws(0, 0, 17, None)
    first = batch_work(plan, 2, draws)
    assert [item[0] for item in first] == plan.batch(2).tolist()
    for position, offset_x, offset_y, flip, alpha in first:
        assert (offset_x, offset_y, flip) == (
            draws.offset_x[position],
            draws.offset_y[position],
            draws.flip[position],
        )
        assert type(position) is int and type(flip) is bool and alpha.dtype == np.float32
        np.testing.assert_array_equal(alpha, draws.alpha[position])
    assert batch_work(plan, 1, None) == plan.batch(1).tolist()


def test_sample_index_is_parsed_only_when_asked(shard_dir, monkeypatch):
    parsed, real_loads = [], json.loads

    def counting_loads(text):
        if not isinstance(text, bytes):  # manifest.json and the like, read as text
            return real_loads(text)
        parsed.append(text)  # a sample's .json, sliced out of its shard's bytes
        return {"index": 1000 + len(parsed)}

    monkeypatch.setattr("pipeline.load.samples.json.loads", counting_loads)
    table = create_loader(shard_dir, "val", backend="torch").table
    jpg, label, index = SampleReader(table, with_index=False).read(7)
    assert index == 7 and not parsed
    indexed_jpg, indexed_label, indexed = SampleReader(table).read(7)
    assert indexed == 1001 and len(parsed) == 1
    assert indexed_jpg.tobytes() == jpg.tobytes() and indexed_label == label
    # The flag survives the trip to a DataLoader worker.
    assert pickle.loads(pickle.dumps(SampleReader(table, with_index=False))).with_index is False
    # A loader that does not yield indices never parses a .json; one that does, each once.
    for with_index, expected in ((False, 0), (True, 13)):
        parsed.clear()
        loader = create_loader(
            shard_dir, "val", batch_size=5, backend="torch", num_threads=0, with_index=with_index
        )
        batches = list(loader)
        assert len(parsed) == expected and len(batches[0]) == (3 if with_index else 2)


def open_files_under(directory) -> int:
    """How many of this process's file descriptors are files under ``directory``."""
    count = 0
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        count += target.startswith(str(directory))
    return count


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_releases_shard_files_and_pipeline(shard_dir, backend):
    before = open_files_under(shard_dir)
    loader = create_loader(shard_dir, "train", batch_size=8, backend=backend, num_threads=0)
    list(loader)
    assert open_files_under(shard_dir) > before  # shards stay open between epochs
    loader.close()
    assert open_files_under(shard_dir) == before
    if backend == "dali":
        assert loader._pipeline is None
    loader.close()  # again: nothing left to do


# --- oracle: DALI against the torch reference -----------------------------------------------


@pytest.mark.parametrize("normalize", ["paper", "channel"])
def test_pinned_dali_train_equals_torch_reference(shard_dir, normalize):
    outputs = {}
    for backend in BACKENDS:
        loader = create_loader(
            shard_dir,
            "train",
            batch_size=16,
            backend=backend,
            normalize=normalize,
            with_index=True,
            draw_augmentation=pinned_draws,
        )
        outputs[backend] = run_epochs(loader, 1)[0]
    dali, reference = outputs["dali"], outputs["torch"]
    np.testing.assert_array_equal(dali[2].numpy(), reference[2].numpy())  # same order
    np.testing.assert_array_equal(dali[1].numpy(), reference[1].numpy())
    difference = np.abs(
        to_pixels(dali[0], shard_dir, normalize) - to_pixels(reference[0], shard_dir, normalize)
    )
    assert difference.max() <= LEVELS, difference.max()
    # and the pinned crops, flips and lighting are what came out (lighting offset removed first)
    stats = json.loads((shard_dir / "stats.json").read_text())
    eigvals, eigvecs = np.asarray(stats["eigvals"]), np.asarray(stats["eigvecs"])
    positions = index_to_position(create_loader(shard_dir, "train", backend="torch"))
    draws = pinned_draws(0, 0, 96, None)
    pixels = to_pixels(dali[0], shard_dir, normalize)
    for image, index in zip(pixels, dali[2].tolist(), strict=True):
        position = positions[index]
        offset = eigvecs @ (draws.alpha[position] * eigvals) / 255.0
        expected = (draws.offset_x[position], draws.offset_y[position], draws.flip[position])
        assert recover_geometry(image - offset[:, None, None]) == expected


@pytest.mark.parametrize("ten_crop", [False, True])
def test_val_dali_equals_torch_reference(shard_dir, ten_crop):
    outputs = [
        run_epochs(
            create_loader(
                shard_dir,
                "val",
                batch_size=4,
                backend=backend,
                normalize="channel",
                ten_crop=ten_crop,
            ),
            1,
        )[0]
        for backend in BACKENDS
    ]
    expected_shape = (13, 10, 3, 224, 224) if ten_crop else (13, 3, 224, 224)
    assert tuple(outputs[0][0].shape) == expected_shape
    assert outputs[0][0].dtype == torch.float32 and outputs[0][1].dtype == torch.int64
    difference = np.abs(
        to_pixels(outputs[0][0], shard_dir, "channel")
        - to_pixels(outputs[1][0], shard_dir, "channel")
    )
    assert difference.max() <= LEVELS


def test_dali_equals_torch_reference_on_420_shards(shard_dir_420):
    """The CPU decoders agree on 4:2:0 colour edges too (both upsample chroma "fancily")."""
    outputs = [
        run_epochs(create_loader(shard_dir_420, "val", batch_size=8, backend=backend), 1)[0][0]
        for backend in BACKENDS
    ]
    difference = np.abs(
        to_pixels(outputs[0], shard_dir_420, "paper")
        - to_pixels(outputs[1], shard_dir_420, "paper")
    )
    assert difference.max() <= LEVELS


@pytest.mark.parametrize(("split", "ten_crop"), [("train", False), ("val", False), ("val", True)])
def test_pipeline_outputs_are_on_the_declared_device(shard_dir, split, ten_crop):
    """Images, labels and indices all leave the pipeline on its device (a GPU pipeline's
    graph is defined, not built, so this runs without one)."""
    from nvidia.dali import Pipeline

    from pipeline.load.dali_pipes import BatchFeeder, train_pipeline, val_pipeline

    loader = create_loader(shard_dir, split, batch_size=4, backend="torch", ten_crop=ten_crop)
    feeder = BatchFeeder(loader.reader(), loader.spec, train=split == "train")
    for device, device_id in (("cpu", None), ("gpu", 0)):
        with Pipeline(batch_size=4, num_threads=1, device_id=device_id):
            if split == "train":
                outputs = train_pipeline.__wrapped__(feeder, loader.spec, device)
            else:
                outputs = val_pipeline.__wrapped__(feeder, loader.spec, device, ten_crop)
        assert [output.device for output in outputs] == [device] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_crop_geometry_and_central_crop(shard_dir, backend):
    ten = run_epochs(
        create_loader(shard_dir, "val", batch_size=8, backend=backend, ten_crop=True), 1
    )[0][0]
    corners = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]
    expected = [(x, y, False) for x, y in corners] + [(x, y, True) for x, y in corners]
    pixels = to_pixels(ten, shard_dir, "paper")
    for sample in pixels[:3]:
        assert [recover_geometry(patch) for patch in sample] == expected
        np.testing.assert_allclose(sample[5:], sample[:5, :, :, ::-1], atol=1e-3)
    central = run_epochs(create_loader(shard_dir, "val", batch_size=8, backend=backend), 1)[0][0]
    assert recover_geometry(to_pixels(central, shard_dir, "paper")[0]) == (16, 16, False)
    np.testing.assert_allclose(central.numpy(), ten[:, 4].numpy(), atol=1e-4)


# --- unpinned randomness: crops, flips, lighting --------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_crops_flips_and_lighting_follow_the_spec(shard_dir, shard_stats, backend):
    epochs, seed = 4, 7
    settings = {
        "split": "train",
        "batch_size": 32,
        "backend": backend,
        "seed": seed,
        "normalize": "channel",
        "with_index": True,
    }
    lit_loader = create_loader(shard_dir, lighting_std=0.1, **settings)
    lit = run_epochs(lit_loader, epochs)
    twin_loader = create_loader(shard_dir, lighting_std=0.0, **settings)
    unlit = run_epochs(twin_loader, epochs)
    positions = index_to_position(twin_loader)
    eigvals, eigvecs = np.asarray(shard_stats["eigvals"]), np.asarray(shard_stats["eigvecs"])
    std = np.asarray(shard_stats["std_rgb"])
    offsets, flips, alphas = [], [], []
    for epoch, ((lit_images, _, lit_index), (images, labels, index)) in enumerate(
        zip(lit, unlit, strict=True)
    ):
        np.testing.assert_array_equal(lit_index.numpy(), index.numpy())
        np.testing.assert_array_equal(labels.numpy(), index.numpy() % 3)
        drawn = draw_augmentation(seed, epoch, 96, lit_loader.spec)
        pixels = to_pixels(images, shard_dir, "channel")
        # the lighting offset, in 0..255 units: lit minus unlit twin, averaged over pixels
        offset = ((lit_images - images).numpy().mean(axis=(2, 3))) * std
        for sample, sample_offset, sample_index in zip(pixels, offset, index.tolist(), strict=True):
            x, y, flipped = recover_geometry(sample)
            position = positions[sample_index]
            assert (x, y, flipped) == (
                drawn.offset_x[position],
                drawn.offset_y[position],
                drawn.flip[position],
            )
            # alpha_k = (eigvector_k . offset) * 255 / eigval_k  (the lighting formula inverted)
            alpha = eigvecs.T @ sample_offset * 255.0 / eigvals
            np.testing.assert_allclose(alpha, drawn.alpha[position], atol=2e-3)
            offsets += [x, y]
            flips.append(flipped)
            alphas.append(alpha)
    offsets, alphas = np.asarray(offsets), np.asarray(alphas)
    assert offsets.min() == 0 and offsets.max() == 32
    counts = np.bincount(offsets, minlength=33)
    assert scipy_stats.chisquare(counts).pvalue > 0.001
    assert abs(offsets.mean() - 16) < 3 * np.sqrt((33**2 - 1) / 12 / len(offsets))
    assert abs(np.mean(flips) - 0.5) < 3 * 0.5 / np.sqrt(len(flips))
    assert abs(alphas.mean()) < 3 * 0.1 / np.sqrt(alphas.size)
    assert abs(alphas.std() - 0.1) < 0.1 * 3 / np.sqrt(2 * alphas.size)


# --- epoch semantics ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 3), (3, 2), (4, 4)])
def test_ranks_see_every_val_index_once_with_equal_steps(
    shard_dir, backend, world_size, batch_size
):
    seen, steps = [], set()
    for rank in range(world_size):
        loader = create_loader(
            shard_dir,
            "val",
            batch_size=batch_size,
            backend=backend,
            rank=rank,
            world_size=world_size,
            with_index=True,
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        steps.add(len(loader))
        seen += [index for _, _, indices in batches for index in indices.tolist()]
    assert len(steps) == 1
    assert sorted(seen) == list(range(13))


def test_two_ranks_train_epochs_exact_and_reshuffled(shard_dir):
    loaders = [
        create_loader(
            shard_dir, "train", batch_size=10, rank=rank, world_size=2, seed=3, with_index=True
        )
        for rank in range(2)
    ]
    orders = []
    for _ in range(2):
        indices = [run_epochs(loader, 1)[0][2].tolist() for loader in loaders]
        assert sorted(indices[0] + indices[1]) == list(range(96))
        orders.append(indices[0] + indices[1])
    assert orders[0] != orders[1]
    same_seed = create_loader(
        shard_dir, "train", batch_size=10, rank=0, world_size=2, seed=3, with_index=True
    )
    assert run_epochs(same_seed, 1)[0][2].tolist() == orders[0][:48]
    other_seed = create_loader(
        shard_dir, "train", batch_size=10, rank=0, world_size=2, seed=4, with_index=True
    )
    assert run_epochs(other_seed, 1)[0][2].tolist() != orders[0][:48]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_continues_exactly(shard_dir, backend):
    settings = {"batch_size": 16, "backend": backend, "seed": 2, "with_index": True}
    full = list(create_loader(shard_dir, "train", **settings))
    loader = create_loader(shard_dir, "train", **settings)
    for count, _ in enumerate(loader, start=1):
        if count == 2:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (0, 2)
    resumed = create_loader(shard_dir, "train", **settings)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # what a trainer loop does; must not lose the resume point
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for (images, labels, indices), (full_images, full_labels, full_indices) in zip(
        rest, full[2:], strict=True
    ):
        assert torch.equal(indices, full_indices) and torch.equal(labels, full_labels)
        assert torch.equal(images, full_images)
    assert resumed.state_dict()["epoch"] == 1
    # the abandoned epoch counts: the next iteration is epoch 1
    next(iter(loader))
    assert loader.epoch == 1 and loader.state_dict()["batches_consumed"] == 1
    with pytest.raises(UserError):
        create_loader(shard_dir, "train", **{**settings, "seed": 9}).load_state_dict(state)


def test_batches_stay_valid_while_held(shard_dir):
    """DALI outputs are handed over without a copy; held batches must never be overwritten."""
    loader = create_loader(shard_dir, "train", batch_size=8)
    held, copies = [], []
    for _ in range(2):
        for images, _labels in loader:
            held.append(images)
            copies.append(images.clone())
    for images, copy in zip(held, copies, strict=True):
        assert torch.equal(images, copy)


def heap_in_use_bytes() -> int:
    """Bytes the C heap has handed out and not got back (glibc ``mallinfo2``)."""

    class MallocInfo(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallocInfo
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_flat_across_epochs(shard_dir):
    """RSS swings by tens of MB as freed batches are reused; the heap in use is exact."""
    loader = create_loader(shard_dir, "train", batch_size=8)
    warmup_rss = []
    for _ in range(3):
        list(loader)
        warmup_rss.append(rss_bytes())
    heap_before = heap_in_use_bytes()
    rss = []
    for _ in range(5):
        next(iter(loader))  # an abandoned epoch too
        list(loader)
        rss.append(rss_bytes())
    assert heap_in_use_bytes() - heap_before < 4 * 2**20
    # A leak of whole pipelines or epochs would show here; a batch per epoch in the heap check.
    assert max(rss) - max(warmup_rss) < 96 * 2**20, (warmup_rss, rss)


def test_loaders_offer_what_the_trainer_needs(shard_dir):
    for backend in BACKENDS:
        loader = create_loader(shard_dir, "val", batch_size=4, backend=backend)
        assert isinstance(loader, Loader) and isinstance(loader, ResumableLoader)
        loader.close()
    assert not isinstance([], Loader)
    assert parse_device("gpu") is parse_device("cuda") is Device.CUDA
    assert parse_device("cpu") is Device.CPU


def test_bad_arguments_are_user_errors(shard_dir, tmp_path):
    with pytest.raises(UserError):
        create_loader(shard_dir, backend="tensorflow")
    with pytest.raises(UserError, match="choose from cpu, cuda"):
        create_loader(shard_dir, device="tpu")
    with pytest.raises(UserError):
        create_loader(shard_dir, split="train", ten_crop=True)
    with pytest.raises(UserError):
        create_loader(shard_dir, normalize="imagenet")
    with pytest.raises(UserError):
        create_loader(tmp_path / "missing")
    with pytest.raises(UserError):
        create_loader(shard_dir, split="test")
    with pytest.raises(UserError):
        create_loader(shard_dir, rank=2, world_size=2)


# --- commands -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_loader_json(shard_dir, backend):
    from alexpipe.commands.loader import bench_loader

    result = CliRunner().invoke(
        bench_loader,
        [
            "--shards",
            str(shard_dir),
            "--backend",
            backend,
            "--batches",
            "3",
            "--batch-size",
            "8",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["backend"] == backend and report["device"] == "cpu"
    assert report["batch_size"] == 8 and report["batches"] == 3 and report["img_per_s"] > 0


def test_preview_writes_a_grid_of_train_crops(shard_dir, tmp_path):
    from alexpipe.commands.loader import preview

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(preview, [str(shard_dir), "--out", str(out), "--count", "6"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.shape[0] >= 224 and pixels.shape[1] >= 3 * 224
    # the first tile is a crop of a coordinate image: red runs across 224 levels (or back)
    tile = pixels[:224, :224].astype(int)
    assert abs(tile[:, -1, 0].mean() - tile[:, 0, 0].mean()) > 200


# --- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("chroma", ["4:4:4", "4:2:0"])
@pytest.mark.parametrize(("split", "ten_crop"), [("train", False), ("val", False), ("val", True)])
def test_gpu_pipeline_equals_cpu_pipeline(request, chroma, split, ten_crop):
    """nvJPEG against libjpeg-turbo; 4:2:0 colour edges need the same chroma upsampling."""
    shard_dir = request.getfixturevalue("shard_dir" if chroma == "4:4:4" else "shard_dir_420")
    outputs = []
    for device in ("cpu", "cuda"):
        loader = create_loader(
            shard_dir,
            split,
            batch_size=8,
            device=device,
            ten_crop=ten_crop,
            with_index=True,
            draw_augmentation=pinned_draws,
        )
        images, labels, indices = run_epochs(loader, 1)[0]
        if device == "cuda":
            assert images.is_cuda and labels.is_cuda and indices.is_cuda
            assert images.dtype == torch.float32
        outputs.append((images.cpu(), indices.cpu()))
    assert torch.equal(outputs[0][1], outputs[1][1])
    difference = np.abs(
        to_pixels(outputs[0][0], shard_dir, "paper") - to_pixels(outputs[1][0], shard_dir, "paper")
    )
    # nvJPEG and libjpeg-turbo may round a few pixels differently; crops must still coincide.
    assert difference.mean() < 0.5 and difference.max() <= 2 * LEVELS


@pytest.mark.gpu
@needs_cuda
def test_gpu_memory_is_flat_across_epochs(shard_dir):
    loader = create_loader(shard_dir, "train", batch_size=16, device="gpu")  # the alias
    list(loader)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()  # device-wide: DALI has its own allocator
    for _ in range(5):
        list(loader)
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    assert free_before - free_after < 64 * 2**20
