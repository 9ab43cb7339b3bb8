#!/usr/bin/env bash
# Run inside `unshare -n` (a network namespace with only loopback): start a
# two-node Ray cluster (head + one worker, one CPU each) on 127.0.0.1, run
# alexpipe's build-shards against it with --address, then end every process
# of this namespace by pid. Nothing here can reach or listen on a real network.
# Usage: two_node_ray_build.sh SRC OUT LOGDIR [build-shards options...]
set -euo pipefail
src=$1 out=$2 logs=$3
shift 3
ip link set lo up
my_namespace=$(readlink /proc/$$/ns/net)
end_namespace_processes() {
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [ "$pid" = "$$" ] && continue
        if [ "$(readlink "$proc/ns/net" 2>/dev/null)" = "$my_namespace" ]; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    return 0
}
# Ray's files go to a directory of this run (short: Ray's socket paths must fit
# in 107 bytes), not to the machine's /tmp/ray, which other Rays use.
ray_temp=$(mktemp -d /tmp/ray-XXXXXX)
end_run() {
    end_namespace_processes
    rm -rf "$ray_temp"
}
trap end_run EXIT

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
port=6390
ray start --head --node-ip-address 127.0.0.1 --port "$port" --num-cpus 1 \
    --include-dashboard false --disable-usage-stats --temp-dir "$ray_temp" >"$logs/head.log" 2>&1
ray start --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 --num-cpus 1 \
    --temp-dir "$ray_temp" >"$logs/worker.log" 2>&1
# Wait until both nodes are registered, report their CPUs and run a task each
# (so each has a worker process up, as in a cluster that has been running).
python - "$port" <<'PY'
import sys, time, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR")


@ray.remote(num_cpus=1)
def node_of_task():
    time.sleep(0.3)
    return ray.get_runtime_context().get_node_id()


deadline = time.monotonic() + 90
while True:
    if time.monotonic() > deadline:
        sys.exit("the two nodes never both ran a task")
    alive = sum(node["Alive"] for node in ray.nodes())
    if alive == 2 and ray.available_resources().get("CPU", 0) >= 2:
        nodes = set(ray.get([node_of_task.options(scheduling_strategy="SPREAD").remote()
                             for _ in range(4)]))
        if len(nodes) == 2:
            break
    time.sleep(0.2)
PY
alexpipe build-shards --address "127.0.0.1:$port" --src "$src" --out "$out" --no-progress "$@"
# Every listener of the namespace is on loopback (the namespace has nothing else).
ss -Hltn | awk '{print $4}' >"$logs/listeners.txt"
