"""`verispec serve` over real HTTP: real server processes on loopback, tiny random models.

Three servers: a well-behaved one (API keys, a chat template), one whose proposer is slow (to
fill the queue, pass deadlines and disconnect mid-stream), and one whose proposer always fails
(exact output anyway, circuit breaker, rate limits).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import run_verispec
from tests.serving import ServerProcess, metric
from verispec.audit.store import AuditStore

# Greedy continuations of this prompt on the tiny llama run to the length limit (no early EOS),
# so a request with it lasts as many rounds as asked for.
LONG_PROMPT = "t4 t7 t10 t13 t16"
PROMPTS = [LONG_PROMPT, "t5 t9 t13 t17 t21", "t3 t5 t7 t9 t11"]
KEY = "sk-alice-0123456789"


@pytest.fixture(scope="module")
def chat_target(tiny_models, tmp_path_factory) -> str:
    """The tiny llama with a chat template; the folder name is the served model name."""
    path = tmp_path_factory.mktemp("chat") / "chat-llama"
    shutil.copytree(tiny_models["llama"], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t9{% endif %}"
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(chat_target, tiny_models, tmp_path_factory):
    proc = ServerProcess(
        ["--target", chat_target, "--draft", tiny_models["llama-draft"], "--max-new-tokens", "16", "--log-level", "info"],
        log_dir=tmp_path_factory.mktemp("logs"),
        env={"VERISPEC_API_KEYS": f"alice:{KEY},sk-other"},
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


@pytest.fixture(scope="module")
def slow_server(tiny_models, tmp_path_factory):
    """Every proposal sleeps 0.25 s: a round takes that long, whatever the machine."""
    proc = ServerProcess(
        ["slow:0.25", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--depth", "2",
         "--max-running", "1", "--max-waiting", "1", "--deadline-s", "4",
         "--breaker-min-acceptance", "0"],
        module="tests.faulty_server", log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


@pytest.fixture(scope="module")
def failing_server(tiny_models, tmp_path_factory):
    proc = ServerProcess(
        ["fail", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--depth", "3",
         "--breaker-max-failures", "3", "--breaker-cooldown-s", "600", "--rate-limit-rpm", "3",
         "--api-keys", "bob:sk-bob,carol:sk-carol,dave:sk-dave"],
        module="tests.faulty_server", log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


def post(server: ServerProcess, path: str, body: dict | str, key: str | None = KEY, **headers) -> httpx.Response:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **headers}, timeout=60)


def stream_events(server: ServerProcess, body: dict, key: str | None = KEY) -> list:
    """The SSE data payloads of a streaming request, decoded ([DONE] as the string)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def cli_generate(target: str, draft: str, prompt: str, max_new_tokens: int, *extra: str) -> str:
    result = run_verispec("generate", "--target", target, "--draft", draft, "--max-new-tokens", str(max_new_tokens), *extra, prompt)
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


# -- exactness ------------------------------------------------------------------------------------


def test_greedy_results_equal_verispec_generate(server, chat_target, tiny_models):
    for prompt in PROMPTS:
        expected = cli_generate(chat_target, tiny_models["llama-draft"], prompt, 24)
        assert expected == cli_generate(chat_target, tiny_models["llama-draft"], prompt, 24, "--depth", "0")
        body = {"model": "chat-llama", "prompt": prompt, "max_tokens": 24, "temperature": 0}

        response = post(server, "/v1/completions", body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"] == expected

        events = stream_events(server, {**body, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]
        assert chunks[-1]["usage"] == response.json()["usage"]


def test_sampling_with_a_seed_reproduces(server):
    body = {"model": "chat-llama", "prompt": LONG_PROMPT, "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "top_k": 20, "seed": 11}
    first, second = post(server, "/v1/completions", body).json(), post(server, "/v1/completions", body).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


CONTROLS = {"frequency_penalty": 0.9, "presence_penalty": 0.5, "repetition_penalty": 1.3, "logit_bias": {"5": 4.0, "9": -100}, "min_tokens": 6}


def test_controls_over_http_equal_verispec_generate_and_hold_under_speculation(server, chat_target, tiny_models):
    """Penalties, bias and a token floor: the server's output is `verispec generate`'s with the same
    flags, at depth 0 and speculating alike."""
    flags = ("--frequency-penalty", "0.9", "--presence-penalty", "0.5", "--repetition-penalty", "1.3",
             "--logit-bias", '{"5": 4.0, "9": -100}', "--min-tokens", "6")  # fmt: skip
    for prompt in PROMPTS[:2]:
        expected = cli_generate(chat_target, tiny_models["llama-draft"], prompt, 20, *flags)
        plain = cli_generate(chat_target, tiny_models["llama-draft"], prompt, 20)
        assert expected != plain  # the controls bite
        for depth in (0, 3):
            body = {"model": "chat-llama", "prompt": prompt, "max_tokens": 20, "temperature": 0, "depth": depth, **CONTROLS}
            response = post(server, "/v1/completions", body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected


def test_logprobs_are_the_verifiers_at_any_depth_streamed_or_not(server):
    body = {"model": "chat-llama", "prompt": LONG_PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 3, **CONTROLS}
    answers = [post(server, "/v1/completions", {**body, "depth": depth}).json()["choices"][0] for depth in (0, 2, "auto")]
    reference = answers[0]["logprobs"]
    for answer in answers[1:]:  # this float32 model runs on torch's matmul, whose last bits follow the pass's
        # width (the kernel step is bitwise the same at any width: tests/test_controls.py)
        assert answer["logprobs"]["tokens"] == reference["tokens"]
        assert answer["logprobs"]["token_logprobs"] == pytest.approx(reference["token_logprobs"], abs=1e-5)
    assert len(reference["tokens"]) == 12
    assert "".join(reference["tokens"]).replace("t", " t").split() == answers[0]["text"].split()
    for token, logprob, top in zip(reference["tokens"], reference["token_logprobs"], reference["top_logprobs"], strict=True):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
        assert top[token] == pytest.approx(logprob)
    assert reference["text_offset"] == [sum(map(len, reference["tokens"][:i])) for i in range(12)]

    events = stream_events(server, body)
    streamed = [c["choices"][0]["logprobs"] for c in events[:-1] if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for chunk in streamed for t in chunk["tokens"]] == reference["tokens"]
    streamed_logprobs = [lp for chunk in streamed for lp in chunk["token_logprobs"]]
    assert streamed_logprobs == pytest.approx(reference["token_logprobs"], abs=1e-5)  # its depth is the server's: auto
    assert [o for chunk in streamed for o in chunk["text_offset"]] == reference["text_offset"]
    no_logprobs = post(server, "/v1/completions", {**body, "logprobs": None}).json()
    assert no_logprobs["choices"][0]["logprobs"] is None


def test_the_openai_client_reads_logprobs_and_controls(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    messages = [{"role": "user", "content": "t1 t2"}]
    chat = client.chat.completions.create(
        model="chat-llama", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        frequency_penalty=0.5, logit_bias={"7": 2.0},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 and bytes(item.bytes).decode() == item.token for item in content)
    assert "".join(item.token for item in content).replace("t", " t").split() == chat.choices[0].message.content.split()
    stream = client.chat.completions.create(
        model="chat-llama", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        frequency_penalty=0.5, logit_bias={"7": 2.0}, stream=True,
    )
    streamed = [item for chunk in stream if chunk.choices and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    # the default depth is adaptive (priced by measured pass times), so the two requests' passes may differ in
    # width, and torch's float32 matmul's last bits with it (as above): tokens equal, values within 1e-5
    assert [i.token for i in streamed] == [i.token for i in content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-5)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="chat-llama", messages=messages, max_tokens=2, top_logprobs=2)


def test_a_seed_gives_the_same_sample_at_any_depth_over_http(server):
    body = {"model": "chat-llama", "prompt": LONG_PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 5, "frequency_penalty": 0.3}
    texts = {post(server, "/v1/completions", {**body, "depth": depth}).json()["choices"][0]["text"] for depth in (0, 1, 3, "auto")}
    assert len(texts) == 1


def test_n_choices_are_each_their_own_seeds_sample_streamed_or_not(server):
    """Choice i of a seeded request is the sample of seed + i, at any depth; the stream carries the
    same choices by index, each with its final chunk, and usage counts the prompt once."""
    body = {"model": "chat-llama", "prompt": LONG_PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 11}
    alone = [post(server, "/v1/completions", {**body, "seed": 11 + i}).json()["choices"][0]["text"] for i in range(3)]
    response = post(server, "/v1/completions", {**body, "n": 3, "depth": 3}).json()
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]
    assert [c["text"] for c in response["choices"]] == alone
    single = post(server, "/v1/completions", {**body, "seed": 11}).json()["usage"]
    assert response["usage"]["prompt_tokens"] == single["prompt_tokens"]
    assert response["usage"]["completion_tokens"] == sum(
        post(server, "/v1/completions", {**body, "seed": 11 + i}).json()["usage"]["completion_tokens"] for i in range(3)
    )
    events = stream_events(server, {**body, "n": 3, "depth": "auto", "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["usage"] == response["usage"]
    texts, finished = ["", "", ""], []
    for event in events[:-2]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finished.append(choice["index"])
    assert texts == alone and sorted(finished) == [0, 1, 2]


def test_echo_returns_the_prompt_and_its_logprobs_first_at_any_depth_streamed_or_not(server):
    body = {"model": "chat-llama", "prompt": LONG_PROMPT, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    plain = post(server, "/v1/completions", {**body, "echo": False, "logprobs": None}).json()["choices"][0]["text"]
    answers = [post(server, "/v1/completions", {**body, "depth": depth}).json()["choices"][0] for depth in (0, 3, "auto")]
    for answer in answers[1:]:  # torch's float32 matmul: the last bits follow the pass's width (as above)
        assert answer["text"] == answers[0]["text"] and answer["logprobs"]["tokens"] == answers[0]["logprobs"]["tokens"]
        assert answer["logprobs"]["token_logprobs"][1:] == pytest.approx(answers[0]["logprobs"]["token_logprobs"][1:], abs=1e-5)
    choice = answers[0]
    assert choice["text"] == LONG_PROMPT + plain
    logprobs = choice["logprobs"]
    usage = post(server, "/v1/completions", body).json()["usage"]
    assert len(logprobs["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(lp, float) and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    events = stream_events(server, body)
    streamed = [e["choices"][0] for e in events if e != "[DONE]" and e["choices"]]
    assert streamed[0]["text"] == LONG_PROMPT  # the prompt comes first, in one chunk
    assert "".join(c["text"] for c in streamed) == choice["text"]
    streamed_logprobs = sum((c["logprobs"]["token_logprobs"] for c in streamed if c["logprobs"]), [])
    assert streamed_logprobs[0] is None and streamed_logprobs[1:] == pytest.approx(logprobs["token_logprobs"][1:], abs=1e-5)


def test_n_greedy_choices_are_one_answer_and_chat_takes_n_too(server):
    body = {"model": "chat-llama", "messages": [{"role": "user", "content": "t1 t2"}], "max_tokens": 8, "temperature": 0}
    choices = post(server, "/v1/chat/completions", {**body, "n": 2}).json()["choices"]
    assert len(choices) == 2 and choices[0]["message"] == choices[1]["message"]
    assert choices[0]["message"]["content"] == post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]


# -- the openai client -------------------------------------------------------------------------------


def test_the_openai_client_works_unchanged(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["chat-llama"]

    completion = client.completions.create(model="chat-llama", prompt=LONG_PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8 and completion.usage.prompt_tokens == 5

    streamed = client.completions.create(
        model="chat-llama", prompt=LONG_PROMPT, max_tokens=8, temperature=0, stream=True,
        extra_body={"speculation_stats": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
    stats = chunks[-1].model_extra["speculation_stats"]
    assert stats["verifier_calls"] >= 1 and stats["accepted"] <= stats["proposed"]
    assert stats["proposer"] == "draft"

    chat = client.chat.completions.create(
        model="chat-llama", messages=[{"role": "user", "content": "t1 t2"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    chat_stream = client.chat.completions.create(
        model="chat-llama", messages=[{"role": "user", "content": "t1 t2"}], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == chat.choices[0].message.content


def test_the_openai_client_sees_api_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.completions.create(model="gpt-4", prompt="t1", max_tokens=2)


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, message", [(None, "missing API key"), ("sk-wrong", "invalid API key")])
def test_missing_or_wrong_key_is_401(server, key, message):
    response = post(server, "/v1/completions", {"model": "chat-llama", "prompt": "t1"}, key=key)
    assert response.status_code == 401
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == "invalid_api_key"
    assert response.headers["x-request-id"]


def test_a_key_given_with_no_id_works(server):
    assert post(server, "/v1/completions", {"model": "chat-llama", "prompt": "t1", "max_tokens": 1}, key="sk-other").status_code == 200


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"model": "nope", "prompt": "t1"}, "model", "unknown model 'nope'"),
        ({"prompt": "t1"}, "model", "'model' is required"),
        ({"model": "chat-llama", "prompt": "t1", "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"model": "chat-llama", "prompt": "t1", "top_p": 0}, "top_p", "greater than 0"),
        ({"model": "chat-llama", "prompt": "t1", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": "chat-llama", "prompt": "t1", "n": 17}, "n", "less than or equal to 16"),
        ({"model": "chat-llama", "prompt": "t1", "n": 2, "stream": True, "provisional": True}, "n", "provisional streams carry one choice"),
        ({"model": "chat-llama", "prompt": "t1", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"model": "chat-llama", "prompt": "t1", "frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2"),
        ({"model": "chat-llama", "prompt": "t1", "logit_bias": {"999": 1}}, "logit_bias", "token id 999, outside this model's vocabulary of 64"),
        ({"model": "chat-llama", "prompt": "t1", "logit_bias": {"t5": 1}}, "logit_bias", "keys must be token ids"),
        ({"model": "chat-llama", "prompt": "t1", "logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
        ({"model": "chat-llama", "prompt": "t1", "stop_token_ids": [64]}, "stop_token_ids", "token id 64, outside"),
        ({"model": "chat-llama", "prompt": "t1", "repetition_penalty": 1e-300}, "repetition_penalty", "greater than or equal to 0.01"),
        ({"model": "chat-llama", "prompt": "t1", "sampled_acceptance": "fast"}, "sampled_acceptance", "'coupled' or 'rejection'"),
        ({"model": "chat-llama", "prompt": "t1", "stop": [""]}, "stop", "must not be empty"),
        ({"model": "chat-llama", "prompt": ["t1", "t2"]}, "prompt", "one prompt per request"),
        ({"model": "chat-llama", "prompt": ""}, "prompt", "empty"),
        ({"model": "chat-llama", "prompt": [1, 2, 999]}, "prompt", "token ids"),
        ({"model": "chat-llama", "prompt": "t1", "max_tokens": 600}, "max_tokens", "maximum context length is 512"),
        ({"model": "chat-llama", "prompt": " ".join(["t1"] * 600)}, "prompt", "maximum context length is 512"),
        ({"model": "chat-llama", "prompt": "t1", "depth": -1}, "depth", "depth must be 0 or more"),
        ("{not json", None, "not valid JSON"),
    ],
)
def test_bad_input_is_400_in_openai_format(server, body, param, message):
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert error["param"] == param


def test_chat_needs_messages(server):
    response = post(server, "/v1/chat/completions", {"model": "chat-llama", "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    response = httpx.get(server.url + "/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_request_ids(server):
    given = post(server, "/v1/completions", {"model": "chat-llama", "prompt": "t1", "max_tokens": 1}, **{"x-request-id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    assert given.json()["id"] == "cmpl-trace-42"
    made = httpx.get(server.url + "/healthz")
    assert len(made.headers["x-request-id"]) == 32
    assert made.json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"


def test_a_request_id_of_digits_is_kept_and_one_holding_a_secret_or_an_email_is_not(server):
    """IDs are checked for secrets and e-mail addresses only: the phone detector took oc-0522946802 for a number."""
    body = {"model": "chat-llama", "prompt": "t1", "max_tokens": 1}
    kept = post(server, "/v1/completions", body, **{"x-request-id": "oc-0522946802"})
    assert kept.status_code == 200 and kept.headers["x-request-id"] == "oc-0522946802"
    planted = ("sk-proj-" + "Zq7" * 12, "mallory@example.com")
    for given in planted:
        replaced = post(server, "/v1/completions", body, **{"x-request-id": given})
        assert replaced.status_code == 200 and len(replaced.headers["x-request-id"]) == 32, given
    store = AuditStore(f"sqlite:///{server.log_path.with_suffix('.sqlite3')}")  # acknowledged: committed
    try:
        assert [r["status"] for r in store.query(request_ids=["oc-0522946802"])] == [200]
        stored = json.dumps(store.query(), default=str)
    finally:
        store.close()
    assert not any(given in stored or given in server.log() for given in planted)


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_follow_the_requests(server):
    before = server.metrics()
    body = {"model": "chat-llama", "prompt": LONG_PROMPT, "max_tokens": 12, "temperature": 0, "speculation_stats": True}
    response = post(server, "/v1/completions", body).json()
    after = server.metrics()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    stats = response["speculation_stats"]
    assert delta("verispec:generation_tokens_total") == response["usage"]["completion_tokens"] == 12
    assert delta("verispec:prompt_tokens_total") == response["usage"]["prompt_tokens"]
    assert delta("verispec:request_success_total", finished_reason="length") == 1
    assert delta("verispec:requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("verispec:spec_decode_num_draft_tokens_total") == stats["proposed"]
    assert delta("verispec:spec_decode_num_accepted_tokens_total") == stats["accepted"]
    assert delta("verispec:spec_decode_num_accepted_tokens_per_pos_total") == stats["accepted"]
    assert delta("verispec:spec_recovered_tokens_total") == stats["recovered"]
    assert delta("verispec:spec_bonus_tokens_total") == stats["bonus"]
    assert delta("verispec:verifier_calls_total") == stats["verifier_calls"]
    assert delta("verispec:e2e_request_latency_seconds_count") == 1
    assert delta("verispec:time_to_first_token_seconds_count") == 1
    assert delta("verispec:inter_token_latency_seconds_count") == 11
    assert metric(after, "verispec:num_requests_running") == 0
    # SLO thresholds are bucket bounds, so `le` hits them exactly.
    assert 'verispec:time_to_first_token_seconds_bucket{le="0.5",model_name="chat-llama"}' in after


# -- admission control, deadlines, disconnects ----------------------------------------------------------


def test_a_flood_beyond_the_queue_gets_503_with_retry_after(slow_server):
    body = {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 4, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(slow_server, "/v1/completions", body, key=None), range(8)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 5 and statuses.count(200) >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"


def test_past_the_deadline_is_504(slow_server):
    started = time.monotonic()
    response = post(slow_server, "/v1/completions", {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 100, "temperature": 0}, key=None)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 30  # answered at the deadline (4 s), not hung; 504 says it was cut short


def test_a_stream_past_its_deadline_ends_with_an_error_event(slow_server):
    events = stream_events(slow_server, {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 100, "temperature": 0}, key=None)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "deadline_exceeded", events[-3:]


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    before = slow_server.metrics()
    body = {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 100, "stream": True, "temperature": 0}
    with httpx.stream("POST", slow_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first verified tokens arrived; now hang up
    hung_up = time.monotonic()
    # Finishing its 100 tokens would take the slow server 10 s or more; the outcome below says it was
    # cancelled, not finished, so the wait can be generous on a busy machine.
    while metric(slow_server.metrics(), "verispec:num_requests_running") != 0:
        assert time.monotonic() - hung_up < 30, "the abandoned request still holds its slot"
        time.sleep(0.05)
    after = slow_server.metrics()
    assert metric(after, "verispec:request_outcomes_total", outcome="cancelled") == metric(before, "verispec:request_outcomes_total", outcome="cancelled") + 1
    assert post(slow_server, "/v1/completions", {"model": "llama", "prompt": "t1", "max_tokens": 2}, key=None).status_code == 200


def test_a_model_without_a_chat_template_gets_400(slow_server):
    response = post(slow_server, "/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "t1"}]}, key=None)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "no_chat_template"


# -- proposer failure and the circuit breaker ------------------------------------------------------------


def test_a_failing_proposer_still_gives_exact_output_and_trips_the_breaker(failing_server, tiny_models):
    expected = cli_generate(tiny_models["llama"], tiny_models["llama-draft"], LONG_PROMPT, 24, "--depth", "0")
    body = {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 24, "temperature": 0, "speculation_stats": True}
    first = post(failing_server, "/v1/completions", body, key="sk-carol").json()
    assert first["choices"][0]["text"] == expected
    assert first["speculation_stats"]["proposer_failures"] >= 3
    assert first["speculation_stats"]["fallback_rounds"] >= 3

    samples = failing_server.metrics()
    assert metric(samples, "verispec:breaker_state") == 1  # open: verifier only
    assert metric(samples, "verispec:breaker_transitions_total", state="open") == 1
    assert metric(samples, "verispec:proposer_failures_total") >= 3
    assert "speculation circuit breaker open" in failing_server.log()

    second = post(failing_server, "/v1/completions", body, key="sk-carol").json()
    assert second["choices"][0]["text"] == expected
    assert second["speculation_stats"]["proposer_failures"] == 0  # speculation is off for new work
    assert second["speculation_stats"]["proposed"] == 0
    assert httpx.get(failing_server.url + "/readyz").json()["breaker"] == "open"


def test_per_key_rate_limit_is_429(failing_server):
    body = {"model": "llama", "prompt": "t1", "max_tokens": 1}
    for remaining in (2, 1, 0):
        response = post(failing_server, "/v1/completions", body, key="sk-bob")
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
    limited = post(failing_server, "/v1/completions", body, key="sk-bob")
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert post(failing_server, "/v1/completions", body, key="sk-dave").status_code == 200  # other keys unaffected


# -- shutdown -------------------------------------------------------------------------------------------


def test_graceful_shutdown_finishes_the_stream_in_flight(tiny_models, tmp_path):
    proc = ServerProcess(
        ["slow:0.2", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--depth", "1"],
        module="tests.faulty_server", log_dir=tmp_path,
    ).wait_ready()
    body = {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 10, "stream": True, "temperature": 0}
    lines = []
    try:
        with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not lines:
                    proc.process.send_signal(signal.SIGTERM)  # mid-stream
                lines.append(line)
        proc.process.wait(60)  # the stream in flight is done: the server exits ...
        with pytest.raises(httpx.ConnectError):
            httpx.get(proc.url + "/healthz")  # ... and admits nothing more
    finally:
        proc.stop_gracefully()
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_shutdown_cancels_what_outlives_the_grace_period(tiny_models, tmp_path):
    # A round takes 1.5 s (the proposer is let take it): the one under way when the 0.5 s grace ends
    # is still running when the engine drains, ~1 s before it ends, so the drain cancels the job.
    proc = ServerProcess(
        ["slow:1.5", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--depth", "1", "--grace-s", "0.5",
         "--proposer-timeout-s", "10"],
        module="tests.faulty_server", log_dir=tmp_path,
    ).wait_ready()
    body = {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 200, "stream": True, "temperature": 0}
    lines = []
    try:
        with pytest.raises(httpx.RemoteProtocolError):  # the server closes the connection mid-stream
            with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if not lines:
                        signalled = time.monotonic()
                        proc.process.send_signal(signal.SIGTERM)
                    lines.append(line)
        proc.process.wait(15)
        assert time.monotonic() - signalled < 10  # 200 tokens at 1.5 s a round would take minutes
    finally:
        proc.stop_gracefully()
    assert "data: [DONE]" not in lines  # cut off, not finished
    log = proc.log()
    assert "cancelled: the shutdown grace period (--grace-s 0.5) is over" in log, log  # the configured grace, not 0s
    assert "grace period of 0s" not in log


# -- load test ------------------------------------------------------------------------------------------


def test_loadtest_reports_both_configurations(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    out = tmp_path / "load.json"
    result = run_verispec(
        "loadtest", "--url", server.url, "--api-key", KEY, "--prompts", str(prompts), "--concurrency", "2",
        "--requests", "4", "--max-tokens", "6", "--compare-speculation", "--rounds", "2", "--warmup", "1", "--out", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["speculative", "verifier-only"]
    for r in report["results"]:
        assert r["requests"] == r["ok"] == 4 and r["status_counts"] == {"200": 4}
        assert r["generated_tokens"] == 4 * 6
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_p99_s"]
        assert r["tokens_per_s"] > 0
    assert "speculative / verifier-only" in result.stdout


def test_loadtest_against_no_server_is_a_clear_error():
    result = run_verispec("loadtest", "--url", "http://127.0.0.1:9", "--requests", "1", "--wait-s", "1")
    assert result.returncode == 2
    assert "did not become ready" in result.stderr or "cannot reach" in result.stderr


def test_loadtest_prompts_default_to_text_every_machine_has(monkeypatch, tmp_path):
    from verispec.tools.loadtest import settings

    monkeypatch.setattr(settings, "DEFAULT_PROMPTS", tmp_path / "absent.jsonl")
    prompts = settings.default_prompts()
    assert len(prompts) == 64 and all(p.text.strip() for p in prompts)


def test_a_banned_token_among_the_alternatives_reads_minus_9999(chat_target):
    """-inf (a token floor's ban) is no JSON number; OpenAI writes -9999.0 for it."""
    from verispec.core.rounds import TokenLogprob
    from verispec.server.logprobs import LogprobFormat

    tokenizer = AutoTokenizer.from_pretrained(chat_target)
    entry = TokenLogprob(5, -0.5, ((5, -0.5), (0, float("-inf"))))
    completion = LogprobFormat(False, tokenizer).render([entry])
    assert completion["top_logprobs"] == [{"t5": -0.5, "<|endoftext|>": -9999.0}]
    chat = LogprobFormat(True, tokenizer).render([entry])
    assert [t["logprob"] for t in chat["content"][0]["top_logprobs"]] == [-0.5, -9999.0]
    json.dumps(chat, allow_nan=False)
