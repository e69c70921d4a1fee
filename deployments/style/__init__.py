"""The PromptStyler stage: style presets (`presets`) and its Serve shell (`deployment`)."""
