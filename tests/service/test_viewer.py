"""The attention viewer in a real headless Chromium against a live server: it lists the models, inspects a
translator, draws the heatmap (pixels read back from the canvas), shows the alignment's source and target tokens
(rows labelled by the token predicted, or read), enlarges a map from the model view, exports PNG and JSON, opens the
rollout at the last layer, windows the head view of long inputs, marks generated tokens (also held to a regex), can
scale colours without the first key, offers the model's kinds, layers and heads before the first Inspect and forgets the old model's on a
switch. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
SHIPPED_TRANSLATOR = ROOT / "model" / "checkpoints" / "multi30k-en-de"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SOURCE, TARGET = "Two dogs play in the snow.", "Zwei Hunde spielen im Schnee."

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")

# Distinct non-white colors in the canvas: a drawn heatmap has many, a blank or failed one has ~none.
CANVAS_COLORS = """() => {
  const c = document.getElementById('view');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] && !(d[i] > 245 && d[i + 1] > 245 && d[i + 2] > 245)) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  }
  return seen.size;
}"""


def _shipped_ready() -> bool:
    return all((SHIPPED_TRANSLATOR / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


@pytest.fixture
def browser_page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors  # type: ignore[attr-defined]
        yield page
        browser.close()


def _rendered(page: Any, view: str) -> None:
    page.wait_for_selector(f"body[data-rendered={view}]", timeout=60_000)


def test_viewer_inspects_a_translator(make_server: Callable[..., Any], browser_page: Any) -> None:
    shipped = _shipped_ready()
    server = make_server(models=[SHIPPED_TRANSLATOR] if shipped else [])
    model = "multi30k-en-de" if shipped else "tiny-mt"
    page = browser_page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    page.goto(f"{server.url}/inspect")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    listed = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert model in listed and "tiny-gpt" in listed
    page.select_option("#model", model)
    assert page.is_visible("#source") and not page.is_visible("#prompt")
    details = httpx.get(f"{server.url}/v1/models/{model}").json()["details"]
    assert f"context {details['context_length']} tokens" in page.inner_text("#model-info")
    assert page.is_checked("#generate"), "a translator with no target generates one"
    page.fill("#source", SOURCE)
    page.fill("#target", TARGET)
    assert not page.is_checked("#generate")
    page.click("#inspect")
    _rendered(page, "heatmap")
    assert page.evaluate(CANVAS_COLORS) > 50, "the heatmap canvas is blank"
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7)
    assert page.is_visible("#tooltip") and any(ch.isdigit() for ch in page.inner_text("#tooltip"))
    page.screenshot(path=str(ARTIFACTS / "viewer-heatmap.png"))

    page.click(".tabs button[data-view=alignment]")
    _rendered(page, "alignment")
    assert page.evaluate(CANVAS_COLORS) > 50
    tokenize = httpx.post(f"{server.url}/v1/tokenize", json={"model": model, "text": SOURCE}).json()
    chips = "es => es.map(e => e.textContent)"
    source_chips = page.eval_on_selector_all("#align-source .tok", chips)
    assert len(source_chips) == tokenize["count"] and "".join(source_chips).replace("␣", " ") == SOURCE
    # by default a row is the token its decoder position predicts: the target itself, then what follows it
    assert page.input_value("#rows") == "predicted" and "predicts" in page.inner_text("#caption")
    target_chips = page.eval_on_selector_all("#align-target .tok", chips)
    assert "".join(target_chips[:-1]).replace("␣", " ") == TARGET and target_chips[-1] == "⟨next⟩"
    page.select_option("#rows", "input")
    _rendered(page, "alignment")
    read = page.eval_on_selector_all("#align-target .tok", chips)
    assert read[0] in ("<s>", "<bos>") and read[1:] == target_chips[:-1], "the same rows, labelled one token earlier"
    page.select_option("#rows", "predicted")
    _rendered(page, "alignment")
    page.hover("#align-target .tok >> nth=2")
    assert page.eval_on_selector("#align-source .tok", "e => e.style.background") != ""
    page.screenshot(path=str(ARTIFACTS / "viewer-alignment.png"), full_page=True)

    page.click(".tabs button[data-view=model]")
    _rendered(page, "model")
    assert page.evaluate(CANVAS_COLORS) > 50
    page.screenshot(path=str(ARTIFACTS / "viewer-model.png"), full_page=True)
    grid = page.evaluate("window.attentionViewer.state.geom.cells.length")
    details = httpx.get(f"{server.url}/v1/models/{model}").json()["details"]
    kind = details["attention"]["kinds"][page.input_value("#kind")]
    assert grid == kind["layers"] * kind["heads"], "one thumbnail per (layer, head)"
    last = page.evaluate("(() => { const c = window.attentionViewer.state.geom.cells.at(-1); return c; })()")
    page.mouse.click(page.locator("#view").bounding_box()["x"] + last["x"] + 5,
                     page.locator("#view").bounding_box()["y"] + last["y"] + 5)
    _rendered(page, "heatmap")
    assert page.input_value("#layer") == str(last["layer"]) and page.input_value("#head") == str(last["head"])

    with page.expect_download() as png:
        page.click("#export-png")
    assert Path(png.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with page.expect_download() as data:
        page.click("#export-json")
    exported = json.loads(Path(data.value.path()).read_text())
    assert exported["model"] == model and exported["layer"] == last["layer"]
    assert all(abs(sum(row) - 1) < 0.01 for row in exported["weights"]), "exported rows are attention rows"

    page.click(".tabs button[data-view=head]")
    _rendered(page, "head")
    assert page.evaluate(CANVAS_COLORS) > 5
    page.screenshot(path=str(ARTIFACTS / "viewer-head.png"), full_page=True)
    page.click(".tabs button[data-view=rollout]")
    _rendered(page, "rollout")
    assert page.evaluate(CANVAS_COLORS) > 20
    rollout_layers = page.eval_on_selector_all("#layer option", "os => os.map(o => o.value)")
    assert page.input_value("#layer") == rollout_layers[-1], "rollout opens at the last layer"
    page.screenshot(path=str(ARTIFACTS / "viewer-rollout.png"), full_page=True)
    assert not page.errors, page.errors


def test_viewer_generates_then_inspects(make_server: Callable[..., Any], browser_page: Any) -> None:
    server = make_server()
    page = browser_page
    page.goto(f"{server.url}/inspect?model=tiny-gpt")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.input_value("#model") == "tiny-gpt" and page.is_visible("#prompt")
    page.fill("#prompt", "ROMEO:")
    page.check("#generate")
    page.fill("#max-tokens", "5")
    page.click("#inspect")
    _rendered(page, "heatmap")
    assert "5 generated" in page.inner_text("#status")
    tokens = page.evaluate("window.attentionViewer.state.result.decoder_tokens.map(t => t.generated)")
    assert tokens == [False] * 6 + [True] * 5
    assert "Green labels are generated tokens" in page.inner_text("#caption")
    image = page.locator("#view").screenshot()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(base64.b64encode(image)) > 1000
    assert page.evaluate(CANVAS_COLORS) > 5
    assert not page.errors, page.errors


def test_viewer_shows_where_the_model_looked_while_held_to_a_regex(make_server: Callable[..., Any],
                                                                 browser_page: Any) -> None:
    server = make_server()
    page = browser_page
    page.goto(f"{server.url}/inspect?model=tiny-gpt")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.fill("#prompt", "ROMEO:")
    page.check("#generate")
    page.fill("#max-tokens", "20")
    page.fill("#temperature", "1")
    page.select_option("#constraint-kind", "regex")
    page.fill("#constraint", r" [a-z]{2,4} [a-z]{2,4}\.")
    page.click("#inspect")
    _rendered(page, "heatmap")
    generated = page.evaluate("window.attentionViewer.state.result.decoder_tokens.filter(t => t.generated)"
                              ".map(t => t.text).join('')")
    assert re.fullmatch(r" [a-z]{2,4} [a-z]{2,4}\.", generated), generated
    assert page.evaluate(CANVAS_COLORS) > 5
    page.select_option("#constraint-kind", "regex")
    page.fill("#constraint", "[a-z]+@")  # the character model has no '@': the server says so
    page.click("#inspect")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "'@'" in page.inner_text("#error")
    assert not page.errors, page.errors


def test_viewer_scales_without_the_sink_and_windows_long_inputs(make_server: Callable[..., Any],
                                                                 browser_page: Any) -> None:
    server = make_server()
    page = browser_page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{server.url}/inspect?model=tiny-gpt")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.fill("#prompt", "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet")
    page.click("#inspect")
    _rendered(page, "heatmap")
    scale = page.inner_text("#legend-max")
    page.check("#skip-sink")
    _rendered(page, "heatmap")
    assert "first key excluded" in page.inner_text("#legend-max") and page.inner_text("#legend-max") != scale
    page.screenshot(path=str(ARTIFACTS / "viewer-lm-no-sink.png"), full_page=True)
    page.click(".tabs button[data-view=head]")
    _rendered(page, "head")
    n = page.evaluate("window.attentionViewer.state.result.decoder_tokens.length")
    assert n > 40 and page.is_visible("#window-ctl") and f"of {n}" in page.inner_text("#window-label")
    assert page.evaluate("window.attentionViewer.state.current.queries.length") == 40
    page.screenshot(path=str(ARTIFACTS / "viewer-head-window.png"), full_page=True)
    page.eval_on_selector("#window", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
    _rendered(page, "head")
    assert page.inner_text("#window-label").startswith("0–39")
    assert not page.errors, page.errors


def test_the_controls_follow_the_model_before_and_after_an_inspection(make_server: Callable[..., Any],
                                                                      browser_page: Any) -> None:
    """The selects offer the model card's kinds, layers and heads on load (before any Inspect); a model switch
    drops the previous model's kinds, status line and colour scale."""
    server = make_server()
    page = browser_page
    cards = {m["id"]: m["details"]["attention"]["kinds"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}

    def options(select: str) -> list[str]:
        return page.eval_on_selector_all(f"#{select} option", "os => os.map(o => o.value)")  # type: ignore[no-any-return]

    page.goto(f"{server.url}/inspect?model=tiny-gpt")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    gpt = cards["tiny-gpt"]["decoder_self"]
    assert options("kind") == ["decoder_self"] and options("layer") == [str(i) for i in range(gpt["layers"])]
    assert options("head") == ["mean", "max", *(str(h) for h in range(gpt["heads"]))]
    page.fill("#prompt", "ROMEO:")
    page.click("#inspect")
    _rendered(page, "heatmap")
    assert "tiny-gpt" in page.inner_text("#status") and page.inner_text("#legend-max")[0].isdigit()

    page.select_option("#model", "tiny-mt")
    assert options("kind") == list(cards["tiny-mt"]) and {"encoder_self", "cross"} <= set(options("kind"))
    status = page.inner_text("#status")
    assert "tiny-gpt" not in status and "tokens" not in status, status
    assert page.inner_text("#legend-max").startswith("max"), "the colour scale of the old map is gone"
    page.select_option("#kind", "encoder_self")  # chosen before Inspect, kept by it
    enc = cards["tiny-mt"]["encoder_self"]
    assert options("layer") == [str(i) for i in range(enc["layers"])]
    page.fill("#source", SOURCE)
    page.click("#inspect")
    _rendered(page, "heatmap")
    assert page.input_value("#kind") == "encoder_self" and "tiny-mt" in page.inner_text("#status")
    assert not page.errors, page.errors
