"""LoRA adapters for the DiT: the operator's directory of files (`library`), their conversion to
diffusers' keys by diffusers' own code (`convert`), their fit to the model (`adapter`), their layout
stacked over the blocks (`layout`), the resident adapters (`cache`), the linears that carry them
(`linear`), a forward's factors (`slots`) and the unmerged update itself (`ops`)."""
