"""End to end in a real browser: headless Chromium (Debian's ``chromium``, driven by python playwright) loads the
page at ``/``, attaches an example image, asks, and sees the answer stream in; a screenshot is saved."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
EXAMPLE = Path(__file__).resolve().parents[2] / "kimivl" / "assets" / "examples" / "shape.png"
QUESTION = "What shape is in the picture?"

sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed (pip install "
                                                             "playwright; never run `playwright install`)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file() and shutil.which("chromium") is None,
                                reason="no chromium browser (apt-get install -y --no-install-recommends chromium)")


def test_page_streams_an_answer_about_an_example_image(server, tiny, h, tmp_path):
    expected = h.reference_answer(tiny, [{"role": "user", "content": [{"type": "image", "image": str(EXAMPLE)},
                                                                      {"type": "text", "text": QUESTION}]}],
                                  max_new_tokens=64)
    executable = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.set_default_timeout(60_000)
            failed: list[str] = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("pageerror", lambda e: failed.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'kimivl-tiny'")
            # count how often the answer's text changes while it streams in
            page.evaluate("""() => { window.updates = 0; new MutationObserver((records) => {
                for (const r of records)
                  if (r.target.matches && r.target.matches('.msg.assistant .text')) window.updates++;
              }).observe(document.getElementById('log'), {subtree: true, childList: true}); }""")
            page.set_input_files("#file", str(EXAMPLE))
            page.wait_for_selector("#attachments img")
            page.fill("#max-tokens", "64")
            page.fill("#prompt", QUESTION)
            page.click("#send")
            bubble = page.wait_for_selector(".msg.assistant[data-state=done]")
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            answer = bubble.eval_on_selector(".text", "e => e.textContent")
            meta = bubble.eval_on_selector(".meta", "e => e.textContent")
            updates = page.evaluate("window.updates")
            user_image = page.eval_on_selector(".msg.user img", "e => e.src.slice(0, 22)")
            page.fill("#prompt", "And its shape?")  # the follow-up reads the first turn from the prompt cache
            page.click("#send")
            page.locator(".msg.assistant[data-state=done]").nth(1).wait_for()
            follow_up_meta = page.eval_on_selector_all(".msg.assistant .meta", "es => es[1].textContent")
        finally:
            browser.close()
    assert answer == expected
    assert user_image == "data:image/png;base64,"
    assert " image" in meta and "prompt" in meta
    cached = int(follow_up_meta.split(" cached")[0].rsplit(" ", 1)[-1])
    assert cached > int(meta.split("prompt ")[1].split(" tokens")[0]) // 2, follow_up_meta
    assert updates > 3  # several deltas arrived before the end
    assert not failed
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_page_shows_a_thinking_models_reasoning_apart(tiny, h):
    """With --reasoning-parser the page puts the reasoning in a folded "thinking" box above the answer."""
    reasoning, answer = "The shape is round.", "A blue circle."
    model, processor = tiny
    ids = processor.tokenizer.encode(f"◁think▷ {reasoning} ◁/think▷ {answer}") + [model.generation_config.eos_ids()[0]]
    server = h.start_server(tiny, reasoning_parser="kimi_vl", **h.TEST_LIMITS)
    executable = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    try:
        with h.scripted_answer(model, ids), sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
                                        timeout=60_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(server.url + "/")
                page.wait_for_function("document.getElementById('model').textContent === 'kimivl-tiny'")
                page.fill("#prompt", QUESTION)
                page.click("#send")
                bubble = page.wait_for_selector(".msg.assistant[data-state=done]")
                shown = bubble.eval_on_selector(".text", "e => e.textContent")
                thinking = bubble.eval_on_selector("details.thinking div", "e => e.textContent")
                folded = bubble.eval_on_selector("details.thinking", "e => !e.open")
            finally:
                browser.close()
    finally:
        server.stop()
    assert (shown, thinking, folded) == (answer, reasoning, True)


def test_page_sends_a_video_and_a_pdf(server, tiny, h, make_video, make_pdf, tmp_path):
    """Attached videos and PDFs go out as video_url / file parts and get the library's answer."""
    video = make_video(tmp_path / "clip.mp4", frames=25, fps=10)
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf([(120, 90)]))
    expected = h.reference_answer(tiny, [{"role": "user", "content": [
        {"type": "video", "video": str(video)}, {"type": "document", "document": pdf.read_bytes()},
        {"type": "text", "text": QUESTION}]}], max_new_tokens=16)
    executable = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS, timeout=60_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'kimivl-tiny'")
            page.set_input_files("#file", [str(video), str(pdf)])
            page.wait_for_selector("#attachments .chip.document")
            chips = page.eval_on_selector_all("#attachments .chip", "es => es.map(e => e.textContent)")
            page.fill("#max-tokens", "16")
            page.fill("#prompt", QUESTION)
            page.click("#send")
            bubble = page.wait_for_selector(".msg.assistant[data-state=done]")
            answer = bubble.eval_on_selector(".text", "e => e.textContent")
            sent = page.eval_on_selector_all(".msg.user .chip", "es => es.length")
        finally:
            browser.close()
    assert chips == ["video: clip.mp4", "PDF: doc.pdf"] and sent == 2
    assert answer == expected
