"""`alexpipe build-shards`, the offline job: list the inputs (sources, tarscan,
devkit), plan the shards (plan), convert each shard (transform, stats,
shard_task) on Ray (scheduler, ray_runtime), and write the outputs (finish);
job.build_shards ties them together."""
