"""PromptStyler deployment (CPU): expands a prompt with a style preset. Presets are live config."""

from __future__ import annotations

from pydantic import Field, model_validator
from ray import serve

from deployments.contracts import StyledPrompt
from deployments.style.presets import DEFAULT_STYLE, StyleTable, configured_table
from deployments.runtime.stage import StageBase, StageConfig


class PromptStylerConfig(StageConfig):
    """Live config: batching plus the style table (`styles` extend the presets, or replace them)."""

    max_batch_size: int = Field(32, ge=1, le=256)
    styles: dict[str, str] = Field(default_factory=dict)
    replace_styles: bool = False
    default_style: str = DEFAULT_STYLE

    def table(self) -> StyleTable:
        return configured_table(self.styles, self.replace_styles, self.default_style)

    @model_validator(mode="after")
    def _table_is_valid(self):
        self.table()
        return self


@serve.deployment(name="PromptStyler", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class PromptStyler(StageBase):
    config_model = PromptStylerConfig

    def __init__(self, base_config: dict | None = None) -> None:
        self._init_stage("PromptStyler", base_config)
        self.styling = self.add_batcher("style", self._style_many, on_gpu=False)
        self.apply_config(self.config)
        self.start()  # nothing to load or warm: ready at once, through the same lifecycle as the model stages

    def serving(self, expected_compiles=None) -> None:
        """No model: nothing compiles here, so no compile watch (which would import torch)."""

    def ready_line(self) -> str:
        return f"{len(self.table.styles)} styles, default {self.table.default_style!r}"

    def apply_config(self, config: PromptStylerConfig) -> None:
        self.table = config.table()

    async def style(self, prompt: str, style: str | None = None) -> StyledPrompt:
        return await self.styling.submit((prompt, style))

    def _style_many(self, requests: list[tuple[str, str | None]]) -> list[StyledPrompt | Exception]:
        results: list[StyledPrompt | Exception] = []
        for prompt, style in requests:
            try:
                results.append(self.table.apply(prompt, style))
            except ValueError as exc:  # an unknown style fails its own request only
                results.append(exc)
        return results

    async def list_styles(self) -> dict[str, str]:
        return self.table.styles

    async def default_style(self) -> str:
        return self.table.default_style
