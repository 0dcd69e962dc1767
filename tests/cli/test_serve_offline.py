"""`finlora serve` works offline: /docs and /redoc load every script, style sheet and icon from
the server itself (a CDN leaves them blank on a machine without internet), and behind an API key
they are guarded as every route but /health is."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from fastapi.testclient import TestClient

from finlora.config import load_config
from finlora.inference import LoadedRun, load_run
from finlora.serve import create_app
from finlora.train import train


class _Links(HTMLParser):
    """Every src= and href= of a page, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> LoadedRun:
    output = tmp_path_factory.mktemp("serve-offline") / "run"
    cfg = load_config(None, [*tiny_overrides, "train.max_steps=1"])
    train(cfg, output, progress_bar=False, log=lambda _msg: None)
    return load_run(output)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_the_server(loaded: LoadedRun, page: str) -> None:
    client = TestClient(create_app(loaded))
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "http://" not in html and "https://" not in html, "the page names another server"
    urls = links(html)
    assert len(urls) >= 2  # the favicon and the script at least
    for url in urls:
        assert not url.startswith("//"), url  # protocol-relative: another host all the same
        asset = client.get(urljoin(page, url))
        assert asset.status_code == 200, url
        assert asset.content, url
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, "no script served for the page"
    assert "javascript" in client.get(urljoin(page, scripts[0])).headers["content-type"]
    assert client.get("/openapi.json").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_docs_are_guarded_by_the_api_key(loaded: LoadedRun) -> None:
    client = TestClient(create_app(loaded, api_key="s3cret"))
    good = {"Authorization": "Bearer s3cret"}
    page = client.get("/docs", headers=good)
    assert page.status_code == 200
    for url in ["/docs", "/redoc", *links(page.text)]:
        assert client.get(urljoin("/docs", url)).status_code == 401, url
        assert client.get(urljoin("/docs", url), headers=good).status_code == 200, url


def test_docs_follow_the_root_path_behind_a_proxy(loaded: LoadedRun) -> None:
    # uvicorn's --root-path (a server mounted under /finlora by a proxy): the page's links
    # must carry the prefix, or the browser asks the proxy for paths it does not forward
    client = TestClient(create_app(loaded), root_path="/finlora")
    html = client.get("/docs").text
    assert "'/finlora/openapi.json'" in html
    assert all(url.startswith("/finlora/docs/") for url in links(html)), links(html)
