#!/usr/bin/env bash
# Submit `alexpipe build-shards` to a Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://HEAD:8265 SRC=/shared/imagenet OUT=/shared/shards tools/ray_build_job.sh
#
# `ray job submit --working-dir .` uploads this checkout (minus what .gitignore and
# .rayignore exclude) to the cluster; the job's driver runs on the head node and joins
# the cluster with `--address auto`, and every shard task runs wherever Ray has a free
# CPU. SRC and OUT are absolute paths on a filesystem every node sees (the job runs in a
# temporary copy of the working directory, so a relative OUT would vanish with it).
# The output is byte-identical to a build on one machine.
#
# Token authentication (Ray >= 2.52): if the cluster was started with RAY_AUTH_MODE=token,
# export RAY_AUTH_MODE=token here too and provide the cluster's token through RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH (a file) or ~/.ray/auth_token, checked in that order
# (https://docs.ray.io/en/latest/ray-security/token-auth.html).
#
# Settings (environment):
#   SRC, OUT        raw ILSVRC and the shard directory, absolute shared paths   (required)
#   RAY_ADDRESS     the cluster's job server                 (default: http://127.0.0.1:8265)
#   WORKING_DIR     what to upload (default: .)     SUBMISSION_ID   a job id of your choice
#   EXTRA_ARGS      more build-shards options, e.g. "--shard-size 1000 --layout tars"
#   NO_WAIT=1       submit and return instead of following the job's log
#   RUNTIME_ENV_JSON  extra runtime_env, e.g. '{"excludes": [".git"]}'
#   ALEXPIPE (alexpipe; e.g. "python -m alexpipe.cli")  RAY (ray): the commands to run
#   DRY_RUN=1       print the command instead of running it

set -euo pipefail

die() {
    echo "ray_build_job: $*" >&2
    exit 1
}

# Print a command the way a shell reads it back: words quoted only when they need it.
render() {
    local word out=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$word")
        else
            out+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    printf '%s\n' "${out[*]}"
}

run() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        render "$@"
    else
        "$@"
    fi
}

SRC=${SRC:-}
OUT=${OUT:-}
[[ -n $SRC && -n $OUT ]] || die "set SRC (raw ILSVRC) and OUT (shard directory)"
[[ $SRC == /* && $OUT == /* ]] ||
    die "SRC and OUT must be absolute paths on a filesystem every node of the cluster sees"
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
WORKING_DIR=${WORKING_DIR:-.}
ALEXPIPE=${ALEXPIPE:-alexpipe}
RAY=${RAY:-ray}

# With token authentication on, a missing token fails deep inside `ray job submit`; say it here.
if [[ ${RAY_AUTH_MODE:-} == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
    if [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        [[ -s $RAY_AUTH_TOKEN_PATH ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
    elif [[ ! -s ${HOME:-~}/.ray/auth_token ]]; then
        die "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy the cluster's token to ~/.ray/auth_token"
    fi
fi

submit=("$RAY" job submit --address "$RAY_ADDRESS" --working-dir "$WORKING_DIR")
if [[ -n ${SUBMISSION_ID:-} ]]; then
    submit+=(--submission-id "$SUBMISSION_ID")
fi
if [[ -n ${RUNTIME_ENV_JSON:-} ]]; then
    submit+=(--runtime-env-json "$RUNTIME_ENV_JSON")
fi
if [[ ${NO_WAIT:-0} == 1 ]]; then
    submit+=(--no-wait)
fi
read -r -a alexpipe <<<"$ALEXPIPE"
build=("${alexpipe[@]}" build-shards --address auto --src "$SRC" --out "$OUT")
if [[ -n ${EXTRA_ARGS:-} ]]; then
    read -r -a extra <<<"$EXTRA_ARGS"
    build+=("${extra[@]}")
fi

run "${submit[@]}" -- "${build[@]}"
