"""What every stage deployment runs on: the stage base and its start lifecycle (`stage`), dynamic
batching, the one thread that runs a replica's model calls (`gpu_lane`), request deadlines, start
phases, compile caches, the stages' Prometheus metrics, and the cluster's free room for autoscaling."""
