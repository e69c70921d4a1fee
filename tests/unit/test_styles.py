from __future__ import annotations

import pytest

from deployments.style.presets import DEFAULT_STYLES, StyleTable, UnknownStyleError, merge_styles

ORIGINAL_APP_PRESETS = [
    "None", "Photorealistic", "Cinematic", "Anime", "Digital Art",
    "Oil Painting", "Watercolor", "3D Render", "Fantasy", "Sci-Fi",
]


def test_the_ten_presets_exist_and_wrap_the_prompt():
    assert list(DEFAULT_STYLES) == ORIGINAL_APP_PRESETS
    styler = StyleTable()
    assert styler.apply("a cat").text == "a cat"
    for name in ORIGINAL_APP_PRESETS[1:]:
        styled = styler.apply("a cat", name)
        assert styled.text.startswith("a cat") and len(styled.text) > len("a cat") + 20
        assert (styled.style, styled.original) == (name, "a cat")


def test_lookup_ignores_case_and_reports_the_preset_name():
    assert StyleTable().apply("x", "sci-fi").style == "Sci-Fi"


def test_unknown_style_lists_the_known_ones():
    with pytest.raises(UnknownStyleError) as info:
        StyleTable().apply("a cat", "Baroque")
    assert "Baroque" in str(info.value)
    for name in ORIGINAL_APP_PRESETS:
        assert name in str(info.value)


def test_config_extends_or_replaces_presets():
    extended = merge_styles(DEFAULT_STYLES, {"Noir": "{prompt}, black and white film noir"})
    assert len(extended) == 11 and extended["Noir"].startswith("{prompt}")
    replaced = merge_styles(DEFAULT_STYLES, {"None": "{prompt}", "Pixel": "pixel art of {prompt}"}, replace=True)
    assert list(replaced) == ["None", "Pixel"]
    assert StyleTable(replaced).apply("a cat", "pixel").text == "pixel art of a cat"


@pytest.mark.parametrize("template", ["no slot", "{prompt} and {prompt}", ""])
def test_bad_templates_are_rejected(template):
    with pytest.raises(ValueError, match="exactly once"):
        merge_styles(DEFAULT_STYLES, {"Bad": template})


def test_default_style_must_exist():
    with pytest.raises(ValueError, match="default_style 'Missing' is not among the styles"):
        StyleTable(DEFAULT_STYLES, default_style="Missing")


def test_the_app_and_the_styler_decide_the_default_style_alike():
    """The app's args and the PromptStyler's live config run one check: a name in any case is the
    preset it names, and a name of no preset fails both with the same message."""
    from serve_app.config import AppArgs
    from deployments.style.deployment import PromptStylerConfig

    noir = {"Noir": "{prompt}, film noir"}
    assert AppArgs(default_style="  watercolor").default_style == "  watercolor"  # accepted as the styler takes it
    assert PromptStylerConfig(default_style="  watercolor").table().default_style == "Watercolor"
    assert PromptStylerConfig(styles=noir, default_style="NOIR").table().apply("a cat").text == "a cat, film noir"
    for config in (AppArgs, PromptStylerConfig):
        with pytest.raises(ValueError, match="default_style 'Noir' is not among the styles: None, Photorealistic"):
            config(default_style="Noir")
        with pytest.raises(ValueError, match="default_style 'None' is not among the styles: Noir "):
            config(styles=noir, replace_styles=True)
