"""LoRA adapters for the DiT: the operator's directory of files (`library`), their conversion to
diffusers' keys by diffusers' own code (`convert`), their fit to the model and layout for fused
projections (`adapter`), and the unmerged low-rank update beside the base linears (`linear`)."""
