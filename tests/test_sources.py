"""Input listing: the three layouts, devkit/CSV labels, tar scanning and hostile members.

Every test builds its own tiny ImageNet look-alike in tmp_path: a few
"images" (distinct byte strings; the listing never decodes them), real tar
files (outer tar of inner ``<wnid>.tar``s), a real ``meta.mat`` written by
scipy with non-leaf synsets and IDs that are not in sorted-wnid order.
"""

from __future__ import annotations

import csv
import io
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipeline.build.devkit import parse_meta_mat, parse_val_solution
from pipeline.build.sources import discover, read_bytes
from pipeline.build.tarscan import TarMember, rejection_reason, scan_tar
from shards.errors import UserError

TRAIN_WNIDS = ["n01440764", "n01443537", "n02102040"]
# meta.mat: leaves with IDs deliberately NOT in sorted-wnid order, an extra
# leaf that has no train images, and two non-leaf synsets.
LEAVES = {1: "n02102040", 2: "n01440764", 3: "n09999999", 4: "n01443537"}
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish", "n02102040": "springer"}
TRAIN_PER_CLASS = 3
# Val image i (1-based) -> wnid; includes one image of a class without train images.
VAL_WNIDS = ["n02102040", "n01440764", "n01443537", "n01440764", "n09999999", "n02102040"]


def image_bytes(name: str) -> bytes:
    """Distinct, recognisable content per file (sizes differ too)."""
    return (f"<image {name}>" * (1 + len(name) % 5)).encode()


def train_files() -> dict[str, list[str]]:
    return {
        wnid: [f"{wnid}_{number}.JPEG" for number in (10026, 2, 777)[:TRAIN_PER_CLASS]]
        for wnid in TRAIN_WNIDS
    }


def val_files() -> list[str]:
    return [f"ILSVRC2012_val_{index:08d}.JPEG" for index in range(1, len(VAL_WNIDS) + 1)]


def meta_mat_bytes() -> bytes:
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [
        (ilsvrc_id, wnid, WORDS.get(wnid, "other"), "gloss", 0, np.zeros((1, 0)), 0, 3)
        for ilsvrc_id, wnid in LEAVES.items()
    ]
    rows += [
        (1001, "n00000001", "fish", "gloss", 2, np.array([[2.0, 4.0]]), 1, 0),
        (1002, "n00000002", "entity", "gloss", 1, np.array([[1001.0]]), 2, 0),
    ]
    records = np.zeros((len(rows), 1), dtype=[(name, "O") for name in fields])
    for index, row in enumerate(rows):
        for name, value in zip(fields, row, strict=True):
            records[index, 0][name] = (
                np.array([[float(value)]]) if isinstance(value, int) else value
            )
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": records})
    return buffer.getvalue()


def ground_truth_text() -> str:
    ids = {wnid: ilsvrc_id for ilsvrc_id, wnid in LEAVES.items()}
    return "".join(f"{ids[wnid]}\n" for wnid in VAL_WNIDS)


def tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def make_folder(root: Path) -> Path:
    for wnid, names in train_files().items():
        (root / "train" / wnid).mkdir(parents=True)
        for name in names:
            (root / "train" / wnid / name).write_bytes(image_bytes(name))
    for name, wnid in zip(val_files(), VAL_WNIDS, strict=True):
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "val" / wnid / name).write_bytes(image_bytes(name))
    return root


def make_tars(root: Path, extra_val_members=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        # Class tars in non-sorted order, as a tar need not be sorted.
        for wnid in reversed(TRAIN_WNIDS):
            inner = tar_bytes([(name, image_bytes(name)) for name in train_files()[wnid]])
            add_member(outer, f"{wnid}.tar", inner)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as archive:
        for name in reversed(val_files()):
            add_member(archive, name, image_bytes(name))
        for info, data in extra_val_members:
            archive.addfile(info, io.BytesIO(data) if data else None)
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        add_member(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat_bytes())
        add_member(
            devkit,
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            ground_truth_text().encode(),
        )
    return root


def make_kaggle(root: Path, shuffle_seed=0) -> Path:
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, names in train_files().items():
        (base / "train" / wnid).mkdir(parents=True)
        for name in names:
            (base / "train" / wnid / name).write_bytes(image_bytes(name))
    (base / "val").mkdir(parents=True)
    rows = []
    for name, wnid in zip(val_files(), VAL_WNIDS, strict=True):
        (base / "val" / name).write_bytes(image_bytes(name))
        rows.append([Path(name).stem, f"{wnid} 1 2 30 40 {wnid} 5 6 70 80"])
    random.Random(shuffle_seed).shuffle(rows)
    with open(root / "LOC_val_solution.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid} {WORDS[wnid]}\n" for wnid in TRAIN_WNIDS)
    )
    return root


def summary(listing, split):
    return [
        (item.split, item.key, item.wnid, item.label, read_bytes(item))
        for item in listing.items[split]
    ]


# -- the three layouts agree ---------------------------------------------------------


def test_all_layouts_give_the_same_listing_and_bytes(tmp_path):
    listings = {
        "folder": discover(make_folder(tmp_path / "folder")),
        "tars": discover(make_tars(tmp_path / "tars")),
        "kaggle": discover(make_kaggle(tmp_path / "kaggle")),
    }
    for layout, listing in listings.items():
        assert listing.layout == layout
        assert listing.classes == tuple(TRAIN_WNIDS)
    reference = listings["folder"]
    for split in ("train", "val"):
        expected = summary(reference, split)
        for layout in ("tars", "kaggle"):
            assert summary(listings[layout], split) == expected, (layout, split)

    train = summary(reference, "train")
    assert [row[1] for row in train] == sorted(row[1] for row in train)
    assert len(train) == len(TRAIN_WNIDS) * TRAIN_PER_CLASS
    for _, key, wnid, label, data in train:
        assert key.startswith(wnid) and label == TRAIN_WNIDS.index(wnid)
        assert data == image_bytes(key + ".JPEG")

    # Val labels go ID -> wnid -> sorted-wnid index; the n09999999 image is not a train class.
    val = summary(reference, "val")
    expected_val = [
        (f"ILSVRC2012_val_{index:08d}", wnid, TRAIN_WNIDS.index(wnid))
        for index, wnid in enumerate(VAL_WNIDS, start=1)
        if wnid in TRAIN_WNIDS
    ]
    assert [(key, wnid, label) for _, key, wnid, label, _ in val] == expected_val
    for listing in listings.values():
        rejected = [row for row in listing.rejected if row["split"] == "val"]
        assert len(rejected) == 1
        assert "ILSVRC2012_val_00000005" in rejected[0]["source"]
        assert rejected[0]["reason"].startswith("unknown class: n09999999")


def test_sources_and_locations_per_layout(tmp_path):
    tars = discover(make_tars(tmp_path / "tars"))
    first = tars.items["train"][0]
    assert first.source == "ILSVRC2012_img_train.tar:n01440764.tar/n01440764_10026.JPEG"
    path, offset, size = first.location
    assert path.endswith("ILSVRC2012_img_train.tar") and size == len(
        image_bytes(first.key + ".JPEG")
    )
    with open(path, "rb") as handle:
        handle.seek(offset)
        assert handle.read(size) == read_bytes(first)
    assert tars.items["val"][0].source == "ILSVRC2012_img_val.tar:ILSVRC2012_val_00000001.JPEG"
    assert tars.class_names["n01440764"] == "tench, Tinca tinca"

    folder = discover(make_folder(tmp_path / "folder"), layout="folder", splits=("train",))
    assert folder.items["train"][0].source == "train/n01440764/n01440764_10026.JPEG"
    assert "val" not in folder.items
    assert folder.class_names == dict.fromkeys(TRAIN_WNIDS, "")

    # Items travel to Ray workers by pickle.
    assert pickle.loads(pickle.dumps(tars.items["train"])) == tars.items["train"]
    assert pickle.loads(pickle.dumps(folder.items["train"])) == folder.items["train"]

    kaggle = discover(make_kaggle(tmp_path / "kaggle"))
    assert kaggle.items["val"][0].source == "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG"
    assert kaggle.class_names["n01443537"] == "goldfish"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kaggle_labels_do_not_depend_on_csv_row_order(tmp_path, seed):
    listing = discover(make_kaggle(tmp_path / "k", shuffle_seed=seed), splits=("val",))
    assert [item.wnid for item in listing.items["val"]] == [
        wnid for wnid in VAL_WNIDS if wnid in TRAIN_WNIDS
    ]


def test_kaggle_val_file_without_label_and_row_without_file(tmp_path):
    root = make_kaggle(tmp_path / "k")
    base = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    (base / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"extra")
    (base / "ILSVRC2012_val_00000001.JPEG").unlink()
    listing = discover(root, splits=("val",))
    reasons = {row["source"]: row["reason"] for row in listing.rejected}
    assert reasons["ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000099.JPEG"] == (
        "no label in LOC_val_solution.csv"
    )
    assert "ILSVRC2012_val_00000001" not in [item.key for item in listing.items["val"]]
    assert any("ILSVRC2012_val_00000001" in note for note in listing.notes)


def test_devkit_meta_keeps_leaves_only_and_maps_ids():
    synsets = parse_meta_mat(meta_mat_bytes())
    assert sorted(synsets) == [1, 2, 3, 4]
    assert {i: s.wnid for i, s in synsets.items()} == LEAVES
    assert synsets[2].words == "tench, Tinca tinca"


def test_val_solution_parser():
    text = "ImageId,PredictionString\nb,n2 1 2 3 4\na,n1 1 2 3 4 n1 5 6 7 8\n"
    assert parse_val_solution(text) == {"a": "n1", "b": "n2"}
    with pytest.raises(UserError, match="header"):
        parse_val_solution("id,label\na,n1\n")


def test_ground_truth_count_mismatch_is_a_user_error(tmp_path):
    root = make_tars(tmp_path / "t")
    extra = tarfile.TarInfo("ILSVRC2012_val_00000007.JPEG")
    extra.size = 3
    make_tars(tmp_path / "t2", extra_val_members=[(extra, b"abc")])
    with pytest.raises(UserError, match="7 images but the devkit ground truth has 6"):
        discover(tmp_path / "t2")
    assert len(discover(root).items["val"]) == 5


# -- hostile and broken tars ----------------------------------------------------------


def hostile_members():
    members = []
    for name, kind in [
        ("evil_link.JPEG", tarfile.SYMTYPE),
        ("hard_link.JPEG", tarfile.LNKTYPE),
        ("device.JPEG", tarfile.CHRTYPE),
        ("block.JPEG", tarfile.BLKTYPE),
        ("fifo.JPEG", tarfile.FIFOTYPE),
    ]:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        members.append((info, b""))
    for name in ["../escape.JPEG", "/abs.JPEG", "sub/../../up.JPEG"]:
        info = tarfile.TarInfo(name)
        info.size = 6
        members.append((info, b"SECRET"))
    folder = tarfile.TarInfo("a_directory")
    folder.type = tarfile.DIRTYPE
    members.append((folder, b""))
    return members


def test_hostile_val_members_are_rejected_and_never_read(tmp_path):
    root = make_tars(tmp_path / "t", extra_val_members=hostile_members())
    listing = discover(root)
    reasons = {row["source"]: row["reason"] for row in listing.rejected if row["split"] == "val"}
    prefix = "ILSVRC2012_img_val.tar:"
    assert reasons[prefix + "evil_link.JPEG"] == "unsafe tar member: symlink, not followed"
    assert reasons[prefix + "hard_link.JPEG"] == "unsafe tar member: hard link, not followed"
    assert reasons[prefix + "device.JPEG"] == "unsafe tar member: character device, not followed"
    assert reasons[prefix + "block.JPEG"] == "unsafe tar member: block device, not followed"
    assert reasons[prefix + "fifo.JPEG"] == "unsafe tar member: fifo, not followed"
    assert reasons[prefix + "../escape.JPEG"] == "unsafe tar member: '..' in path"
    assert reasons[prefix + "/abs.JPEG"] == "unsafe tar member: absolute path"
    assert reasons[prefix + "sub/../../up.JPEG"] == "unsafe tar member: '..' in path"
    assert not any("a_directory" in source for source in reasons)
    # The ground truth still lines up with the 6 real images (hostile ones are not counted).
    assert [item.wnid for item in listing.items["val"]] == [
        w for w in VAL_WNIDS if w != "n09999999"
    ]
    assert all(b"SECRET" not in read_bytes(item) for item in listing.items["val"])


def test_hostile_members_inside_a_class_tar(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as archive:
        add_member(archive, "n01440764_1.JPEG", b"good")
        for info, data in hostile_members():
            archive.addfile(info, io.BytesIO(data) if data else None)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        add_member(outer, "n01440764.tar", inner.getvalue())
        add_member(outer, "README.txt", b"not a class")
        link = tarfile.TarInfo("n09999999.tar")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc"
        outer.addfile(link)
    listing = discover(root, splits=("train",))
    assert listing.classes == ("n01440764",)
    assert [read_bytes(item) for item in listing.items["train"]] == [b"good"]
    reasons = {row["source"]: row["reason"] for row in listing.rejected}
    assert reasons["ILSVRC2012_img_train.tar:README.txt"].startswith("not a class tar")
    assert reasons["ILSVRC2012_img_train.tar:n09999999.tar"].startswith(
        "unsafe tar member: symlink"
    )
    assert reasons["ILSVRC2012_img_train.tar:n01440764.tar/../escape.JPEG"].endswith("'..' in path")
    assert len(reasons) == 2 + len(hostile_members()) - 1  # the directory is not an input


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_matches_tarfile_offsets_including_long_names(tmp_path, fmt):
    rng = random.Random(fmt)
    members = [("short.JPEG", b"x" * 700), ("empty.JPEG", b"")]
    members.append(("d" * 60 + "/" + "f" * 80 + ".JPEG", b"y" * 513))  # ustar prefix split
    if fmt != tarfile.USTAR_FORMAT:
        members.append(("g" * 150 + ".JPEG", b"z" * 1024))  # GNU longname / pax path
        members.append(("ünïcode.JPEG", b"u"))
    members += [(f"img_{index}.JPEG", rng.randbytes(rng.randrange(2000))) for index in range(20)]
    path = tmp_path / "a.tar"
    path.write_bytes(tar_bytes(members, fmt))
    scanned = list(scan_tar(path))
    with tarfile.open(path) as archive:
        expected = [(info.name, info.offset_data, info.size) for info in archive]
    assert [(m.name, m.offset, m.size) for m in scanned] == expected
    assert all(m.kind == "file" for m in scanned)
    data = path.read_bytes()
    for member, (_, content) in zip(scanned, members, strict=True):
        assert data[member.offset : member.offset + member.size] == content


def test_inner_tar_offsets_are_absolute_in_the_outer_file(tmp_path):
    inner = tar_bytes([("a.JPEG", b"first"), ("b.JPEG", b"second" * 200)])
    path = tmp_path / "outer.tar"
    path.write_bytes(tar_bytes([("pad.bin", b"p" * 1500), ("c.tar", inner)]))
    outer_members = list(scan_tar(path))
    class_tar = outer_members[1]
    members = list(scan_tar(path, class_tar.offset, class_tar.offset + class_tar.size))
    data = path.read_bytes()
    assert [data[m.offset : m.offset + m.size] for m in members] == [b"first", b"second" * 200]


def test_broken_tars_are_user_errors(tmp_path):
    good = tar_bytes([("a.JPEG", b"a" * 600), ("b.JPEG", b"b" * 600)])
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good[:1500])
    with pytest.raises(UserError, match="past the end"):
        list(scan_tar(truncated))
    # Cut exactly at a member boundary: only the missing end marker tells.
    truncated.write_bytes(good[:1536])
    with pytest.raises(UserError, match="without its end-of-archive marker"):
        list(scan_tar(truncated))
    corrupt = bytearray(good)
    corrupt[1536 + 10] ^= 0xFF  # second header's name: checksum no longer matches
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    with pytest.raises(UserError, match="bad checksum"):
        list(scan_tar(tmp_path / "corrupt.tar"))


def test_rejection_reason_of_plain_members():
    assert rejection_reason(TarMember("a/b.JPEG", "file", 512, 3)) is None
    assert rejection_reason(TarMember("a/..b.JPEG", "file", 512, 3)) is None
    assert rejection_reason(TarMember("", "file", 512, 3)) == "unsafe tar member: empty name"


# -- user errors and odd names -----------------------------------------------------------


def test_missing_or_unrecognised_src(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        discover(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"looked for .*ILSVRC2012_img_train.tar \(tars\)"):
        discover(tmp_path / "empty")
    with pytest.raises(UserError, match="unknown layout"):
        discover(tmp_path / "empty", layout="zip")
    root = make_folder(tmp_path / "both")
    (root / "ILSVRC2012_img_train.tar").write_bytes(b"")
    with pytest.raises(UserError, match="several layouts"):
        discover(root)
    assert discover(root, layout="folder").layout == "folder"


def test_missing_val_part_names_what_is_needed(tmp_path):
    root = make_tars(tmp_path / "t")
    (root / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    assert len(discover(root, splits=("train",)).items["train"]) == 9
    with pytest.raises(UserError, match="devkit"):
        discover(root)


def test_duplicate_keys_are_a_user_error(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "train" / "n01443537" / "n01440764_2.png").write_bytes(b"again")
    with pytest.raises(UserError, match="two inputs have the key 'n01440764_2'"):
        discover(root, splits=("train",))


def test_odd_names_in_folder_layout(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "train" / "n01440764" / "a.b.JPEG").write_bytes(b"dotted")
    (root / "train" / "n01440764" / ".DS_Store").write_bytes(b"hidden")
    (root / "train" / "loose.JPEG").write_bytes(b"loose")
    (root / "train" / "n01440764" / "nested").mkdir()
    (root / "train" / "n01440764" / "nested" / "deep_1.JPEG").write_bytes(b"deep")
    listing = discover(root, splits=("train",))
    reasons = {row["source"]: row["reason"] for row in listing.rejected}
    assert reasons == {
        "train/loose.JPEG": "not inside a <wnid>/ class folder",
        "train/n01440764/a.b.JPEG": "unsupported file name: key 'a.b'",
    }
    deep = [item for item in listing.items["train"] if item.key == "deep_1"]
    assert deep[0].wnid == "n01440764" and read_bytes(deep[0]) == b"deep"
