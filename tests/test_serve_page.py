"""The chat page at GET / (llama/serve/page.py, llama/serve/static/), in a real browser: Debian's
chromium, headless, driven by selenium through chromedriver (bash scripts/setup.sh test installs
them where it can: as root, with apt-get). The real server runs a tiny random model.

- A message typed into the page gets, streamed, the API's own greedy answer to the same messages
  and max_tokens (asked with the openai client), and so does the next turn; without the API key
  the page says what is wrong.
- Markup a user types, and markup in a streamed reply, show as text: no element is made and no
  script runs. A random model will not write markup on demand, so for the reply the page's own
  stream reader and renderer are fed a stream the test writes: window.fetch is replaced, in the
  page, by one whose body the test sends chunk by chunk. The same fake stream shows Stop
  aborting the request and New chat starting over. On the real server, Stop frees the request's
  slot: the request ends there and never finishes.
- The page's Content-Security-Policy allows no inline script.

A screenshot of the answered chat is saved in tests/artifacts/ (or $LLAMA_TEST_ARTIFACTS)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from .launch import processes_tagged, tagged_env
from .serving import Server

API_KEY = "page-key"
MODEL = "tiny"
WAIT = 120  # seconds a page may take to do something, on a busy 2-core machine
REPO = Path(__file__).resolve().parent.parent


def artifacts() -> Path:
    folder = Path(os.environ.get("LLAMA_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def browser_programs():
    """chromium and chromedriver, or a skip naming which is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver (Debian's chromium-driver)",
                                                                 chromedriver)) if path is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found on PATH: the chat page's browser test needs Debian's "
                    f"chromium and chromium-driver (bash scripts/setup.sh test installs them when run as root "
                    f"with apt-get)")
    return chromium, chromedriver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = browser_programs()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: bash scripts/setup.sh test")
    profile = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox",  # the sandbox cannot start as root (CI)
                "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,700", f"--user-data-dir={profile}",
                "--no-first-run", "--disable-extensions", "--disable-sync", "--disable-background-networking",
                "--disable-component-update"):
        options.add_argument(arg)
    # Both programs given: selenium has nothing to look up or download. The tag finds what is left.
    env = tagged_env()
    service = webdriver.ChromeService(executable_path=chromedriver, env=env, log_output=str(profile / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        for line in processes_tagged(env):  # a renderer quit() did not reach
            subprocess.run(["kill", "-9", line.split(":", 1)[0]], check=False)


@pytest.fixture(scope="module")
def server(llama31_sharp_ckpt):
    """The sharp model (tests/conftest.py): its greedy tokens do not flip on a last-bit change of
    the logits, e.g. a prompt whose prefix comes from the KV cache. Room for a long reply, which Stop ends."""
    srv = Server(llama31_sharp_ckpt, 1, "--max_batch_size", "2", "--max_seq_len", "2048", "--model_name", MODEL,
                 "--api_key", API_KEY)
    yield srv
    assert srv.stop() == 0, srv.output[-3000:]
    srv.assert_nothing_left()


def page_url(server) -> str:
    return server.url.removesuffix("/v1") + "/"


def wait_until(driver, script: str, what: str, *args):
    """Waits until the page's `script` returns something true; returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(
        lambda d: d.execute_script(script, *args), f"the page did not {what} within {WAIT} s")


def open_page(driver, server, key=API_KEY):
    driver.get(page_url(server))
    wait_until(driver, "return document.body.dataset.state === 'idle'", "load")
    if key is not None:
        fill(driver, "api-key", key + "\t")  # leaving the field: the page reads the models with the key
        wait_until(driver, "return document.getElementById('model').textContent === arguments[0]",
                   "show the model's name", MODEL)


def fill(driver, field: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(text)


def click(driver, button: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, button).click()


def messages(driver):
    """The chat as shown: each message's role, text (textContent: exactly what the page put in),
    how it ended and its note."""
    return driver.execute_script("""return [...document.querySelectorAll('#log .message')].map((m) => ({
        role: m.classList.contains('user') ? 'user' : 'assistant', text: m.textContent,
        finish: m.dataset.finish || null, note: m.dataset.note || null}))""")


def status(driver) -> str:
    return driver.execute_script("return document.getElementById('status').textContent")


def send(driver, text: str, shown: int) -> None:
    """Types `text` and presses Enter; waits until the chat shows `shown` messages and is idle."""
    from selenium.webdriver.common.keys import Keys

    fill(driver, "message", text)
    driver.find_element("id", "message").send_keys(Keys.ENTER)
    wait_until(driver, "return document.body.dataset.state === 'idle' && "
                       "document.querySelectorAll('#log .message').length === arguments[0] && "
                       "!document.querySelector('#log .streaming')", "answer", shown)


def test_a_typed_message_gets_the_api_greedy_answer_streamed(browser, server):
    client = server.client(api_key=API_KEY)
    open_page(browser, server, key=None)
    # Without the key: the page says so, and a message gets the server's reason back.
    wait_until(browser, "return document.getElementById('status').textContent.includes('API key')",
               "ask for the API key")
    send(browser, "Hello?", shown=1)
    assert "401" in status(browser) and "API key" in status(browser)
    assert messages(browser)[0]["note"] == "(not answered)"
    assert browser.execute_script("return document.getElementById('message').value") == "Hello?"  # to send again

    fill(browser, "api-key", API_KEY + "\t")
    wait_until(browser, "return document.getElementById('model').textContent === 'tiny'", "show the model")
    click(browser, "new-chat")
    fill(browser, "system", "Be brief.")
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "12")
    dialog = [{"role": "system", "content": "Be brief."}]
    for turn, question in enumerate(["Name a colour.", "And another one?"]):
        send(browser, question, shown=2 * turn + 2)
        dialog.append({"role": "user", "content": question})
        want = client.chat.completions.create(model=MODEL, messages=dialog, temperature=0, max_tokens=12).choices[0]
        assert want.message.content  # something to compare
        shown = messages(browser)
        assert shown[-1] == {"role": "assistant", "text": want.message.content, "finish": want.finish_reason,
                             "note": "(cut at max tokens)" if want.finish_reason == "length" else None}
        assert [m["text"] for m in shown] == [m["content"] for m in dialog[1:]] + [want.message.content]
        dialog.append({"role": "assistant", "content": want.message.content})
    assert status(browser) == ""
    browser.save_screenshot(str(artifacts() / "chat_page.png"))


# The page's fetch replaced by one whose stream the test writes (fake.send(bytes), fake.end()); it
# records each request's body and each abort. Other requests (the models) go to the server.
FAKE_FETCH = """
const realFetch = window.fetch;
window.fake = {bodies: [], aborted: 0};
window.fetch = (url, init) => {
  if (!String(url).endsWith('/chat/completions')) return realFetch(url, init);
  fake.bodies.push(JSON.parse(init.body));
  const body = new ReadableStream({start(controller) {
    fake.send = (bytes) => controller.enqueue(new Uint8Array(bytes));
    fake.end = () => controller.close();
    init.signal.addEventListener('abort', () => {
      fake.aborted += 1;
      controller.error(new DOMException('the user aborted a request', 'AbortError'));
    });
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
};
"""


def event(content=None, finish=None) -> bytes:
    """One server-sent event of a chat stream, as the server writes it (UTF-8, not escaped)."""
    delta = {} if content is None else {"content": content}
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def feed(driver, *pieces: bytes) -> None:
    for piece in pieces:
        driver.execute_script("fake.send(arguments[0])", list(piece))


def fake_stream(driver) -> None:
    driver.execute_script(FAKE_FETCH)


def start(driver, text: str, requests: int) -> None:
    """Types `text`, presses Enter, and waits for the page's `requests`th request to be sent."""
    from selenium.webdriver.common.keys import Keys

    fill(driver, "message", text)
    driver.find_element("id", "message").send_keys(Keys.ENTER)
    wait_until(driver, "return fake.bodies.length === arguments[0]", "send its request", requests)


def elements_in_messages(driver) -> int:
    return driver.execute_script("return document.querySelectorAll('#log .message *').length")


def test_markup_shows_as_text(browser, server):
    open_page(browser, server)
    fill(browser, "max-tokens", "4")
    typed = '<script>window.pwned = 1</script><b>x</b><img src="x" onerror="window.pwned = 1">'
    send(browser, typed, shown=2)  # to the real server
    assert messages(browser)[0] == {"role": "user", "text": typed, "finish": None, "note": None}

    fake_stream(browser)
    start(browser, "Write some HTML.", requests=1)
    first, second = '<script>window.pwned = 2</script>', '<b>bold</b> <img src=x onerror="window.pwned = 3"> é🙂'
    whole = event(first)
    feed(browser, whole[:9], whole[9:])  # an event split across two chunks
    # Shown as it streams, before the reply ends.
    wait_until(browser, "const m = document.querySelectorAll('#log .message.assistant'); "
                        "return m[m.length - 1].textContent === arguments[0]", "show the first chunk", first)
    rest = event(second) + event(finish="stop") + b"data: [DONE]\n\n"
    split = rest.index("🙂".encode()) + 2  # inside the emoji's four bytes
    feed(browser, rest[:split], rest[split:])
    wait_until(browser, "return document.body.dataset.state === 'idle'", "finish the reply")
    assert messages(browser)[-1] == {"role": "assistant", "text": first + second, "finish": "stop", "note": None}
    assert elements_in_messages(browser) == 0  # no <script>, <b> or <img> was made
    assert browser.execute_script("return typeof window.pwned") == "undefined"


def test_the_page_allows_no_inline_script(browser, server):
    response = httpx.get(page_url(server))
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    policy = {d.split()[0]: d.split()[1:] for d in response.headers["Content-Security-Policy"].split("; ")}
    assert policy["script-src"] == ["'self'"] and policy["default-src"] == ["'none'"]
    for path in ("static/chat.js", "static/chat.css"):
        assert httpx.get(page_url(server) + path).status_code == 200
    # In the browser, a script element with inline code, put into the page, does not run.
    open_page(browser, server, key=None)
    assert browser.execute_script("""const s = document.createElement('script');
        s.textContent = 'window.inline = 1'; document.body.append(s); return typeof window.inline""") == "undefined"


def test_stop_keeps_what_was_shown_and_new_chat_starts_over(browser, server):
    open_page(browser, server)
    fill(browser, "system", "Be brief.")
    fill(browser, "temperature", "0.5")
    fill(browser, "max-tokens", "7")
    fill(browser, "stop-at", "END\nThe end")  # two stop strings, one per line
    fake_stream(browser)
    start(browser, "first", requests=1)
    feed(browser, event("partial"))
    wait_until(browser, "return document.querySelector('#log .message.assistant').textContent === 'partial'",
               "show the partial reply")
    click(browser, "stop")
    wait_until(browser, "return document.body.dataset.state === 'idle'", "stop")
    assert browser.execute_script("return fake.aborted") == 1  # the request itself was aborted
    assert messages(browser)[-1] == {"role": "assistant", "text": "partial", "finish": "stopped", "note": "(stopped)"}
    assert status(browser) == "Stopped."

    start(browser, "second", requests=2)  # the stopped reply is part of the conversation
    assert browser.execute_script("return fake.bodies[1]") == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                     {"role": "assistant", "content": "partial"}, {"role": "user", "content": "second"}],
        "stream": True, "temperature": 0.5, "max_tokens": 7, "stop": ["END", "The end"]}
    feed(browser, event("done", "stop"), b"data: [DONE]\n\n")
    wait_until(browser, "return document.body.dataset.state === 'idle'", "finish the reply")

    click(browser, "new-chat")
    assert messages(browser) == []
    start(browser, "third", requests=3)
    assert browser.execute_script("return fake.bodies[2].messages") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "third"}]
    click(browser, "stop")  # before any of the reply: the message goes back to the box
    wait_until(browser, "return document.body.dataset.state === 'idle'", "stop")
    assert messages(browser) == [{"role": "user", "text": "third", "finish": None,
                                  "note": "(stopped before the answer began)"}]
    assert browser.execute_script("return document.getElementById('message').value") == "third"

    # New chat during a reply: the request is aborted and nothing of it comes back into the new chat.
    start(browser, "fourth", requests=4)
    feed(browser, event("half"))
    wait_until(browser, "return document.querySelector('#log .message.assistant')?.textContent === 'half'",
               "show the reply")
    click(browser, "new-chat")
    wait_until(browser, "return fake.aborted === 3", "abort the request")
    start(browser, "fifth", requests=5)
    assert browser.execute_script("return fake.bodies[4].messages") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "fifth"}]
    assert [m["text"] for m in messages(browser)] == ["fifth", ""]


def metric(server, name: str) -> float:
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_stop_on_the_real_server_frees_the_slot(browser, server):
    """The page's Stop closes the connection, and the server ends the request there: its slot is
    free again and it never finishes (a finished request adds its tokens to the counter)."""
    open_page(browser, server)
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "1500")  # seconds of decoding: it still runs when Stop is pressed
    generated = metric(server, "llama_generated_tokens_total")
    fill(browser, "message", "Tell me a long story.")
    click(browser, "send")
    wait_until(browser, "return document.querySelector('#log .message.assistant').textContent.length > 0",
               "show the start of the reply")
    click(browser, "stop")
    wait_until(browser, "return document.body.dataset.state === 'idle'", "stop")
    assert messages(browser)[-1]["finish"] == "stopped"
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT, poll_frequency=0.1).until(
        lambda _: metric(server, "llama_requests_running") == 0 and metric(server, "llama_free_slots") == 2,
        f"the server did not free the stopped request's slot within {WAIT} s")
    assert metric(server, "llama_generated_tokens_total") == generated  # it was ended, not finished
