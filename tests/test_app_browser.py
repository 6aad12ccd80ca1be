"""The explorer in a real browser: Debian's chromium driven by Playwright (never `playwright install`).

Open the page on a small atlas made here, pick a layer, click a channel, see its grid and
projection load, hover a map, upload an image and see the maps change, draw one.
"""

from __future__ import annotations

import io
import json
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
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"],
        )  # fmt: skip
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh page in a context of its own (no cookies, no cache from other tests)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        yield page
    finally:
        context.close()


def console_errors(page) -> list[str]:
    """Collects the page's console errors and uncaught exceptions from now on."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def drawn_digit(path: Path) -> Path:
    """A hand-drawn-looking '7': white strokes on black, larger than the data's 28x28."""
    image = Image.new("L", (112, 112), 0)
    draw = ImageDraw.Draw(image)
    draw.line([(20, 20), (92, 20), (48, 100)], fill=255, width=12)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


# Every wait below is a function, not an expression: Playwright evaluates an expression with
# eval() in the page, which the explorer's Content-Security-Policy forbids.


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
    page.wait_for_function("() => document.getElementById('hover-info').textContent.length > 0")
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
        "() => document.getElementById('input-label').textContent.startsWith('upload seven.png')"
    )
    assert first_tile(page) != before
    # Images are fetched with the page's header and shown from blob: URLs (data-src: the API's).
    assert page.get_attribute("#input-img", "data-src").startswith("/api/input.png?input=upload")
    assert page.get_attribute("#input-img", "src").startswith("blob:")
    # Every request settled: nothing left "loading", no error shown, nothing in the console.
    page.wait_for_function("() => document.getElementById('status').textContent === ''")
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
        "() => document.getElementById('input-label').textContent.startsWith('drawing')"
    )
    page.wait_for_function(
        "(uploaded) => { const m = document.getElementById('maps').dataset.input;"
        " return m.startsWith('upload:') && m !== uploaded; }",
        arg=uploaded,
    )
    page.wait_for_function("() => document.getElementById('status').textContent === ''")
    assert errors == []

    # A top hit becomes the input when clicked.
    page.click("#top-hits figure >> nth=0")
    page.wait_for_selector("#maps[data-input^='dataset:']")
    shot = page.screenshot()
    assert np.asarray(Image.open(io.BytesIO(shot))).std() > 5  # not a blank page


# --------------------------------------------------------------------------------------------
# Another page, on another port of this machine, tries to use the explorer

FOREIGN_PAGE = """<!doctype html><html><body><script>
const API = "%(api)s";
const png = Uint8Array.from(atob("%(png)s"), (c) => c.charCodeAt(0));
const settle = (p) => p.then(() => "ok", () => "failed");
const jobs = [];
for (let i = 0; i < 10; i++) {
  // Uploads a page can send without a preflight: no-cors, a form's or a text body.
  const form = new FormData();
  form.append("file", new Blob([png], { type: "image/png" }), "a.png");
  jobs.push(settle(fetch(API + "/api/inputs", { mode: "no-cors", method: "POST", body: form })));
  jobs.push(settle(fetch(API + "/api/inputs?invert=1", {
    mode: "no-cors", method: "POST", body: new Blob([png], { type: "text/plain" }) })));
}
for (let c = 0; c < 6; c++) {
  for (let i = 0; i < 4; i++) {  // images that would each cost a projection
    const img = new Image();
    jobs.push(new Promise((done) => { img.onload = img.onerror = done; }));
    img.src = API + `/api/projection.png?input=dataset:${i}&layer=features.4&channel=${c}`;
    document.body.append(img);
  }
}
jobs.push(settle(fetch(API + "/api/zf.png?layer=features.4&channel=1", { mode: "no-cors" })));
// With the page's header the browser must ask first (a preflight), which is never granted.
jobs.push(settle(fetch(API + "/api/info", { headers: { "X-Featurelens": "1" } })));
Promise.all(jobs).then((r) => { document.body.dataset.results = JSON.stringify(r); });
</script></body></html>"""


@pytest.fixture(scope="module")
def foreign_site(server):
    """A plain HTTP server on another loopback port serving FOREIGN_PAGE."""
    import base64
    import http.server
    import threading

    raw = io.BytesIO()
    Image.new("L", (28, 28), 200).save(raw, format="PNG")
    api = server.base_url.rstrip("/")
    body = FOREIGN_PAGE % {"api": api, "png": base64.b64encode(raw.getvalue()).decode()}

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}/"
    finally:
        site.shutdown()
        site.server_close()


def test_a_page_of_another_origin_causes_no_upload_and_no_computation(server, page, foreign_site):
    ex, refusals = server.app.state.explorer, server.app.state.refusals
    before = (ex.cache.misses, ex.uploads_added, refusals["origin"])
    page.goto(foreign_site)
    page.wait_for_function("() => document.body.dataset.results !== undefined")
    results = json.loads(page.evaluate("() => document.body.dataset.results"))
    assert len(results) == 20 + 24 + 2
    # no-cors fetches "succeed" with an opaque answer; the fetch needing a preflight fails
    assert results[-1] == "failed"
    assert page.evaluate("() => [...document.images].every((i) => i.naturalWidth === 0)")
    assert (ex.cache.misses, ex.uploads_added) == before[:2]  # nothing decoded or computed
    # Every request reached the server and was refused there (the preflight included).
    assert refusals["origin"] - before[2] == 20 + 24 + 1 + 1
    # The same projections from the explorer's own page are computed: the counters can move.
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']")
    page.click(".tile[data-channel='1']")
    page.wait_for_function(
        "() => { const p = document.getElementById('projection');"
        " return p.complete && p.naturalWidth > 0; }"
    )
    assert ex.cache.misses > before[0]


# --------------------------------------------------------------------------------------------
# The token: the page works from the printed URL and keeps the token out of sight


def test_the_page_works_from_the_url_with_the_token(tmp_path, page):
    from featurelens.app import serve
    from test_app import make_atlas

    errors = console_errors(page)
    with serve(make_atlas(tmp_path), port=0, token=True) as server:
        assert "?token=" in server.url
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#maps .tile").count() == 4
        page.click(".tile[data-channel='2']")
        page.wait_for_function(
            "() => { const z = document.getElementById('zf');"
            " return z.complete && z.naturalWidth > 0; }"
        )
        assert page.url == server.base_url  # the token left the address bar (and history)
        assert page.evaluate("() => document.cookie") == ""  # HttpOnly: not for scripts
        cookies = page.context.cookies()
        assert [(c["value"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
            (server.token, True, "Strict")
        ]
        assert errors == []
        # Without the token (a fresh context, no cookie): refused, with what to do.
        other = page.context.browser.new_page()
        try:
            response = other.goto(server.base_url)
            assert response.status == 403 and "token" in other.text_content("body")
        finally:
            other.close()


# --------------------------------------------------------------------------------------------
# Strings from the atlas are shown as text, never as markup

HOSTILE = "<img src=x onerror=pwned=1>"


def test_manifest_strings_are_shown_as_text(tmp_path, page):
    import torch

    import featurelens
    from featurelens.app import serve

    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(1, 2, 3))
    net.add_module(HOSTILE, torch.nn.ReLU())  # a module name is any string without a dot
    net.eval()
    images = torch.rand(4, 1, 9, 9)
    featurelens.scan(net, images, ["conv", HOSTILE], top_k=2, progress=False).save(tmp_path / "a")
    errors = console_errors(page)
    with serve(tmp_path / "a", port=0, model=net, data=images) as server:
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']")
        page.select_option("#layer", HOSTILE)
        page.wait_for_function("(name) => document.getElementById('maps').dataset.layer === name",
                               arg=HOSTILE)  # fmt: skip
        page.click(".tile[data-channel='1']")
        page.wait_for_function("() => document.getElementById('unit-title').textContent"
                               ".includes('channel 1')")  # fmt: skip
        assert HOSTILE in page.text_content("#unit-title")
        assert page.evaluate("() => [...document.querySelectorAll('#layer option')]"
                             ".map((o) => o.textContent)") == ["conv", HOSTILE]  # fmt: skip
        assert page.locator("img[src='x']").count() == 0  # no element made from the name
        assert page.evaluate("() => typeof window.pwned") == "undefined"
    assert errors == []
