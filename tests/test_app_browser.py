"""The explorer in a real browser: Debian's chromium driven by Playwright (never `playwright install`).

Open the page on a small atlas made here, pick a layer, click a channel, see its grid and
projection load, hover a map, upload an image and see the maps change, draw one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is missing (install Debian's chromium: `make browser`)",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from featurelens.app import serve
    from test_app import make_atlas

    atlas_dir = make_atlas(tmp_path_factory.mktemp("browser"))
    handle = serve(atlas_dir, port=0)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()


def drawn_digit(path: Path) -> Path:
    """A hand-drawn-looking '7': white strokes on black, larger than the data's 28x28."""
    image = Image.new("L", (112, 112), 0)
    draw = ImageDraw.Draw(image)
    draw.line([(20, 20), (92, 20), (48, 100)], fill=255, width=12)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def first_tile(page) -> str:
    return page.evaluate("document.querySelector('#maps .tile canvas').toDataURL()")


def test_explore_a_layer_a_channel_and_an_upload(server, page, tmp_path):
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#maps .tile").count() == 4  # features.0: 4 channels

    # Pick a layer: its 6 maps are drawn.
    page.select_option("#layer", "features.4")
    page.wait_for_selector("#maps[data-layer='features.4'] .tile[data-channel='5']")
    assert page.locator("#maps .tile").count() == 6
    before = first_tile(page)

    # Hover a map: the receptive field of that location is described and drawn on the input.
    tile = page.locator(".tile[data-channel='1'] canvas")
    box = tile.bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.wait_for_function("document.getElementById('hover-info').textContent.length > 0")
    assert "channel 1 at (0, 0)" in page.text_content("#hover-info")
    assert "rows 0–4, cols 0–4" in page.text_content("#hover-info")
    drawn = page.evaluate(
        """() => { const c = document.getElementById('input-overlay');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"""
    )
    assert drawn > 0

    # Click a channel: its projection, top hits and Zeiler-Fergus grid load.
    page.click(".tile[data-channel='2']")
    page.wait_for_function(
        """() => { const z = document.getElementById('zf'), p = document.getElementById('projection');
                   return z.complete && z.naturalWidth > 0 && p.complete && p.naturalWidth > 0; }"""
    )
    assert "channel 2" in page.text_content("#unit-title")
    assert page.locator("#top-hits img").count() == 4
    assert page.locator(".tile.selected").get_attribute("data-channel") == "2"

    # Switch the method: a new projection is requested with that method.
    with page.expect_response(lambda r: "projection.png" in r.url and "method=guided" in r.url):
        page.click("#methods button[data-method='guided']")

    # Upload an image: the maps are recomputed for it.
    page.set_input_files("#upload", str(drawn_digit(tmp_path / "seven.png")))
    page.wait_for_selector("#maps[data-input^='upload:']")
    page.wait_for_function(
        "document.getElementById('input-label').textContent.startsWith('upload seven.png')"
    )
    assert first_tile(page) != before
    assert page.get_attribute("#input-img", "src").startswith("/api/input.png?input=upload")
    # Every request settled: nothing left "loading", no error shown, nothing in the console.
    page.wait_for_function("document.getElementById('status').textContent === ''")
    assert "error" not in (page.get_attribute("#status", "class") or "")
    assert errors == []

    # Draw an input with the mouse: the maps follow the drawing.
    uploaded = page.get_attribute("#maps", "data-input")
    page.click("#draw")
    pad = page.locator("#pad").bounding_box()
    page.mouse.move(pad["x"] + 60, pad["y"] + 40)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(pad["x"] + 60 + 8 * step, pad["y"] + 40 + 14 * step)
    page.mouse.up()
    page.wait_for_function(
        "document.getElementById('input-label').textContent.startsWith('drawing')"
    )
    page.wait_for_function(
        f"(() => {{ const m = document.getElementById('maps').dataset.input;"
        f" return m.startsWith('upload:') && m !== '{uploaded}'; }})()"
    )
    page.wait_for_function("document.getElementById('status').textContent === ''")
    assert errors == []

    # A top hit becomes the input when clicked.
    page.click("#top-hits figure >> nth=0")
    page.wait_for_selector("#maps[data-input^='dataset:']")
    shot = page.screenshot()
    assert np.asarray(Image.open(io.BytesIO(shot))).std() > 5  # not a blank page
