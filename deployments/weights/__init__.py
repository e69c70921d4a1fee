"""Where weights come from and how each stage loads its components: a hub id or a local directory in
diffusers layout, `tiny` (a small random checkpoint built on first use) and `random` (the full-size
architecture with random weights); and the optional ControlNet's (`controlnet_source`)."""
