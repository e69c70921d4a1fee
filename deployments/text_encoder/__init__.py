"""The TextEncoder stage: prompt encoding with the Qwen3 encoder (`encoding`), its compiled decoder
layers (`compile`) and its Serve shell (`deployment`)."""
