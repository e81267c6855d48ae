"""The pages a person opens: `/` links to the viewer and the docs; `/docs` and `/redoc` need nothing from the
internet (every asset they reference is served by us) and draw the API in a real headless Chromium that may not
reach any other host."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|url:\s*'([^']+)'""")


def _assets(base: str, html: str) -> list[str]:
    return [urljoin(base, a or b) for a, b in ASSET.findall(html)]


@pytest.fixture(scope="module")
def keyed(server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server that wants an API key: the pages and their assets stay open."""
    from support import LiveServer, settings_for

    assert server.settings.models_dir is not None
    s = LiveServer(settings_for(server.settings.models_dir, api_keys=["sekret"]))
    yield s
    s.stop()


def test_home_links_to_the_viewer_and_the_docs(keyed: Any) -> None:
    r = httpx.get(f"{keyed.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    links = set(re.findall(r'href="([^"]+)"', r.text))
    assert {"/inspect", "/docs", "/redoc", "/v1/models"} <= links


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_asset_of_the_docs_is_served_here(keyed: Any, page: str) -> None:
    html = httpx.get(keyed.url + page)
    assert html.status_code == 200
    assets = _assets(keyed.url + page, html.text)
    assert any(a.endswith(".js") for a in assets), assets
    for url in assets:
        assert urlparse(url).netloc == urlparse(keyed.url).netloc, f"{page} loads {url} from another host"
        assert httpx.get(url).status_code == 200, url  # open without the API key, like the page


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_docs_render_offline_in_chromium(server: Any) -> None:
    from playwright.sync_api import Route, sync_playwright

    own = urlparse(server.url).netloc
    elsewhere: list[str] = []

    def only_ours(route: Route) -> None:
        if urlparse(route.request.url).netloc == own:
            route.continue_()
        else:  # ReDoc's "API docs by Redocly" footer links a logo image: cosmetic, it may fail
            if route.request.resource_type != "image":
                elsewhere.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("**/*", only_ours)
        page.goto(f"{server.url}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=60_000)
        paths = page.eval_on_selector_all(".opblock-summary-path", "es => es.map(e => e.textContent.trim())")
        assert "/v1/generate" in paths and "/v1/attention" in paths
        page.goto(f"{server.url}/redoc")
        page.wait_for_function("document.body.innerText.includes('/v1/completions')", timeout=60_000)
        browser.close()
    assert not elsewhere, f"the docs tried to reach other hosts: {elsewhere}"
    assert not errors, errors


def test_unknown_pages_stay_404(server: Any) -> None:
    r = httpx.get(f"{server.url}/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
