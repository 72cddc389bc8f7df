"""`qlora serve` against real clients: the `openai` Python package and curl, on 127.0.0.1, over
builtin:tiny with two adapters `qlora run` trained here. Every answer (chat and completions, plain
and streamed, one at a time and 50 at once) equals `qlora generate --adapter` for the same prompt,
seed and sampling settings; errors come back as OpenAI's error objects with 4xx codes; SIGTERM
stops the server with status 0; an adapter trained on another base is refused (docs/serving.md)."""
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import CACHE, ROOT, lib, qlora_bin, report, run_qlora, version

RUNS = CACHE / "serve-runs"
TEMPLATE = "alpaca"  # the demo data's template (recipes/demo.yaml)
SAMPLING = dict(temperature=0.8, top_p=0.9, seed=5)
MAX_TOKENS = 24
PROMPTS = ["What is a lease?", "What is a security deposit?"]


def train(name: str, model: str, *overrides) -> Path:
    """A few steps of the demo recipe on `model`; returns the adapter folder (made once per suite)."""
    out = RUNS / name
    run_qlora("run", ROOT / "recipes" / "demo.yaml", f"model.path={model}", f"output.dir={out}", "train.max_steps=6",
              "train.lr=0.02", "logging.report=false", "train.eval_every=0", "train.save_every=0", *overrides,
              "--overwrite", "--no-samples")
    return out / "adapter"


@pytest.fixture(scope="module")
def adapters():
    legal = train("legal", "builtin:tiny", "train.seed=1")
    medical = train("medical", "builtin:tiny", "train.seed=2", "lora.rank=4", "lora.alpha=8")
    # Another base: the same model quantized to a bitsandbytes folder is other files, so another fingerprint.
    other_model = RUNS / "tiny-bnb"
    run_qlora("quantize", "builtin:tiny", "-o", other_model, "--force")
    other = train("other", str(other_model), "train.seed=3")
    return {"legal": legal, "medical": medical, "other": other}


class Server:
    def __init__(self, *args, ready=True):
        self.proc = subprocess.Popen([str(qlora_bin()), "serve", "--model", "builtin:tiny", "--chat-template", TEMPLATE,
                                      "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines = []
        self.port = None
        if ready:
            deadline = time.time() + 60
            while time.time() < deadline:
                line = self.proc.stdout.readline()
                if not line:
                    break
                self.lines.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", line)
                if m:
                    self.port = int(m.group(1))
                    break
            assert self.port, "server did not start:\n" + "".join(self.lines) + self.rest()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def rest(self, timeout=20) -> str:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.lines.append(self.rest())
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(adapters):
    s = Server("--adapter", f"legal={adapters['legal']}", "--adapter", f"medical={adapters['medical']}",
               "--parallel", 2, "--queue", 64, "--max-tokens", 64, "--context", 256, "--max-body-kib", 64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = lib("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class Reply:
    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def http(url: str, body=None, raw: bytes | None = None, timeout=60) -> Reply:
    """A plain HTTP request (the standard library's client: no second HTTP library to pin)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


def generate(adapters, model: str, prompt: str, chat: bool) -> str:
    """What `qlora generate` prints for the same request (its text line, without the newline)."""
    args = ["generate", "--model", "builtin:tiny", "--device", "cpu", "--prompt", prompt,
            "--max-new-tokens", MAX_TOKENS, "--temperature", SAMPLING["temperature"], "--top-p", SAMPLING["top_p"],
            "--seed", SAMPLING["seed"]]
    if model != "base":
        args += ["--adapter", adapters[model]]
    if chat:
        args += ["--chat", "--chat-template", TEMPLATE]
    out = run_qlora(*args).stdout
    if chat:
        return out[:-1]
    return out.split("\n", 1)[1][:-1]  # after the "ids: ..." line


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    report("serve.models", "GET /v1/models through the openai client", version("openai"), f"ids {ids}")
    assert ids == ["base", "legal", "medical"]


@pytest.mark.parametrize("model", ["base", "legal", "medical"])
def test_answers_equal_qlora_generate(client, adapters, model):
    chat_ref = [generate(adapters, model, p, chat=True) for p in PROMPTS]
    chats, streamed = [], []
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_TOKENS, **SAMPLING)
        chats.append(r.choices[0].message.content)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= MAX_TOKENS
        parts = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_TOKENS, stream=True,
                                               **SAMPLING)
        streamed.append("".join(c.choices[0].delta.content or "" for c in parts if c.choices))
    completion_ref = generate(adapters, model, PROMPTS[0], chat=False)
    completion = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, **SAMPLING)
    completion_streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, stream=True, **SAMPLING))
    same = chats == chat_ref and streamed == chat_ref and completion.choices[0].text == completion_ref == \
        completion_streamed
    report("serve.equals_generate", f"{model}: openai client chat + completions (plain and streamed) vs qlora "
           f"generate --chat/--prompt, seed {SAMPLING['seed']}", version("openai"),
           f"equal: {same}; first reply {chat_ref[0][:40]!r}")
    assert chats == chat_ref
    assert streamed == chat_ref
    assert completion.choices[0].text == completion_ref
    assert completion_streamed == completion_ref
    assert any(chat_ref), "every reply empty: the comparison would prove nothing"


def test_adapters_answer_differently(client):
    answers = {m: client.chat.completions.create(model=m, messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
               for m in ("base", "legal", "medical")}
    assert len(set(answers.values())) == 3, answers


def test_stop_sequences(client, adapters):
    """`stop` cuts the answer before the first stop string (plain and streamed), finish_reason "stop"."""
    full = generate(adapters, "base", PROMPTS[0], chat=True)
    stop = next((full[i:i + 3] for i in range(1, len(full) - 3) if re.fullmatch(r"[ -~]{3}", full[i:i + 3])), None)
    assert stop, f"no ASCII run in {full!r} to stop at"
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=MAX_TOKENS, stop=[stop], **SAMPLING)
    parts = client.chat.completions.create(model="base", messages=msgs, max_tokens=MAX_TOKENS, stop=stop, stream=True,
                                           **SAMPLING)
    streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    want = full[:full.index(stop)]
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "stop"
    assert streamed == want


def test_curl(server, adapters):
    body = {"model": "legal", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": MAX_TOKENS,
            **SAMPLING}
    r = subprocess.run(["curl", "-sS", "-H", "Content-Type: application/json", "-d", json.dumps(body),
                        server.url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == generate(adapters, "legal", PROMPTS[1], chat=True)
    s = subprocess.run(["curl", "-sSN", "-d", json.dumps({**body, "stream": True}), server.url + "/v1/chat/completions"],
                       capture_output=True, text=True, timeout=60)
    events = [e for e in s.stdout.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), s.stdout[:500]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == answer["choices"][0]["message"]["content"]
    h = subprocess.run(["curl", "-sS", server.url + "/health"], capture_output=True, text=True, timeout=30)
    assert json.loads(h.stdout)["status"] == "ok"
    report("serve.curl", "curl: chat completion, SSE stream ending in [DONE], /health", "curl",
           f"{len(events) - 1} events; equal to the plain answer: {text == answer['choices'][0]['message']['content']}")


def test_50_concurrent_requests(client):
    def ask(i):
        m = ("base", "legal", "medical")[i % 3]
        r = client.chat.completions.create(model=m, messages=[{"role": "user", "content": PROMPTS[i % 2]}],
                                           max_tokens=16, temperature=0.8, seed=i)
        return m, i, r.choices[0].message.content
    t0 = time.time()
    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(ask, range(50)))
    seconds = time.time() - t0
    # The same requests one at a time give the same answers: concurrency changes nothing.
    again = [ask(i) for i in (0, 1, 2, 49)]
    report("serve.concurrency", "50 concurrent chat requests (3 models, --parallel 2, --queue 64)", version("openai"),
           f"all answered in {seconds:.1f} s; sequential repeats equal: {all(got[i] == a for i, a in zip((0, 1, 2, 49), again))}")
    assert len(got) == 50 and all(isinstance(t, str) for _, _, t in got)
    assert seconds < 120
    for i, a in zip((0, 1, 2, 49), again):
        assert got[i] == a


def test_errors_are_openai_error_objects(server, client):
    openai = lib("openai")
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = {
        "bad JSON": (http(url, raw=b'{"model": "base", "messages": ['), 400, None),
        "unknown model": (http(url, {"model": "nope", "messages": msgs}), 404, "model_not_found"),
        "too many tokens": (http(url, {"model": "base", "messages": msgs, "max_tokens": 65}), 400,
                            "max_tokens_exceeded"),
        "over-long prompt": (http(url, {"model": "base", "messages": [{"role": "user", "content": "lease " * 200}]}),
                             400, "context_length_exceeded"),
        "body too large": (http(url, raw=b"x" * (100 * 1024)), 413, "request_too_large"),
        "unknown route": (http(server.url + "/v2/nothing"), 404, "unknown_url"),
        "bad parameter": (http(url, {"model": "base", "messages": msgs, "temperature": 9}), 400, None),
    }
    for what, (r, status, code) in cases.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, (what, err)
        assert err["message"], what
        assert err["code"] == code, (what, err)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=msgs, max_tokens=100000)
    report("serve.errors", "bad JSON, unknown model, too many tokens, over-long prompt, 413, unknown route",
           version("openai"), f"statuses {[r.status_code for r, _, _ in cases.values()]}; "
           f"openai raises {type(e.value).__name__}")


def test_queue_full_gets_429(adapters):
    s = Server("--parallel", 1, "--queue", 0, "--max-tokens", 400, "--context", 512)
    try:
        body = {"model": "base", "prompt": "A lease", "max_tokens": 400, "temperature": 1.0}
        with ThreadPoolExecutor(6) as pool:
            statuses = sorted(r.status_code for r in pool.map(lambda _: http(s.url + "/v1/completions", body),
                                                             range(6)))
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
    finally:
        assert s.stop() == 0


def test_sigterm_stops_cleanly(adapters):
    s = Server("--adapter", f"legal={adapters['legal']}")
    t0 = time.time()
    rc = s.stop()
    out = "".join(s.lines)
    report("serve.sigterm", "SIGTERM to a serving qlora", "-", f"exit {rc} in {time.time() - t0:.2f} s")
    assert rc == 0, out
    assert "serve: stopped" in out


def test_adapter_of_another_base_is_refused(adapters):
    r = run_qlora("serve", "--model", "builtin:tiny", "--port", "0", "--adapter", f"other={adapters['other']}",
                  check=False, timeout=60)
    cfg = json.loads((adapters["other"] / "adapter_config.json").read_text())
    assert not any(k.startswith("qlora") for k in cfg), "a qlora_ key in adapter_config.json makes PEFT warn"
    assert r.returncode == 1, r.stdout + r.stderr
    assert "trained on another base model" in r.stderr and "--allow-other-base" in r.stderr
    fps = re.findall(r"\b[0-9a-f]{16}\b", r.stderr)
    assert len(set(fps)) == 2, r.stderr
    g = run_qlora("generate", "--model", "builtin:tiny", "--device", "cpu", "--prompt-ids", "1 2", "--adapter",
                  adapters["other"], check=False)
    assert g.returncode == 1 and "trained on another base model" in g.stderr
    report("serve.base_lock", "serve/generate with an adapter trained on another base (a bnb copy of the model)",
           "-", f"refused, exit {r.returncode}, fingerprints {sorted(set(fps))}")
