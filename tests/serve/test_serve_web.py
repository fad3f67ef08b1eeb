"""The web chat page in headless Chromium: persona, streamed reply, reset.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package (its
own browser downloads are not used).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chatft.serve.server import BackgroundServer

from .conftest import PERSONA

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync",
        # A DNS-rebinding attacker's name that resolves to this machine.
        "--host-resolver-rules=MAP rebind.test 127.0.0.1"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright Python package is not installed")
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file()
                              else shutil.which("chromium"), args=ARGS)
        yield b
        b.close()


def test_chat_page_streams_a_reply(browser, engine):
    with BackgroundServer(engine) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        requests: list[dict] = []
        page.on("request", lambda r: requests.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('persona').value.length > 0")
        assert page.input_value("#persona") == PERSONA
        assert engine.cm.name in page.inner_text("#model")

        # Count how often the reply's text changes while it streams in.
        page.evaluate("""() => {
            window.updates = 0;
            new MutationObserver((muts) => { window.updates += muts.length; })
              .observe(document.getElementById('messages'),
                       {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("#max-tokens", "60")
        page.fill("#input", "Hello there")
        page.click("#send")
        reply = page.locator(".msg.assistant").first
        reply.wait_for()
        page.wait_for_selector(".msg.assistant[data-finish]")
        text = reply.evaluate("el => el.firstChild ? el.firstChild.textContent : ''")
        assert text.strip()
        assert page.evaluate("window.updates") > 3  # the reply arrived in pieces
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-web-chat.png"), full_page=True)

        assert requests[0]["stream"] is True
        assert requests[0]["messages"] == [{"role": "system", "content": PERSONA},
                                           {"role": "user", "content": "Hello there"}]

        # Edit the persona: the next turn carries it and the history.
        page.fill("#persona", "You are a cat.")
        page.fill("#input", "Meow?")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-finish]")
        second = requests[1]["messages"]
        assert second[0] == {"role": "system", "content": "You are a cat."}
        assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
        assert second[2]["content"] == text

        page.click("#reset")
        assert page.locator(".msg").count() == 0
        page.fill("#input", "Fresh start")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-finish]")
        assert [m["role"] for m in requests[2]["messages"]] == ["system", "user"]
        page.close()


def test_chat_page_works_at_localhost(browser, engine):
    with BackgroundServer(engine) as url:
        page = browser.new_page()
        page.goto(url.replace("127.0.0.1", "localhost") + "/")
        page.wait_for_function("document.getElementById('persona').value.length > 0")
        page.fill("#max-tokens", "5")
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-finish]")
        assert page.locator(".msg.error").count() == 0
        page.close()


def test_rebound_name_gets_nothing(browser, engine):
    """DNS rebinding: rebind.test resolves to 127.0.0.1, but the server refuses its Host."""
    with BackgroundServer(engine) as url:
        page = browser.new_page()
        response = page.goto(url.replace("127.0.0.1", "rebind.test") + "/")
        assert response.status == 403
        assert response.json()["error"]["code"] == "host_not_allowed"
        page.close()


def test_cross_site_post_does_not_generate(browser, engine):
    """A page on another origin POSTs a text/plain body (no CORS preflight) to the server:
    refused by its Origin, so nothing is generated. The same POST to a server started with
    --allowed-hosts '*' (checks off) does generate, so the request did arrive."""
    ask = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    post = """([target, body]) => fetch(target + "/v1/chat/completions", {method: "POST",
        mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}).then(() => true)"""
    with BackgroundServer(engine) as other, BackgroundServer(engine) as target, \
            BackgroundServer(engine, allowed_hosts="*") as open_target:
        page = browser.new_page()
        page.goto(other + "/")  # another origin: same address, another port
        before = engine.stats()["submitted"]
        assert page.evaluate(post, [target, ask])
        assert engine.stats()["submitted"] == before
        assert page.evaluate(post, [open_target, ask])
        assert engine.stats()["submitted"] == before + 1
        page.close()
