"""PromptStyler deployment (CPU): expands a prompt with a style preset. Presets are live config."""

from __future__ import annotations

from ray import serve

from deployments.core.contracts import StyledPrompt
from deployments.core.styles import DEFAULT_STYLES, PromptStyler as StyleTable, merge_styles
from deployments.stage_base import StageBase


@serve.deployment(name="PromptStyler", ray_actor_options={"num_cpus": 0.1})
class PromptStyler(StageBase):
    def __init__(self) -> None:
        self._init_stage("PromptStyler")
        self.table = StyleTable()
        self.styling = self.add_batcher("style", self._style_many, on_gpu=False)

    def reconfigure(self, user_config: dict) -> None:
        self.apply_knobs(user_config)

    def apply_extra_config(self, config: dict) -> None:
        styles = config.pop("styles", None)
        replace = bool(config.pop("replace_styles", False))
        default_style = config.pop("default_style", "None")
        super().apply_extra_config(config)
        self.table.set_styles(merge_styles(DEFAULT_STYLES, styles, replace=replace), default_style)

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
