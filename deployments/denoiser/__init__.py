"""The Denoiser stage: the denoise loop over per-job schedules (`loop`), step-level scheduling
(`scheduling`), the work it reports to the autoscaler (`pending_work`), per-step timing, the batched
warm-up after ready, its metrics, the DiT's speed-ups (`dit/`) and its Serve shell (`deployment`)."""
