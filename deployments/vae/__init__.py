"""The VaeDecoder stage: the tiled VAE codec (`codec`: decode, previews, upload encoding), its
compiled decoder (`compile`) and its Serve shell (`deployment`)."""
