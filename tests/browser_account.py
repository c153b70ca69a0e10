"""Driven by tests/test_account_browser.py in a process of its own (Playwright's sync API and gevent's
monkey-patching do not share a thread): opens the account page the way retailCRM does, screenshots it, loads
and seeks the first recording, clicks re-register. Prints one JSON object of what it saw."""

from __future__ import annotations

import json
import sys
import tempfile

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(url: str, client_id: str, screenshot: str) -> None:
    seen: dict[str, object] = {"media": []}
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="fsbridge-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium", args=ARGS,
                                                        headless=True, viewport={"width": 1000, "height": 900})
        page = context.new_page()
        page.on("response", lambda r: "/records/" in r.url and seen["media"].append(  # type: ignore[union-attr]
            {"status": r.status, "type": r.headers.get("content-type", "")}))
        # What retailCRM serves the admin: a form that posts clientId to accountUrl.
        page.set_content(f'<form id="f" method="post" action="{url}/account">'
                         f'<input type="hidden" name="clientId" value="{client_id}"></form>'
                         '<script>document.getElementById("f").submit()</script>')
        page.wait_for_url(url + "/account")
        page.wait_for_load_state()
        page.screenshot(path=screenshot, full_page=True)
        seen["status"] = page.inner_text("#status")
        seen["mapping"] = page.inner_text("#mapping")
        seen["calls"] = page.inner_text("#calls")
        seen["audio"] = page.evaluate("""async () => {
            const a = document.querySelector('audio');
            a.preload = 'auto'; a.load();
            await new Promise((ok, ko) => { a.oncanplay = ok; a.onerror = () => ko(a.error && a.error.code); });
            a.currentTime = a.duration / 2;
            await new Promise(ok => { a.onseeked = ok; });
            return {duration: a.duration, position: a.currentTime};
        }""")
        page.click("#register")
        page.wait_for_load_state()
        seen["after_register"] = page.inner_text("body")
        context.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:4])
