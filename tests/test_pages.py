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
    page.wait_for_selector("#studies tbody tr", timeout=15000)
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


def test_pages_log_in_with_a_token_and_follow_the_role(make_server, browser, tmp_path):
    """Token mode: the page asks for a credential, keeps it in sessionStorage, sends it as a
    Bearer header (thumbnails included), and shows what the role allows."""
    server = make_server(config_text='[auth]\nmode = "token"\n')
    factory.wsi_series(tmp_path / "a", patient_id="PAGE-2", patient_name="Login^Lily", accession="ACC-LOGIN")
    run_cli("import", "--quiet", str(tmp_path / "a"), data=server.data_dir, check=True)
    viewer = run_cli("token", "create", "--role", "viewer", "--name", "Dr Wang", data=server.data_dir,
                     check=True).stdout.strip()
    auditor = run_cli("token", "create", "--role", "auditor", data=server.data_dir, check=True).stdout.strip()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.http_url + "/")
    page.wait_for_selector("#login:not([hidden])", timeout=15000)
    assert "ACC-LOGIN" not in page.content()
    page.fill("#token", "pp_0123456789abcdef." + "A" * 43)
    page.click("#login button")
    page.wait_for_function("() => document.getElementById('loginerr').textContent.includes('not accepted')",
                           timeout=15000)
    page.fill("#token", viewer)
    page.click("#login button")
    page.wait_for_selector("#studies tbody tr", timeout=15000)
    assert "ACC-LOGIN" in page.inner_text("#studies") and "Login, Lily" in page.inner_text("#studies")
    assert "Dr Wang (viewer)" in page.inner_text("#who")
    page.wait_for_function("() => { const i = document.querySelector('#studies img'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=15000)
    assert page.evaluate("() => sessionStorage.getItem('pathpacs.token')") == viewer
    page.reload()  # the session keeps the credential
    page.wait_for_selector("#studies tbody tr", timeout=15000)
    page.click("#logout")
    assert page.evaluate("() => sessionStorage.getItem('pathpacs.token')") is None
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", auditor)
    page.click("#login button")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('may not view images')",
                           timeout=15000)
    assert "ACC-LOGIN" not in page.content()
    assert errors == []
