"""The Denoiser stage: the denoise loop over per-job schedules (`loop`), step-level scheduling
(`scheduling`), the work it reports to the autoscaler (`pending_work`), per-step device time
(`step_timer`), inpainting's masks and blend (`inpaint`), the ControlNet in the step (`control`), its metrics, the DiT's speed-ups (`dit/`),
LoRA adapters (`lora/`) and its Serve shell (`deployment`)."""
