from __future__ import annotations

from PIL import Image

from deployments.cli import main


def test_generate_writes_one_png(cache_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    main(["a red fox", "--size", "512x640", "--steps", "2", "--seed", "3", "--style", "Anime", "--out", str(out)])
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (512, 640)
    assert "seed 3" in capsys.readouterr().out
