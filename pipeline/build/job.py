"""`alexpipe build-shards`: raw ILSVRC in, WebDataset shards + statistics out.

The job in four steps, each in its own module:
1. list the inputs (``sources``) and fix the plan (``plan``) — pure;
2. skip shards a previous run finished (their records in ``_work/``);
3. run one task per remaining shard (``shard_task.run_shard``) on Ray
   (``scheduler``; a private instance or a cluster, ``ray_runtime``);
4. merge and write stats, rejections and the manifest last (``finish``).
Same input and settings give byte-identical output, whatever the number of
workers or nodes and however often the job was killed and rerun.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.build.config import LAYOUTS, RESIZE_MODES, SPLITS, BuildConfig
from pipeline.build.finish import SplitSummary, write_outputs
from pipeline.build.plan import ShardPlan, plan_build
from pipeline.build.ray_runtime import check_cluster_address, is_local, ray_session
from pipeline.build.scheduler import run_shards
from pipeline.build.shard_task import load_finished_record, work_dir
from shards.atomic import dumps_json, remove_temporaries, write_text_atomic
from shards.errors import UserError
from shards.manifest import MANIFEST_NAME, ClassInfo, Manifest
from shards.remote import read_manifest

SETTINGS_NAME = "settings.json"


@dataclass(frozen=True)
class BuildSummary:
    """What a build did, for the closing report and the benchmarks."""

    out: Path
    splits: dict[str, SplitSummary]
    num_shards: int
    shards_skipped: int
    images_processed: int
    wall_seconds: float
    peak_worker_rss_mb: float
    already_complete: bool = False
    ray_nodes_used: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.wall_seconds if self.wall_seconds else 0.0

    def over_rejection_limit(self, max_rejected: float) -> list[str]:
        """One message per split whose rejected share exceeds the limit."""
        return [
            f"{split}: {summary.num_rejected} of {summary.num_inputs} inputs rejected "
            f"({summary.rejected_fraction:.2%}), more than --max-rejected {max_rejected:g}; "
            f"see {self.out / 'rejected.jsonl'}"
            for split, summary in self.splits.items()
            if summary.rejected_fraction > max_rejected
        ]


def validate(config: BuildConfig) -> None:
    """Reject impossible settings with one clear line each."""
    if config.layout not in LAYOUTS:
        raise UserError(f"unknown layout {config.layout!r}; choose one of {', '.join(LAYOUTS)}")
    if config.resize not in RESIZE_MODES:
        raise UserError(f"unknown --resize {config.resize!r}; choose {' or '.join(RESIZE_MODES)}")
    unknown = [split for split in config.splits if split not in SPLITS]
    if unknown or not config.splits:
        raise UserError(f"--splits takes a comma list of {', '.join(SPLITS)}, not {unknown}")
    if not 16 <= config.size <= 4096:
        raise UserError(f"--size must be between 16 and 4096, not {config.size}")
    if not 1 <= config.quality <= 100:
        raise UserError(f"--quality must be between 1 and 100, not {config.quality}")
    if config.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {config.shard_size}")
    if config.workers is not None and config.workers < 1:
        raise UserError(f"--workers must be at least 1, not {config.workers}")
    if not 0 <= config.max_rejected <= 1:
        raise UserError(f"--max-rejected is a fraction in [0, 1], not {config.max_rejected}")
    if config.out.exists() and not config.out.is_dir():
        raise UserError(f"--out {config.out} exists and is not a directory")


def _run_identity(config: BuildConfig) -> dict:
    """What, besides the settings, decides the output bytes of a run in progress:
    the input tree and the image codec. Recorded in ``_work/`` so that a rerun
    with another --src or after a Pillow or simplejpeg upgrade (simplejpeg brings its
    own libjpeg-turbo, which decodes plain JPEGs and the stored ones) cannot mix old
    and new shards."""
    import PIL
    import simplejpeg
    from PIL import features

    return {
        "src": str(config.src.resolve()),
        "pil": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "simplejpeg": simplejpeg.__version__,
    }


def _require_same(out_dir: Path, recorded: dict, wanted: dict) -> None:
    if recorded != wanted:
        raise UserError(
            f"{out_dir} holds a build with other settings ({_difference(recorded, wanted)}); "
            "rerun with the same arguments or choose another --out"
        )


def _claim_output(out_dir: Path, settings: dict, identity: dict) -> Manifest | None:
    """Make ``out_dir`` ours for these settings; its manifest if it is already complete.

    A directory holding a build with other settings (or, mid-build, other
    inputs or codec) is refused rather than mixed: resuming only makes sense
    with the same arguments.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST_NAME).is_file():
        manifest = read_manifest(out_dir)  # one-line errors for damaged or foreign files
        _require_same(out_dir, manifest.config, settings)
        return manifest
    recorded_path = work_dir(out_dir) / SETTINGS_NAME
    wanted = {**settings, **identity}
    if recorded_path.is_file():
        try:
            recorded = json.loads(recorded_path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(
                f"{recorded_path} is unreadable ({error}); remove {out_dir} and build again"
            ) from None
        _require_same(out_dir, recorded, wanted)
    elif any(out_dir.glob("*.tar")):
        raise UserError(f"{out_dir} already holds shards that this build did not write")
    work_dir(out_dir).mkdir(exist_ok=True)
    write_text_atomic(recorded_path, dumps_json(wanted))
    return None


def _difference(recorded: dict, wanted: dict) -> str:
    keys = sorted(set(recorded) | set(wanted))
    changed = [
        f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}"
        for k in keys
        if recorded.get(k) != wanted.get(k)
    ]
    return "; ".join(changed)


def build_shards(config: BuildConfig) -> BuildSummary:
    """Run the whole build (or finish an interrupted one); see the module docstring.

    A full disk or an unwritable --out ends the build with one line
    (:func:`output_error`); what was finished is kept for the rerun, and
    nothing partial is left under a final name (nor any temporary).
    """
    validate(config)
    if not is_local(config.address):
        check_cluster_address(config.address)
    try:
        return _build(config)
    except OSError as error:
        problem = output_error(error, config.out)
        if problem is None:
            raise
        _remove_temporaries_quietly(config.out)
        raise problem from error


def _build(config: BuildConfig) -> BuildSummary:
    from pipeline.build.sources import discover, resolve_layout

    started = time.perf_counter()
    layout = resolve_layout(config.src, config.layout)
    settings = config.output_settings(layout)
    out_dir = config.out
    complete = _claim_output(out_dir, settings, _run_identity(config))
    if complete is not None:
        return _summary_of_complete(out_dir, complete, started)
    # Ray first: a cluster that refuses us says so before minutes of listing.
    with ray_session(config.address, config.workers) as cpus:
        listing = discover(config.src, layout, config.splits)
        remove_temporaries(out_dir)
        remove_temporaries(work_dir(out_dir))
        plans = plan_build(listing.items, config.shard_size, config.seed)
        transform_config = config.transform_config()
        records = {}
        remaining = []
        for plan in plans:
            record = load_finished_record(out_dir, plan, transform_config)
            if record is None:
                remaining.append(plan)
            else:
                records[plan.name] = record
        total_images = sum(len(plan.samples) for plan in remaining)
        if remaining:
            with _progress_bar(total_images, config.progress) as progress:

                def finished(plan: ShardPlan, record: dict) -> None:
                    records[plan.name] = record
                    progress.update(len(plan.samples))

                run_shards(remaining, transform_config, out_dir, cpus, finished)
    classes = tuple(
        ClassInfo(index, wnid, listing.class_names.get(wnid, ""))
        for index, wnid in enumerate(listing.classes)
    )
    summaries = write_outputs(
        out_dir, settings, classes, list(config.splits), plans, records, list(listing.rejected)
    )
    shutil.rmtree(work_dir(out_dir), ignore_errors=True)
    return BuildSummary(
        out=out_dir,
        splits=summaries,
        num_shards=sum(1 for plan in plans if records[plan.name]["shard"]),
        shards_skipped=len(plans) - len(remaining),
        images_processed=total_images,
        wall_seconds=time.perf_counter() - started,
        peak_worker_rss_mb=max((r["peak_rss_mb"] for r in records.values()), default=0.0),
        ray_nodes_used=len({r.get("ran_in") for r in records.values()} - {None}),
    )


# errno values that mean "the output's filesystem cannot take this", with
# what the user can do about each.
FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


def output_error(error: OSError, out_dir: Path) -> UserError | None:
    """One line for an OSError that says the disk of --out is full or unwritable, else None.

    Only errors about paths under ``out_dir`` (or without a path, as a worker's
    write can come back) are the output's; a full or read-only --src is not.
    """
    filename = error.filename
    out_dir = Path(out_dir)
    if filename is not None and not _is_under(Path(os.fsdecode(filename)), out_dir):
        return None
    if error.errno in FULL_DISK_ERRORS:
        return UserError(
            f"the disk is full: no space left on {_mount_point(out_dir)} for --out {out_dir}; "
            "free some space and rerun the same command (finished shards are kept)"
        )
    if error.errno in UNWRITABLE_ERRORS:
        reason = "read-only filesystem" if error.errno == errno.EROFS else "permission denied"
        return UserError(
            f"--out {out_dir} is not writable ({reason} on {_mount_point(out_dir)}); "
            "make it writable and rerun the same command, or choose another --out"
        )
    return None


def _is_under(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()  # as the tasks see it (resolved)
    return path == directory or directory in path.parents


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds (or would hold) ``path``."""
    path = path.absolute()
    while not path.exists() or (not os.path.ismount(path) and path.parent != path):
        path = path.parent
    return path


def _remove_temporaries_quietly(out_dir: Path) -> None:
    """Clear what failed writers left, when --out lets us; a read-only one holds none."""
    for directory in (out_dir, work_dir(out_dir)):
        try:
            remove_temporaries(directory)
        except OSError:
            pass


def _summary_of_complete(out_dir: Path, manifest: Manifest, started: float) -> BuildSummary:
    """The summary of a directory a previous run already completed."""
    splits = {
        name: SplitSummary(
            num_inputs=entry.num_samples + entry.num_rejected,
            num_samples=entry.num_samples,
            rejected_by_reason={"(see rejected.jsonl)": entry.num_rejected}
            if entry.num_rejected
            else {},
        )
        for name, entry in manifest.splits.items()
    }
    return BuildSummary(
        out=out_dir,
        splits=splits,
        num_shards=len(manifest.every_shard()),
        shards_skipped=len(manifest.every_shard()),
        images_processed=0,
        wall_seconds=time.perf_counter() - started,
        peak_worker_rss_mb=0.0,
        already_complete=True,
    )


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="build-shards",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )
