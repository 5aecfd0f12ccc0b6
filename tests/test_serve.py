"""The OpenAI-compatible server (`kiln serve`), driven by the official `openai` client over 127.0.0.1, and
the command line around it. The model is conftest's tiny Llama with SmolLM2's real tokenizer
(`smol_artifact`); the sampling and text pieces under the server are tested in test_sampling.py."""

import json
import math
import threading
import time

import pytest

import kiln
from kiln.runtime.sampling import SamplingParams

MODEL = "tiny-smol"


@pytest.fixture(scope="module")
def engine(smol_artifact):
    return kiln.load(smol_artifact, kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def api(smol_artifact):
    """`kiln serve`'s app on a free port of 127.0.0.1, uvicorn on a thread; yields (OpenAIServer, base url)."""
    import uvicorn

    from kiln.runtime.openai_api import OpenAIServer
    from kiln.runtime.serving import Server

    srv = Server(kiln.load(smol_artifact, kv_cache_tokens=2048), max_batch=4)
    app = OpenAIServer(srv, MODEL, max_queue=4)
    web = uvicorn.Server(uvicorn.Config(app.app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=web.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not web.started:
        assert time.time() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = web.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}"
    web.should_exit = True
    t.join(timeout=30)
    assert not t.is_alive()
    assert len(srv.engine.pool.free) == srv.engine.pool.num_pages  # shutdown closed the Server: all pages back


@pytest.fixture(scope="module")
def client(api):
    import openai

    return openai.OpenAI(base_url=api[1] + "/v1", api_key="none", max_retries=0, timeout=60)


def _idle(app, timeout=10.0):
    """Wait until the scheduler holds no sequence and no KV page (cancel is asynchronous)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = app.server
        if not s.running and not s.waiting and s.kv.used == 0 and app.active == 0:
            return True
        time.sleep(0.02)
    return False


# -- the HTTP server through the openai client -------------------------------------------------------
def test_models_health_and_chat_equals_generate(api, client, engine):
    import httpx2 as httpx

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(api[1] + "/health").json() == {"status": "ok"}
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12)
    ref = engine.generate(msgs, SamplingParams(max_tokens=12))[0]
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_ids) and r.usage.completion_tokens == len(ref.token_ids)


def test_streaming_chat_and_completion_join_to_the_whole_text(client):
    msgs = [{"role": "user", "content": "Count to five: ünïcödé ✓"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    w = client.completions.create(model=MODEL, prompt="Once upon", temperature=0, max_tokens=15)
    s = client.completions.create(model=MODEL, prompt="Once upon", temperature=0, max_tokens=15, stream=True)
    assert "".join(c.choices[0].text for c in s) == w.choices[0].text and w.usage.completion_tokens == 15


def test_stop_strings_end_the_text_streamed_or_not(client):
    kw = dict(model=MODEL, prompt="Once upon", temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    base = client.completions.create(**kw).choices[0].text
    stop = base[len(base) // 2 : len(base) // 2 + 4]
    r = client.completions.create(**kw, stop=[stop, "zzzz-never"])
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_n_completions_and_logprobs(client):
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, n=2, temperature=1.0, seed=11, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 16 or any(c.finish_reason == "stop" for c in r.choices)
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
        assert math.isclose(e.logprob, tops[0])  # greedy: the chosen token is the most likely
    c = client.completions.create(model=MODEL, prompt="Hi", temperature=0, max_tokens=5, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)


def test_json_schema_and_json_object_responses_parse(client):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "boolean"},
            "colour": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "colour", "count"],
        "additionalProperties": False,
    }
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Reply in JSON."}],
            temperature=temperature,
            seed=5,
            max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
    # any object: this random model opens a key and never closes it for most prompts; this one it closes
    r = client.completions.create(
        model=MODEL,
        prompt="Give me an object",
        temperature=0,
        max_tokens=60,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert r.choices[0].text.startswith("{") and r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_bad_requests_get_400_naming_the_field(api, client):
    import httpx2 as httpx
    import openai

    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(temperature=5), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=100000), "max_tokens"),
        (dict(extra_body={"top_k": 1.5}), "top_k"),
        (dict(extra_body={"max_token": 5}), "max_token"),  # a misspelt field is not ignored
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(response_format={"type": "xml"}), "response_format.type"),
    ]
    for kw, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs, **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == field, (kw, e.value.body)
        assert e.value.body["type"] == "invalid_request_error" and field.split(".")[0] in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=msgs)
    body = '{"model": "MODEL", "prompt": "x", "temperature": NaN}'.replace("MODEL", MODEL)  # json reads NaN
    r = httpx.post(api[1] + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    with pytest.raises(openai.RateLimitError):  # 9 sequences > max_batch 4 + max_queue 4
        client.completions.create(model=MODEL, prompt="x", n=9, max_tokens=2)
    assert _idle(api[0])


def test_a_closed_stream_cancels_and_returns_every_page(api, client):
    app = api[0]
    before = app.server.metrics()["requests_cancelled"]
    stream = client.completions.create(
        model=MODEL,
        prompt="Go on and on",
        max_tokens=200,
        temperature=0.8,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    for c in stream:
        got += bool(c.choices and c.choices[0].text)
        if got >= 3:
            break
    stream.close()
    assert _idle(app), (app.server.running, app.server.kv.used, app.active)
    assert app.server.metrics()["requests_cancelled"] == before + 1


def test_a_client_that_gives_up_on_a_whole_response_cancels_it(api, client):
    import openai

    app = api[0]
    before = app.server.metrics()["requests_cancelled"]
    with pytest.raises(openai.APITimeoutError):  # 8 x 240 tokens take well over the client's 0.1 s
        client.with_options(timeout=0.1).completions.create(
            model=MODEL, prompt="x", n=8, max_tokens=240, extra_body={"ignore_eos": True}
        )
    assert _idle(app), (app.server.running, app.server.kv.used, app.active)
    assert app.server.metrics()["requests_cancelled"] == before + 8


def test_metrics_parse_as_prometheus_text(api, client):
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="metrics", temperature=0, max_tokens=4)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(api[1] + "/metrics").text)}
    for name in (
        "kiln_time_to_first_token_seconds",
        "kiln_time_per_output_token_seconds",
        "kiln_requests_waiting",
        "kiln_requests_running",
        "kiln_kv_pages_in_use",
        "kiln_preemptions",
        "kiln_prefix_cache_hit_tokens",
        "kiln_generation_tokens",
    ):
        assert name in fams, name
    count = [s.value for s in fams["kiln_time_to_first_token_seconds"].samples if s.name.endswith("_count")][0]
    assert count >= 1 and fams["kiln_generation_tokens"].samples[0].value >= 4
    assert fams["kiln_kv_pages_in_use"].type == "gauge" and fams["kiln_preemptions"].type == "counter"


# -- the command line ---------------------------------------------------------------------------------
def _kiln(*args, **kw):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=300, **kw)


def test_cli_run_json_chat_and_early_refusals(smol_artifact):
    r = _kiln("run", smol_artifact, "--prompt", "Hi", "--prompt", "Yo", "--n", "2", "--temperature", "1", "--json",
              "--max-tokens", "4", "--no-verify")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["prompt"], x["index"]) for x in rows] == [("Hi", 0), ("Hi", 1), ("Yo", 0), ("Yo", 1)]
    assert all(x["completion_tokens"] == len(x["token_ids"]) <= 4 for x in rows)
    r = _kiln("chat", smol_artifact, "--system", "Be brief.", "--max-tokens", "4",
              input="hello\n/reset\nhi again\n/bogus\n/exit\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "(conversation cleared)" in r.stdout and "unknown command /bogus" in r.stdout
    assert _kiln("chat", smol_artifact, input="").returncode == 0  # EOF at the prompt ends it cleanly
    r = _kiln("run", smol_artifact, "--prompt", "x", "--temperature", "nan")
    assert r.returncode == 1 and "temperature must be" in r.stderr and "Traceback" not in r.stderr
    r = _kiln("build", "smollm2-135m", "-o", "unused", "--quant", "in4_g128")
    assert r.returncode == 1 and "did you mean 'int4_g128'" in r.stderr and "loading" not in r.stderr
    r = _kiln("build", "smollm2-135m", "-o", "unused", "--target", "cuda", "--quant", "int4_g12")
    assert r.returncode == 1 and "multiples of 16 columns" in r.stderr and "loading" not in r.stderr  # CPU takes g12
    r = _kiln("build", "smollm2-135m", "-o", "unused", "--passes", "canonicalize,fuse-norm")
    assert r.returncode == 1 and "did you mean 'fuse-norms'" in r.stderr
    r = _kiln("run", "--help")
    assert "(default: 64)" in r.stdout and "--no-verify" in r.stdout


def test_cli_serve_answers_and_drains_on_sigterm(smol_artifact):
    import signal
    import socket
    import subprocess
    import sys

    import httpx2 as httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln.cli", "serve", smol_artifact, "--port", str(port), "--model-name", "m",
           "--max-batch", "2", "--log-level", "warning", "--no-verify"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
        # SIGTERM while a stream is in flight: it still runs to its end, then the server exits 0
        stream = c.completions.create(
            model="m",
            prompt="go",
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].usage.completion_tokens == 200
        assert [x.choices[0].finish_reason for x in chunks if x.choices][-1] == "length"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
