"""The built-in pages in a real browser (Debian chromium driven by playwright)."""
from __future__ import annotations

import factory
from conftest import run_cli


def test_study_list_shows_studies_with_thumbnails(server, browser, tmp_path):
    factory.wsi_series(tmp_path / "a", patient_id="PAGE-1", patient_name="Page^Anna", accession="ACC-PAGE")
    run_cli("import", "--quiet", str(tmp_path / "a"), data=server.data_dir, check=True)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    resp = page.goto(server.http_url + "/")
    assert resp is not None and resp.status == 200
    assert "ACC-PAGE" in page.content()
    assert "Page, Anna" in page.inner_text("table")  # Page^Anna shown as a person reads it
    assert "1 study." in page.inner_text("body")
    img = page.locator("img").first
    img.scroll_into_view_if_needed()
    page.wait_for_function("() => { const i = document.querySelector('img'); return i && i.complete && i.naturalWidth > 0; }",
                           timeout=15000)
    assert page.evaluate("() => document.querySelector('img').naturalWidth") > 0
    page.screenshot(path=str(tmp_path / "index.png"))
    assert errors == []
