"""The cluster scripts in tools/, run with DRY_RUN=1, and the README text that shows them.

Every command line in README.md (section "Run on a cluster") that starts ``srun``, ``torchrun`` or
``ray job submit`` must be exactly what the script invoked in the same
document prints, and every such invocation's output must be in the document.
SLURM is imitated the way ``sbatch`` would set it up: the job's environment
(nodes, GPUs, CPUs from the ``#SBATCH`` header and the command line), with no
``scontrol`` on the PATH, so the script parses the node list itself.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM_SCRIPT = ROOT / "tools" / "slurm_train.sbatch"
RAY_SCRIPT = ROOT / "tools" / "ray_build_job.sh"
CLUSTER_DOC = ROOT / "README.md"
BASH = shutil.which("bash")
# The job the document describes: "In job 4242 on nodes gpu[01-02]".
JOB_ID = "4242"
NODE_LIST = "gpu[01-02]"
RENDERED_PREFIXES = ("srun ", "torchrun ", "ray job submit ")


def run_script(script: Path, env: dict[str, str], tmp_path: Path, args=()):
    """Run ``script`` with DRY_RUN=1 and only ``env`` (plus an empty PATH: no scontrol)."""
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir(exist_ok=True)
    environment = {"PATH": str(empty_bin), "HOME": str(tmp_path), "DRY_RUN": "1", **env}
    return subprocess.run(
        [BASH, str(script), *args],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def rendered(script: Path, env: dict[str, str], tmp_path: Path) -> list[str]:
    result = run_script(script, env, tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def sbatch_header_defaults() -> dict[str, str]:
    """The ``#SBATCH --name=value`` options at the top of the SLURM script."""
    options = {}
    for line in SLURM_SCRIPT.read_text().splitlines():
        match = re.fullmatch(r"#SBATCH --([a-z-]+)=(\S+)", line.strip())
        if match:
            options[match.group(1)] = match.group(2)
    return options


def slurm_job_environment(sbatch_options: dict[str, str]) -> dict[str, str]:
    """What SLURM sets in a batch job's environment for these options."""
    return {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NODELIST": NODE_LIST,
        "SLURM_JOB_NUM_NODES": sbatch_options["nodes"],
        "SLURM_GPUS_ON_NODE": sbatch_options["gpus-per-node"],
        "SLURM_CPUS_PER_TASK": sbatch_options["cpus-per-task"],
    }


def code_block_commands(markdown: str) -> list[str]:
    """Logical lines (backslash continuations joined) of the bash code blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def invocation_output(command: str, tmp_path: Path) -> list[str] | None:
    """What a documented invocation of one of our scripts prints with DRY_RUN=1."""
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words:
        return None
    if words[0] == "sbatch":
        options = sbatch_header_defaults()
        for word in words[1:-1]:
            name, value = word.removeprefix("--").split("=", 1)
            options[name] = value
        env.update(slurm_job_environment(options))
        words = words[-1:]
    if words[0] == "bash":
        words = words[1:]
    script = {"tools/slurm_train.sbatch": SLURM_SCRIPT, "tools/ray_build_job.sh": RAY_SCRIPT}
    if words[0] not in script:
        return None
    return rendered(script[words[0]], env, tmp_path)


def test_documented_commands_are_what_the_scripts_render(tmp_path):
    commands = code_block_commands(CLUSTER_DOC.read_text())
    shown = [command for command in commands if command.startswith(RENDERED_PREFIXES)]
    produced = []
    for command in commands:
        output = invocation_output(command, tmp_path)
        if output is not None:
            produced += output
    assert len(produced) == 3  # the Ray job, the SLURM job, torchrun by hand
    assert sorted(shown) == sorted(produced)


def test_slurm_script_in_a_job_runs_one_torchrun_per_node(tmp_path):
    env = {
        "SHARDS": "pipe:curl -fsS https://host/shards/{file}",
        "OUT": str(tmp_path / "run"),
        "EPOCHS": "3",
        "CACHE_DIR": "/tmp/cache",
        "CACHE_SIZE": "20G",
        "EXTRA_ARGS": "--lr 0.02 --seed 1",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node[07-09,12]-ib,login1",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_GPUS_PER_NODE": "a100:4",
    }
    (lines,) = [rendered(SLURM_SCRIPT, env, tmp_path)]
    assert len(lines) == 1
    words = shlex.split(lines[0])
    assert words[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    torchrun = words[words.index("torchrun") :]
    assert torchrun[:7] == [
        "torchrun",
        "--nnodes=4",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node07-ib:29500",
        "--rdzv-id=77",
        "--no-python",
    ]
    assert torchrun[7:] == [
        "alexpipe",
        "train",
        "--shards",
        "pipe:curl -fsS https://host/shards/{file}",
        "--out",
        str(tmp_path / "run"),
        "--parallel",
        "ddp",
        "--epochs",
        "3",
        "--batch-size",
        "128",
        "--backend",
        "dali",
        "--device",
        "cuda",
        "--cache-dir",
        "/tmp/cache",
        "--cache-size",
        "20G",
        "--lr",
        "0.02",
        "--seed",
        "1",
    ]


@pytest.mark.parametrize(
    ("node_list", "head"),
    [("gpu[03-05,09]", "gpu03"), ("a7,b8", "a7"), ("single", "single"), ("n[1-2]x,m", "n1x")],
)
def test_head_node_without_scontrol(tmp_path, node_list, head):
    env = {"SHARDS": "/s", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": node_list}
    (line,) = rendered(SLURM_SCRIPT, env, tmp_path)
    assert f"--rdzv-endpoint={head}:29500" in shlex.split(line)
    (line,) = rendered(SLURM_SCRIPT, {**env, "HEAD_NODE": "override", "RDZV_PORT": "3"}, tmp_path)
    assert "--rdzv-endpoint=override:3" in shlex.split(line)


def test_slurm_script_resumes_a_requeued_run_and_checks_its_input(tmp_path):
    out = tmp_path / "run"
    env = {"SHARDS": "/s", "OUT": str(out), "HEAD_NODE": "h"}
    (line,) = rendered(SLURM_SCRIPT, env, tmp_path)
    assert "--resume" not in shlex.split(line)
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    (line,) = rendered(SLURM_SCRIPT, env, tmp_path)
    assert shlex.split(line)[-1] == "--resume"
    (line,) = rendered(SLURM_SCRIPT, {**env, "RESUME": "0"}, tmp_path)
    assert "--resume" not in shlex.split(line)

    result = run_script(SLURM_SCRIPT, {"HEAD_NODE": "h"}, tmp_path)
    assert result.returncode == 1 and "set SHARDS" in result.stderr
    result = run_script(SLURM_SCRIPT, {"SHARDS": "/s"}, tmp_path)
    assert result.returncode == 1 and "set HEAD_NODE" in result.stderr


def test_ray_job_script(tmp_path):
    env = {
        "SRC": "/shared/in put",
        "OUT": "/shared/out",
        "RAY_ADDRESS": "http://h:8265",
        "SUBMISSION_ID": "build-1",
        "NO_WAIT": "1",
        "EXTRA_ARGS": "--layout tars",
        "RUNTIME_ENV_JSON": '{"excludes": [".git"]}',
    }
    (line,) = rendered(RAY_SCRIPT, env, tmp_path)
    assert shlex.split(line) == [
        "ray",
        "job",
        "submit",
        "--address",
        "http://h:8265",
        "--working-dir",
        ".",
        "--submission-id",
        "build-1",
        "--runtime-env-json",
        '{"excludes": [".git"]}',
        "--no-wait",
        "--",
        "alexpipe",
        "build-shards",
        "--address",
        "auto",
        "--src",
        "/shared/in put",
        "--out",
        "/shared/out",
        "--layout",
        "tars",
    ]
    relative = run_script(RAY_SCRIPT, {"SRC": "imagenet", "OUT": "/o"}, tmp_path)
    assert relative.returncode == 1 and "absolute paths" in relative.stderr
    missing = run_script(RAY_SCRIPT, {"SRC": "/i"}, tmp_path)
    assert missing.returncode == 1 and "set SRC" in missing.stderr


def test_ray_job_script_checks_the_token_without_showing_it(tmp_path):
    env = {"SRC": "/i", "OUT": "/o", "RAY_AUTH_MODE": "token"}
    no_token = run_script(RAY_SCRIPT, env, tmp_path)
    assert no_token.returncode == 1 and "no token" in no_token.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-token\n")
    for extra in ({"RAY_AUTH_TOKEN_PATH": str(token_file)}, {"RAY_AUTH_TOKEN": "s3cr3t-token"}):
        result = run_script(RAY_SCRIPT, {**env, **extra}, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "s3cr3t" not in result.stdout + result.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("s3cr3t-token\n")  # HOME is tmp_path
    assert run_script(RAY_SCRIPT, env, tmp_path).returncode == 0
    empty = run_script(RAY_SCRIPT, {**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, tmp_path)
    assert empty.returncode == 1 and "RAY_AUTH_TOKEN_PATH" in empty.stderr


def test_scripts_parse_as_bash():
    for script in (SLURM_SCRIPT, RAY_SCRIPT):
        assert subprocess.run([BASH, "-n", str(script)], capture_output=True).returncode == 0
