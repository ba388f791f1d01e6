"""The server, as a real process on 127.0.0.1, through the official `openai` client and raw HTTP."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from nanoseek import Transformer, preset, save_model
from nanoseek.engine.engine import Engine
from nanoseek.engine.reasoning import split_reasoning
from nanoseek.engine.sampling import SamplingParams
from nanoseek.tokenizer import Tokenizer

from conftest import train_tiny

TOK = Tokenizer.byte_level()
KEY = "sk-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("NANOSEEK_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir),
                                      "--port", str(self.port), "--served-model-name", "m", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(300):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            time.sleep(0.1)
        raise RuntimeError("the server did not come up")

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("served") / "m"
    save_model(model, d, extra_files=TOK.files())
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--api-key", KEY)
    yield s
    log = s.stop()
    assert KEY not in log  # the key never reaches the logs
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def engine_text(model, prompt_ids, **kw) -> str:
    """What the engine itself generates for a prompt: the reference for the server's answers."""
    return Engine(model, TOK).generate([prompt_ids], SamplingParams(**kw))[0].stream.text


CHAT = [{"role": "user", "content": "What is 12 + 30?"}]


def test_chat_stream_and_whole_equal_the_engine(client, model):
    whole = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=0)
    ids, _ = TOK.render_chat(CHAT, add_generation_prompt=True)
    reasoning, content = split_reasoning(engine_text(model, ids, temperature=0, max_tokens=12))
    msg = whole.choices[0].message
    assert (msg.reasoning_content, msg.content) == (reasoning, content)
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 12
    assert whole.choices[0].finish_reason == "length"

    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_n_choices_seed_and_stop(client):
    kw = dict(model="m", messages=CHAT, max_tokens=10, temperature=1.0, seed=5, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.reasoning_content for c in a.choices] == [c.message.reasoning_content for c in b.choices]
    assert len({c.message.reasoning_content for c in a.choices}) > 1  # each choice draws its own tokens
    text = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=0
                                          ).choices[0].message.reasoning_content
    spots = [i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2]]
    assert spots, text
    stop = text[spots[0]:spots[0] + 2]
    cut = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.reasoning_content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_stream_echo_and_prompt_logprobs(client, model):
    prompt = TOK.encode("The river runs")
    whole = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    assert whole.choices[0].text == engine_text(model, prompt, temperature=0, max_tokens=8)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    # lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs=1, one new token
    scored = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0].log_softmax(-1)
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(prompt) + 1
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(float(want[i - 1, prompt[i]]), abs=1e-4)
        top_token, top_lp = next(iter(lp.top_logprobs[i].items()))
        assert top_lp == pytest.approx(float(want[i - 1].max()), abs=1e-4)
    assert scored.choices[0].text.startswith(TOK.decode(prompt))
    two = client.completions.create(model="m", prompt=["a b", "c d"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_concurrent_requests_equal_sequential_ones(client):
    prompts = [[{"role": "user", "content": f"Count to {i}"}] for i in range(8)]

    def ask(msgs):
        return client.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0
                                              ).choices[0].message.reasoning_content

    sequential = [ask(m) for m in prompts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, prompts)) == sequential


BAD = [  # (path, body changes, status, param)
    ("chat", {"temperature": -0.5}, 400, "temperature"),
    ("chat", {"temperature": 2.5}, 400, "temperature"),
    ("chat", {"top_p": 0}, 400, "top_p"),
    ("chat", {"top_p": 1.5}, 400, "top_p"),
    ("chat", {"top_k": -1}, 400, "top_k"),
    ("chat", {"max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"max_tokens": 10_000}, 400, "max_tokens"),
    ("chat", {"n": 0}, 400, "n"),
    ("chat", {"presence_penalty": 3}, 400, "presence_penalty"),
    ("chat", {"frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {"stop": [""]}, 400, "stop"),
    ("chat", {"top_logprobs": 3}, 400, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {"seed": 2 ** 64}, 400, "seed"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": "x" * 600}]}, 400, "messages"),
    ("chat", {"temperature": "hot"}, 400, "temperature"),
    ("chat", {"model": "gpt-9"}, 404, "model"),
    ("completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"logprobs": 25}, 400, "logprobs"),
    ("completions", {"max_tokens": 500, "prompt": "x" * 100}, 400, "max_tokens"),
]


@pytest.mark.parametrize("path, change, status, param", BAD)
def test_bad_requests_name_the_parameter(server, path, change, status, param):
    body = ({"model": "m", "messages": CHAT, "max_tokens": 4} if path == "chat"
            else {"model": "m", "prompt": "hi", "max_tokens": 4})
    body.update(change)
    r = httpx.post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
                   content=json.dumps(body), headers={"Authorization": f"Bearer {KEY}",
                                                      "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_context_messages_give_both_numbers(server):
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "prompt": "x" * 600, "max_tokens": 4})
    assert r.status_code == 400 and "Input length (600) exceeds the model's maximum context length (512)" in r.text
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "prompt": "x" * 500, "max_tokens": 20})
    assert r.status_code == 400 and "Input length (500) plus max_tokens (20)" in r.text and "512" in r.text
    # max_tokens omitted: the rest of the context
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "prompt": "x" * 500, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 12


def test_malformed_bodies_auth_and_limits(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{bad json", b"[]", b"null", b'{"model": "m"}', "\udcff".encode("utf-8", "surrogatepass")):
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=auth)
        assert r.status_code == 400 and "error" in r.json(), (body, r.text)
    assert httpx.post(f"{server.url}/v1/chat/completions", json={}, headers={}).status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.get(f"{server.url}/v1/models", headers=auth)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
    assert httpx.get(server.url + "/health").status_code == 200  # open
    assert "<title>nanoseek chat</title>" in httpx.get(server.url + "/").text  # open
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{server.url}/v1/nothing", headers=auth).status_code == 404
    assert server.health()["status"] == "ok"  # still serving after all of it


LONE = "\ud800"  # json.dumps writes it as the escape \ud800: legal JSON, but not valid Unicode text
SURROGATES = [  # (path, body changes, the field the error names)
    ("chat", {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": "a" + LONE}], "stream": True}, "messages[0].content"),
    ("chat", {"messages": [{"role": "system", "content": LONE}] + CHAT}, "messages[0].content"),
    ("chat", {"messages": CHAT + [{"role": "assistant", "content": "ok", "reasoning_content": LONE}]},
     "messages[1].reasoning_content"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages[0].content[0].text"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": LONE}]}, "messages[0].name"),
    ("chat", {"messages": [{"role": LONE, "content": "hi"}]}, "messages[0].role"),
    ("chat", {"stop": LONE}, "stop"),
    ("chat", {"stop": ["ok", LONE]}, "stop"),
    ("chat", {"model": LONE}, "model"),
    ("chat", {"user": LONE}, "user"),
    ("chat", {"tools": [{"type": "function", "function": {"name": LONE}}]}, "tools[0].function.name"),
    ("chat", {LONE: 1}, None),  # a field name: the error names the body
    ("completions", {"prompt": LONE}, "prompt"),
    ("completions", {"prompt": ["ok", "x" + LONE]}, "prompt[1]"),
    ("completions", {"stop": LONE}, "stop"),
    ("completions", {"stop": [LONE]}, "stop"),
    ("completions", {"suffix": LONE}, "suffix"),
    ("completions", {"model": LONE, "stream": True}, "model"),
]


@pytest.mark.parametrize("path, change, param", SURROGATES)
def test_lone_surrogates_are_rejected_naming_the_field(server, path, change, param):
    body = ({"model": "m", "messages": CHAT, "max_tokens": 4} if path == "chat"
            else {"model": "m", "prompt": "hi", "max_tokens": 4})
    body.update(change)
    raw = json.dumps(body)
    assert "\\ud800" in raw
    r = httpx.post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}", content=raw,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert (param or "the body") in error["message"] and "surrogate" in error["message"]


def test_text_outside_the_bmp_is_served(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    text = "\U0001F600 \u4f60\u597d \U0001D11E"  # an emoji, CJK, a musical symbol: two surrogate pairs
    for ensure_ascii in (True, False):  # as escaped surrogate pairs, and as raw UTF-8
        msgs = [{"role": "system", "content": text}, {"role": "user", "content": [{"type": "text", "text": text}]}]
        r = httpx.post(f"{server.url}/v1/chat/completions", headers=auth, content=json.dumps(
            {"model": "m", "messages": msgs, "max_tokens": 2, "stop": [text], "user": text}, ensure_ascii=ensure_ascii))
        assert r.status_code == 200, r.text
        want = TOK.render_chat([{"role": "system", "content": text}, {"role": "user", "content": text}],
                               add_generation_prompt=True)[0]
        assert r.json()["usage"]["prompt_tokens"] == len(want)  # the text arrived whole
        r = httpx.post(f"{server.url}/v1/completions", headers=auth, content=json.dumps(
            {"model": "m", "prompt": [text, "a" + text], "max_tokens": 2, "stop": text, "echo": True},
            ensure_ascii=ensure_ascii))
        assert r.status_code == 200, r.text
        assert [c["text"].startswith(p) for c, p in zip(r.json()["choices"], [text, "a" + text])] == [True, True]
        assert r.json()["usage"]["prompt_tokens"] == len(TOK.encode(text)) * 2 + 1


def test_admission_control_turns_the_overflow_away(model_dir):
    s = Server(model_dir, "--max-running", "1", "--max-queue", "1", "--quiet")
    try:
        barrier = threading.Barrier(10)

        def ask(_):
            barrier.wait()
            return httpx.post(f"{s.url}/v1/completions", timeout=120,
                              json={"model": "m", "prompt": "go", "max_tokens": 400, "temperature": 0})

        with ThreadPoolExecutor(10) as pool:
            codes = sorted(r.status_code for r in pool.map(ask, range(10)))
        assert codes == [200] * 2 + [503] * 8
        health = s.health()
        assert health["accepted"] == 0 and health["free_cache_tokens"] == health["cache_tokens"]
    finally:
        s.stop()


def test_disconnected_clients_are_cancelled_and_free_the_cache(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "m", "prompt": "flood", "max_tokens": 480, "temperature": 0}
    before = server.health()["cancelled"]
    for _ in range(6):  # streaming clients that read one chunk and hang up
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=auth,
                          timeout=60) as r:
            next(r.iter_lines())
    for _ in range(6):  # non-streaming clients that give up
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/completions", json=body, headers=auth, timeout=0.05)
    small = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 2}, headers=auth, timeout=60)
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
    for _ in range(200):  # the last hang-ups are noticed within the disconnect poll (0.5 s)
        health = server.health()
        if health["accepted"] == 0:
            break
        time.sleep(0.05)
    assert health["accepted"] == 0 and health["free_cache_tokens"] == health["cache_tokens"]
    assert health["cancelled"] - before == 12  # stopped, not run to their 480 tokens


def test_schema_fuzzing_finds_no_server_error(tmp_path):
    """schemathesis against /openapi.json: valid and invalid bodies of every shape, never a 5xx."""
    torch.manual_seed(0)
    save_model(Transformer(preset("tiny", max_position_embeddings=64)), tmp_path / "m", extra_files=TOK.files())
    s = Server(tmp_path / "m", "--max-queue", "1000", "--quiet")
    try:
        run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", s.url + "/openapi.json",
                              "--checks", "not_a_server_error", "--max-examples", "100", "--seed", "1"],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:]
        assert "passed" in run.stdout
    finally:
        log = s.stop()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    """tiny trained for a few seconds to answer one question with <think>...</think> then an answer."""
    turn = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "<think>add two and two</think>The answer is 4."}]
    m = train_tiny(TOK.render_chat(turn)[0] * 40, steps=150)
    d = tmp_path_factory.mktemp("reasoner") / "m"
    save_model(m.eval(), d, extra_files=TOK.files())
    return d


def test_reasoning_content_streamed_and_whole(reasoner):
    s = Server(reasoner, "--quiet")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "What is 2 + 2?"}]
        whole = c.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=40).choices[0]
        assert whole.message.reasoning_content == "add two and two"
        assert whole.message.content == "The answer is 4." and whole.finish_reason == "stop"
        deltas = [ch.choices[0].delta for ch in c.chat.completions.create(
            model="m", messages=msgs, temperature=0, max_tokens=40, stream=True) if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "add two and two"
        assert "".join(d.content or "" for d in deltas) == "The answer is 4."
        # an earlier turn's reasoning is not fed back: the server renders only its content
        again = c.chat.completions.create(model="m", temperature=0, max_tokens=40, messages=msgs + [
            {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "add two and two"}] + msgs)
        assert again.usage.prompt_tokens == len(TOK.render_chat(msgs + [
            {"role": "assistant", "content": "The answer is 4."}] + msgs, add_generation_prompt=True)[0])
    finally:
        s.stop()


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs Debian's chromium (.ci/run installs it)")
def test_web_page_in_headless_chromium(reasoner):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = Server(reasoner, "--api-key", KEY, "--quiet")
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=390,844"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(s.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        driver.find_element(By.ID, "input").send_keys("What is 2 + 2?")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answer")
                   and d.find_element(By.CSS_SELECTOR, ".answer").text == "The answer is 4.")
        assert driver.find_element(By.CSS_SELECTOR, "details.reasoning div").get_attribute("textContent") == \
            "add two and two"
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        # a second turn; Stop (if the reply is still streaming) leaves the page usable
        driver.find_element(By.ID, "input").send_keys("What is 2 + 2?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer")) == 2)
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        driver.quit()
        s.stop()
