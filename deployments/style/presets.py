"""Prompt style expansion: a preset wraps the user's prompt in a style's wording.

Presets are data: `DEFAULT_STYLES` is the built-in set, and a config may replace or extend it
(serve_config.yaml's `styles`). A template must contain `{prompt}` exactly once. `configured_table`
is the one place a config's styles and default style are checked (the app's args and the
PromptStyler's live config both call it); names match case-insensitively everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from deployments.contracts import StyledPrompt

PROMPT_SLOT = "{prompt}"
DEFAULT_STYLE = "None"  # what a request without `style` gets unless the config names another preset

DEFAULT_STYLES: dict[str, str] = {
    "None": "{prompt}",
    "Photorealistic": (
        "{prompt}. A true-to-life photograph with natural light, accurate colours, fine surface texture "
        "and crisp focus, as if taken on a full-frame camera with a prime lens."
    ),
    "Cinematic": (
        "{prompt}. A film still with widescreen framing, moody contrast, motivated lighting, a shallow "
        "depth of field and a subtle colour grade."
    ),
    "Anime": (
        "{prompt}. Japanese animation style: clean line art, flat cel shading, expressive characters and "
        "a bright, saturated palette."
    ),
    "Digital Art": (
        "{prompt}. Polished digital painting with bold shapes, smooth gradients, rich lighting effects and "
        "a concept-art finish."
    ),
    "Oil Painting": (
        "{prompt}. Painted in oils on canvas: visible brushstrokes, thick impasto highlights, warm glazes "
        "and a classical composition."
    ),
    "Watercolor": (
        "{prompt}. A watercolour on textured paper: soft washes that bleed into each other, light pencil "
        "lines and generous white space."
    ),
    "3D Render": (
        "{prompt}. A physically based 3D render with global illumination, soft shadows, detailed materials "
        "and a studio backdrop."
    ),
    "Fantasy": (
        "{prompt}. An epic fantasy illustration: enchanted atmosphere, glowing magic, ornate details and a "
        "sweeping, mythical landscape."
    ),
    "Sci-Fi": (
        "{prompt}. Futuristic science fiction: sleek technology, neon accents, vast architecture and a cool, "
        "high-tech colour scheme."
    ),
}


class UnknownStyleError(ValueError):
    """The named style is not a preset; the message lists the known ones."""

    def __init__(self, style: str, known: list[str]):
        self.style = style
        self.known = known
        super().__init__(f"unknown style {style!r}; known styles: {', '.join(known)}")

    def __reduce__(self):  # crosses process boundaries (deployment handles) intact
        return (type(self), (self.style, self.known))


def validate_styles(styles: Mapping[str, str]) -> dict[str, str]:
    """Checks a style table from config; raises ValueError naming the bad entry."""
    if not styles:
        raise ValueError("the style table is empty")
    checked: dict[str, str] = {}
    for name, template in styles.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"style names must be non-empty strings, got {name!r}")
        if not isinstance(template, str) or template.count(PROMPT_SLOT) != 1:
            raise ValueError(f"style {name!r}: its template must contain {PROMPT_SLOT} exactly once")
        checked[name] = template
    return checked


def merge_styles(base: Mapping[str, str], extra: Mapping[str, str] | None, replace: bool = False) -> dict[str, str]:
    """A config either extends the presets (the default) or replaces them entirely."""
    if replace:
        return validate_styles(extra or {})
    return validate_styles({**base, **(extra or {})})


class StyleTable:
    """Applies named presets to prompts. Lookup is case-insensitive; the preset's own name is reported."""

    def __init__(self, styles: Mapping[str, str] | None = None, default_style: str = DEFAULT_STYLE):
        checked = validate_styles(styles if styles is not None else DEFAULT_STYLES)
        self._styles, self._lookup = checked, {name.casefold(): name for name in checked}
        if default_style.strip().casefold() not in self._lookup:
            raise ValueError(f"default_style {default_style!r} is not among the styles: {', '.join(checked)}")
        self.default_style = self.resolve(default_style)

    @property
    def styles(self) -> dict[str, str]:
        return dict(self._styles)

    def resolve(self, style: str | None) -> str:
        if style is None:
            return self.default_style
        name = self._lookup.get(style.strip().casefold())
        if name is None:
            raise UnknownStyleError(style, list(self._styles))
        return name

    def apply(self, prompt: str, style: str | None = None) -> StyledPrompt:
        name = self.resolve(style)
        text = self._styles[name].replace(PROMPT_SLOT, prompt.strip())
        return StyledPrompt(text=text, style=name, original=prompt)


def configured_table(styles: Mapping[str, str] | None, replace: bool = False,
                     default_style: str = DEFAULT_STYLE) -> StyleTable:
    """The table a config describes: `styles` extend the presets (or replace them), and
    `default_style` names one of the result; a ValueError names what is wrong."""
    return StyleTable(merge_styles(DEFAULT_STYLES, styles, replace=replace), default_style)
