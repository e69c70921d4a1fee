"""Tenants: API keys with names, their own limits and a weighted fair share of the GPU.

`keys` (where keys come from, names, validation, the key table), `bucket` (images per minute),
`headers` (OpenAI's rate-limit headers), `ledger` (per-key admission on one Ingress replica),
`release` (the Ingress's fair release of admitted work into the pipeline). The fair order itself is
deployments/runtime/fair_share.py, which the Denoiser's queue uses too.
"""
