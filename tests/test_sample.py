"""`alexpipe sample`: the three layouts are parsed the way the real ImageNet
files are (tarfile, scipy.io.loadmat, csv), and checked for determinism,
image properties, odd files and a learnable class signal."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import struct
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image, ImageOps

from alexpipe.commands.sample import sample as sample_command
from alexpipe.sample import (
    ODD_KINDS,
    REJECTED_KINDS,
    SampleConfig,
    check_sample,
    plan_sample,
    write_sample,
)
from alexpipe.sample.layouts import item_bytes
from shards.errors import UserError

SMALL = dict(classes=4, train_per_class=6, val_per_class=4, odd_files=True, seed=3)
SCALE = 0.25
LAYOUTS = ("folder", "tars", "kaggle")
WNID = re.compile(r"^n\d{8}$")
DEVKIT = "ILSVRC2012_devkit_t12/data/"


def small_config(out: Path, layout: str) -> SampleConfig:
    return SampleConfig(out=out, layout=layout, image_scale=SCALE, **SMALL)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """One small sample per layout (with odd files), written once."""
    root = tmp_path_factory.mktemp("samples")
    return {layout: write_sample(small_config(root / layout, layout)) for layout in LAYOUTS}


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def train_tar_contents(root: Path) -> tuple[list[str], dict[str, list[str]], dict[str, bytes]]:
    """Outer member names, inner member names per class tar, and key -> bytes."""
    inner_names, images = {}, {}
    with tarfile.open(root / "ILSVRC2012_img_train.tar") as outer:
        outer_names = outer.getnames()
        for member in outer.getmembers():
            assert member.isfile() and member.mtime == outer.getmembers()[0].mtime
            assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
            inner_tar = tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read()))
            with inner_tar as inner:
                inner_names[member.name] = inner.getnames()
                for name in inner.getnames():
                    images[name.removesuffix(".JPEG")] = inner.extractfile(name).read()
    return outer_names, inner_names, images


def read_devkit(root: Path) -> tuple[np.ndarray, list[int]]:
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz") as archive:
        meta_mat = archive.extractfile(DEVKIT + "meta.mat").read()
        truth = archive.extractfile(DEVKIT + "ILSVRC2012_validation_ground_truth.txt").read()
    synsets = scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    return synsets, [int(line) for line in truth.decode().splitlines()]


def expected_train(summary) -> dict[str, list[str]]:
    by_class: dict[str, list[str]] = {}
    for item in summary.items:
        if item.split == "train":
            by_class.setdefault(item.wnid, []).append(item.filename)
    return by_class


def test_plan_counts_keys_and_interleaved_val(samples):
    summary = samples["folder"]
    wnids = [c.wnid for c in summary.classes]
    assert wnids == sorted(wnids) and all(WNID.match(w) for w in wnids)
    assert [c.label for c in summary.classes] == list(range(SMALL["classes"]))
    normal = [item for item in summary.items if item.kind == "normal"]
    per_class = Counter((item.split, item.wnid) for item in normal)
    assert set(per_class.values()) == {6, 4} and len(per_class) == 8
    assert summary.counts == {"train": 24 + len(ODD_KINDS), "val": 16 + 2}
    val_numbers = [(int(item.key[-8:]), item.label) for item in normal if item.split == "val"]
    assert sorted(number for number, _ in val_numbers) == list(range(1, 17))
    labels_in_name_order = [label for _, label in sorted(val_numbers)]
    assert labels_in_name_order != sorted(labels_in_name_order)  # classes interleaved
    keys = [item.key for item in summary.items]
    assert len(set(keys)) == len(keys)


def test_folder_layout_is_imagefolder(samples):
    summary = samples["folder"]
    on_disk = {str(path.relative_to(summary.out)) for path in summary.out.rglob("*.JPEG")}
    expected = {f"{item.split}/{item.wnid}/{item.filename}" for item in summary.items}
    assert on_disk == expected
    assert {p.name for p in summary.out.iterdir()} == {"train", "val"}


def test_train_tar_is_a_tar_of_class_tars(samples):
    summary = samples["tars"]
    assert sorted(p.name for p in summary.out.iterdir()) == [
        "ILSVRC2012_devkit_t12.tar.gz",
        "ILSVRC2012_img_train.tar",
        "ILSVRC2012_img_val.tar",
    ]
    outer_names, inner_names, _ = train_tar_contents(summary.out)
    expected = expected_train(summary)
    assert sorted(outer_names) == sorted(f"{wnid}.tar" for wnid in expected)
    for wnid, filenames in expected.items():
        assert sorted(inner_names[f"{wnid}.tar"]) == sorted(filenames)
    # Readers must sort: neither the class tars nor their members come sorted.
    assert outer_names != sorted(outer_names)
    assert any(names != sorted(names) for names in inner_names.values())


def test_val_tar_is_flat_and_not_in_name_order(samples):
    summary = samples["tars"]
    with tarfile.open(summary.out / "ILSVRC2012_img_val.tar") as archive:
        names = archive.getnames()
        assert all(member.isfile() for member in archive.getmembers())
    assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", name) for name in names)
    assert sorted(names) == sorted(item.filename for item in summary.items if item.split == "val")
    assert names != sorted(names)


def test_meta_mat_has_the_real_structure(samples):
    summary = samples["tars"]
    synsets, _ = read_devkit(summary.out)
    assert synsets.dtype.names == (
        "ILSVRC2012_ID", "WNID", "words", "gloss",
        "num_children", "children", "wordnet_height", "num_train_images",
    )  # fmt: skip
    leaves = [s for s in synsets if s["num_children"] == 0]
    parents = [s for s in synsets if s["num_children"] > 0]
    assert sorted(int(s["ILSVRC2012_ID"]) for s in leaves) == list(range(1, 5))
    assert parents and all(int(s["ILSVRC2012_ID"]) > 4 for s in parents)
    for parent in parents:
        assert np.atleast_1d(parent["children"]).size == parent["num_children"]
    assert sorted(str(s["WNID"]) for s in leaves) == [c.wnid for c in summary.classes]
    assert all(WNID.match(str(s["WNID"])) for s in synsets)
    # IDs are not the sorted-wnid order: a reader must map through meta.mat.
    ids_in_wnid_order = [int(s["ILSVRC2012_ID"]) for s in sorted(leaves, key=lambda s: s["WNID"])]
    assert ids_in_wnid_order != [1, 2, 3, 4]
    train_counts = Counter(item.wnid for item in summary.items if item.split == "train")
    assert {str(s["WNID"]): int(s["num_train_images"]) for s in leaves} == train_counts


def test_ground_truth_maps_each_val_image_to_its_wnid(samples):
    """As torchvision's parse_devkit_archive does: leaves by num_children,
    ID -> WNID, then line i belongs to the i-th val file in sorted order."""
    summary = samples["tars"]
    synsets, truth = read_devkit(summary.out)
    wnid_of_id = {
        int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if s["num_children"] == 0
    }
    with tarfile.open(summary.out / "ILSVRC2012_img_val.tar") as archive:
        val_names = sorted(archive.getnames())
    assert len(truth) == len(val_names)
    parsed = {
        name.removesuffix(".JPEG"): wnid_of_id[id_]
        for name, id_ in zip(val_names, truth, strict=True)
    }
    assert parsed == {item.key: item.wnid for item in summary.items if item.split == "val"}


def test_kaggle_layout_mapping_and_solution(samples):
    summary = samples["kaggle"]
    data = summary.out / "ILSVRC/Data/CLS-LOC"
    train_files = {str(p.relative_to(data / "train")) for p in (data / "train").rglob("*.JPEG")}
    expected = {f"{w}/{name}" for w, names in expected_train(summary).items() for name in names}
    assert train_files == expected
    val_dir = data / "val"
    assert all(path.is_file() for path in val_dir.iterdir())  # flat
    val = {item.key: item for item in summary.items if item.split == "val"}
    assert sorted(p.stem for p in val_dir.iterdir()) == sorted(val)

    lines = (summary.out / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == [c.wnid for c in summary.classes]
    assert [line.split(" ", 1)[1] for line in lines] == [c.words for c in summary.classes]

    with open(summary.out / "LOC_val_solution.csv", newline="") as stream:
        reader = csv.reader(stream)
        assert next(reader) == ["ImageId", "PredictionString"]
        rows = list(reader)
    image_ids = [image_id for image_id, _ in rows]
    assert sorted(image_ids) == sorted(val) and image_ids != sorted(image_ids)
    for image_id, prediction in rows:
        tokens = prediction.split()
        assert tokens[0] == val[image_id].wnid and len(tokens) % 5 == 0
        width, height = val[image_id].spec.width, val[image_id].spec.height
        for box in range(0, len(tokens), 5):
            assert tokens[box] == tokens[0]
            x0, y0, x1, y1 = map(int, tokens[box + 1 : box + 5])
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def layout_images(summary) -> dict[tuple[str, str], bytes]:
    """(split, key) -> stored bytes, read back from any layout."""
    root = summary.out
    if summary.layout == "folder":
        return {
            (path.parts[-3], path.stem): path.read_bytes()
            for path in (root / split for split in ("train", "val"))
            for path in path.rglob("*.JPEG")
        }
    if summary.layout == "kaggle":
        data = root / "ILSVRC/Data/CLS-LOC"
        train = {("train", p.stem): p.read_bytes() for p in (data / "train").rglob("*.JPEG")}
        return train | {("val", p.stem): p.read_bytes() for p in (data / "val").iterdir()}
    _, _, train = train_tar_contents(root)
    val = tar_members(root / "ILSVRC2012_img_val.tar")
    return {("train", k): v for k, v in train.items()} | {
        ("val", name.removesuffix(".JPEG")): data for name, data in val.items()
    }


def test_same_image_bytes_in_every_layout(samples):
    images = {layout: layout_images(samples[layout]) for layout in LAYOUTS}
    expected_keys = {(item.split, item.key) for item in samples["folder"].items}
    assert set(images["folder"]) == expected_keys
    assert images["folder"] == images["tars"] == images["kaggle"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_config_gives_identical_files(samples, tmp_path, layout):
    again = write_sample(small_config(tmp_path / layout, layout))
    first = tree_hashes(samples[layout].out)
    assert tree_hashes(again.out) == first and len(first) >= 3
    assert again.items == samples[layout].items


def test_the_checked_plan_writes_the_same_files(samples, tmp_path):
    config = small_config(tmp_path / "checked", "tars")
    plan = check_sample(config)
    assert plan == plan_sample(config) and len(plan.items) == len(samples["tars"].items)
    written = write_sample(config, plan=plan)
    assert tree_hashes(written.out) == tree_hashes(samples["tars"].out)
    with pytest.raises(ValueError, match="another config"):
        write_sample(small_config(tmp_path / "other", "folder"), plan=plan)


def test_other_seed_gives_other_images(samples, tmp_path):
    other = write_sample(replace(small_config(tmp_path / "other", "folder"), seed=4))
    assert {c.wnid for c in other.classes} != {c.wnid for c in samples["folder"].classes}


def test_images_decode_with_planned_size_and_mode(samples):
    summary = samples["folder"]
    grayscale = 0
    for item in summary.items:
        if item.kind != "normal":
            continue
        with Image.open(summary.out / item.split / item.wnid / item.filename) as image:
            assert image.format == "JPEG" and not image.info.get("progressive")
            assert (image.size, image.mode) == (item.size, item.mode)
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        grayscale += item.mode == "L"
        assert pixels.std() > 8  # not a flat colour
        assert round(150 * SCALE) <= min(image.size) <= round(1200 * SCALE)
        assert 0.74 <= image.width / image.height <= 2.01
    assert grayscale == SMALL["classes"]  # every class's 6th train image


def test_full_scale_sizes_aspects_and_qualities_are_realistic():
    plan = plan_sample(SampleConfig(out=Path("unused"), classes=10))
    shorter = [min(item.size) for item in plan.items]
    aspects = {round(item.spec.width / item.spec.height, 2) for item in plan.items}
    qualities = [item.spec.quality for item in plan.items]
    assert 150 <= min(shorter) < 250 and 500 < max(shorter) <= 1200
    assert 250 <= np.median(shorter) <= 500
    assert {0.75, 1.0, 1.33, 1.5, 2.0} <= aspects  # incl. portrait 3:4
    assert 70 <= min(qualities) < 75 and 90 < max(qualities) <= 95
    assert sum(item.mode == "L" for item in plan.items) == 10 * (2 + 1)  # 6% like "a few"


def test_odd_files_have_their_properties(samples):
    summary = samples["folder"]
    assert sorted(summary.odd_files.values()) == sorted([*ODD_KINDS, "cmyk-jpeg", "png-as-jpeg"])
    by_kind = {}
    for item in summary.items:
        if item.kind != "normal":
            by_kind.setdefault(item.kind, item)
            path = summary.out / item.split / item.wnid / item.filename
            assert path.suffix == ".JPEG"
    data = {kind: item_bytes(item) for kind, item in by_kind.items()}
    opened = {kind: Image.open(io.BytesIO(raw)) for kind, raw in data.items() if raw}
    for kind, item in by_kind.items():
        if kind in opened:
            assert (opened[kind].mode, opened[kind].size) == (ODD_KINDS[kind], item.size), kind

    assert opened["cmyk-jpeg"].format == "JPEG" and opened["cmyk-jpeg"].mode == "CMYK"
    for kind in ("png-as-jpeg", "palette-png", "rgba-png", "16bit-png"):
        assert data[kind][:8] == b"\x89PNG\r\n\x1a\n", kind
    bit_depth = struct.unpack(">B", data["16bit-png"][24:25])[0]  # IHDR bit depth
    assert bit_depth == 16 and opened["16bit-png"].mode == "I;16"
    assert opened["grayscale-jpeg"].mode == "L"
    assert opened["progressive-jpeg"].info.get("progressive")

    rotated = opened["exif-rotated-jpeg"]
    assert rotated.getexif()[0x0112] == 6
    upright = ImageOps.exif_transpose(rotated)
    spec = by_kind["exif-rotated-jpeg"].spec
    assert upright.size == (spec.width, spec.height) != rotated.size

    truncated = opened["truncated-jpeg"]
    with pytest.raises(OSError):
        truncated.load()
    assert data["zero-bytes"] == b""
    assert REJECTED_KINDS == {"truncated-jpeg", "zero-bytes"}


def test_odd_files_leave_other_images_unchanged():
    plain = plan_sample(SampleConfig(out=Path("unused"), **{**SMALL, "odd_files": False}))
    with_odd = plan_sample(SampleConfig(out=Path("unused"), **SMALL))
    assert set(plain.items) < set(with_odd.items)
    assert len(with_odd.items) - len(plain.items) == len(ODD_KINDS) + 2


def crop_features(data: bytes, rng: np.random.Generator) -> np.ndarray:
    """Chromaticity (r, g, b over their sum) of a random 224 crop of the image
    resized to shorter side 256, as the shards and the trainer see it."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize(
        (max(256, round(image.width * scale)), max(256, round(image.height * scale)))
    )
    left = int(rng.integers(0, image.width - 224 + 1))
    top = int(rng.integers(0, image.height - 224 + 1))
    crop = image.crop((left, top, left + 224, top + 224))
    mean_colour = np.asarray(crop, dtype=np.float32).mean(axis=(0, 1))
    return mean_colour / mean_colour.sum()


def test_classes_are_learnable_after_resize_and_crop():
    """A nearest-centroid classifier on crop colours, fitted on train, beats
    chance (0.1) by far on val: the class signature survives resize + crop."""
    config = SampleConfig(
        out=Path("unused"), classes=10, train_per_class=8, val_per_class=4, image_scale=0.3
    )
    plan = plan_sample(config)
    rng = np.random.default_rng(0)
    features = {item.key: crop_features(item_bytes(item), rng) for item in plan.items}
    train = [item for item in plan.items if item.split == "train"]
    centroids = np.stack(
        [
            np.mean([features[i.key] for i in train if i.label == label], axis=0)
            for label in range(10)
        ]
    )
    val = [item for item in plan.items if item.split == "val"]
    predicted = [int(np.argmin(((centroids - features[i.key]) ** 2).sum(1))) for i in val]
    accuracy = np.mean([p == item.label for p, item in zip(predicted, val, strict=True)])
    assert accuracy >= 0.7, accuracy


def test_cli_writes_sample_and_prints_summary(tmp_path):
    out = tmp_path / "cli"
    arguments = ["--out", str(out), "--layout", "tars", "--classes", "2", "--train-per-class",
                 "3", "--val-per-class", "2", "--seed", "1", "--image-scale", "0.2"]  # fmt: skip
    result = CliRunner().invoke(sample_command, arguments)
    assert result.exit_code == 0, result.output
    assert "wrote 6 train + 4 val images of 2 classes as tars layout" in result.output
    assert (out / "ILSVRC2012_img_train.tar").is_file()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--layout", "zip"], "unknown layout"),
        (["--classes", "0"], "--classes must be between"),
        (["--train-per-class", "-1"], "--train-per-class must be between"),
        (["--seed", "-5"], "--seed must be >= 0"),
    ],
)
def test_cli_bad_input_raises_user_error(tmp_path, arguments, message):
    result = CliRunner().invoke(sample_command, ["--out", str(tmp_path / "x"), *arguments])
    assert isinstance(result.exception, UserError) and message in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_out(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        write_sample(SampleConfig(out=tmp_path, classes=1, train_per_class=1, val_per_class=1))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        write_sample(SampleConfig(out=tmp_path / "file"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old.txt"]
