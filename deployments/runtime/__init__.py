"""What every stage deployment runs on: the stage base and its start lifecycle (`stage`), dynamic
batching, the one thread that runs a replica's model calls (`gpu_lane`), the warm-up it runs after
ready (`background_warmup`), request deadlines, start phases, compile caches, the stages' Prometheus
metrics, the cluster's free room for autoscaling, and the libraries' known harmless warnings (`quiet`)."""
