"""`hvdtrain serve` as clients call it: the official `openai` client (and raw HTTP where the client would refuse to
send a bad request) against the OpenAI API of a small llama (tests/conftest.py's llama_run, context 32 tokens).

One server is shared by most tests; a second one, with a distilled draft and two slots, shows speculative decoding
in the loop, the full queue and the shutdown under load; a third runs across a tensor group of 2 ranks."""
import concurrent.futures
import json
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.helpers import BIN, env, run

pytestmark = pytest.mark.e2e

CONTEXT = 32  # llama_run's window
PROMPTS = ["The ", "def f(x):", "A list is", "class "]


class Server:
    """``hvdtrain serve ... --port 0`` (under ``horovodrun --gloo -np N`` for N > 1), its URL once it listens,
    and everything it printed."""

    def __init__(self, args: list, np: int = 1):
        cmd = [str(BIN / "hvdtrain"), "serve", *map(str, args), "--port", "0"]
        if np > 1:
            cmd = [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "serving '" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(300)
        found = [ln for ln in self.lines if "serving '" in ln]
        if not found:
            self.proc.kill()
            pytest.fail("hvdtrain serve did not start:\n" + "".join(self.lines[-30:]))
        self.url = found[0].split(" at ")[1].split()[0]
        self.name = found[0].split("'")[1]

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)

    def stop(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        time.sleep(0.1)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def metrics(server: Server) -> dict:
    """``/metrics`` as ``{(name, labels...): value}``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(server.url.replace("/v1", "/metrics")).text):
        for sample in family.samples:
            out[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture(scope="module")
def server(llama_run):
    s = Server(["--model", llama_run, "--slots", "16"])
    yield s
    assert s.stop() == 0, s.output
    assert "[hvdtrain] stopped:" in s.output


def completion(client, name: str, prompt: str, **kw) -> str:
    return client.completions.create(model=name, prompt=prompt, **kw).choices[0].text


def test_greedy_and_seeded_completions_are_hvdtrain_generate_s_whatever_runs_beside_them(server, llama_run):
    """`hvdtrain generate` alone gives the texts; the server gives the same, greedy and sampled with a seed, for
    requests sent all at once among others that fill the batch with other prompts and settings."""
    client = server.client()
    assert [m.id for m in client.models.list()] == [server.name] == ["run"]
    greedy = run([str(BIN / "hvdtrain"), "generate", "--model", llama_run, *[a for p in PROMPTS for a in
                  ("--prompt", p)], "--max-tokens", "20", "--temperature", "0"]).stdout
    sampled = run([str(BIN / "hvdtrain"), "generate", "--model", llama_run, "--prompt", "The ", "--max-tokens", "20",
                   "--temperature", "0.8", "--top-k", "40", "--seed", "7"]).stdout
    asks = [dict(prompt=p, max_tokens=20, temperature=0) for p in PROMPTS]
    asks.append(dict(prompt="The ", max_tokens=20, temperature=0.8, seed=7, extra_body={"top_k": 40}))
    rng = random.Random(0)
    fillers = [dict(prompt=rng.choice(PROMPTS) + "x" * rng.randrange(5), max_tokens=rng.randrange(1, 20),
                    temperature=1.0, top_p=0.9) for _ in range(12)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda kw: completion(client, server.name, **kw), asks + fillers))
    assert greedy == "\n\n".join(p + a for p, a in zip(PROMPTS, answers)) + "\n"
    assert sampled == "The " + answers[len(PROMPTS)] + "\n"
    assert answers[len(PROMPTS)] != answers[0]  # the sample is not the greedy text


def test_streamed_chat_is_the_unstreamed_chat_and_16_concurrent_requests_are_all_answered(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=server.name, messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model=server.name, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    alone = [completion(client, server.name, p, max_tokens=12, temperature=0) for p in PROMPTS]

    def ask(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            stream = client.completions.create(model=server.name, prompt=prompt, max_tokens=12, temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in stream)
        return completion(client, server.name, prompt, max_tokens=12, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == [alone[i % len(PROMPTS)] for i in range(16)]
    many = client.completions.create(model=server.name, prompt=PROMPTS[:2], max_tokens=5, temperature=0.9, seed=1,
                                     n=3)
    assert sorted(c.index for c in many.choices) == list(range(6)) and many.usage.completion_tokens == 30


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    import httpx
    import openai

    client = server.client()
    url = server.url
    cases = [
        (b'{"model": "run", "prompt": ', 400, "could not parse the JSON body"),
        (json.dumps([1, 2]).encode(), 400, "must be a JSON object"),
        (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "The model 'gpt-4' does not exist"),
        (json.dumps({"model": "run", "prompt": "x", "temperature": 5}).encode(), 400, "'temperature' must be in"),
        (json.dumps({"model": "run", "prompt": "x", "max_tokens": "ten"}).encode(), 400, "'max_tokens' must be an"),
        (json.dumps({"model": "run", "prompt": "x", "logprobs": 3}).encode(), 400, "'logprobs' is not supported"),
        (json.dumps({"model": "run", "prompt": "x", "temprature": 1}).encode(), 400, "unrecognized request argument"),
        (json.dumps({"model": "run", "prompt": [99999]}).encode(), 400, "token ids must be 0..511"),
        (json.dumps({"model": "run", "prompt": "x" * 40, "max_tokens": 4}).encode(), 400,
         "maximum context length is 32 tokens"),
        (json.dumps({"model": "run", "messages": []}).encode(), 400, "'messages' must be a non-empty list"),
    ]
    for body, status, message in cases:
        path = "/chat/completions" if b"messages" in body else "/completions"
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert message in error["message"] and set(error) == {"message", "type", "param", "code"}, r.text
    too_long = httpx.post(url + "/completions", json={"model": "run", "prompt": "x" * 40, "max_tokens": 4}).json()
    assert too_long["error"]["code"] == "context_length_exceeded"
    assert httpx.get(url + "/nothing").status_code == 404
    assert httpx.get(url + "/models/gpt-4").json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="'top_p' must be in"):
        client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "x"}], top_p=2)
    assert completion(client, server.name, "The ", max_tokens=3, temperature=0)
    assert httpx.get(url.replace("/v1", "/health")).json() == {"status": "ok"}


def test_clients_gone_mid_stream_leave_no_slot_held_and_the_metrics_say_so(server):
    """200 streamed requests from 16 clients, a third of which hang up after a few chunks: the others are answered
    whole, and afterwards no sequence runs or waits; /metrics counts them."""
    import httpx

    before = metrics(server)
    rng = random.Random(1)
    plan = [(PROMPTS[i % 4], rng.random() < 1 / 3, rng.randrange(1, 4)) for i in range(200)]

    def one(item):
        prompt, hang_up, after = item
        body = {"model": server.name, "prompt": prompt, "max_tokens": 16, "temperature": 0.7, "stream": True}
        with httpx.stream("POST", server.url + "/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    return "done"
                if line.startswith("data: "):
                    chunks += 1
                    if hang_up and chunks >= after:
                        return "gone"
        return "cut"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, plan))
    assert outcomes.count("done") == sum(not h for _, h, _ in plan) and "cut" not in outcomes
    deadline = time.time() + 10
    while time.time() < deadline:
        now = metrics(server)
        if now[("hvdtrain_running_sequences",)] == 0 and now[("hvdtrain_queue_depth",)] == 0:
            break
        time.sleep(0.2)
    assert now[("hvdtrain_running_sequences",)] == 0 and now[("hvdtrain_queue_depth",)] == 0

    def grew(*key):
        return now.get(key, 0) - before.get(key, 0)

    assert grew("hvdtrain_requests_total", ("endpoint", "/v1/completions"), ("status", "200")) == 200
    assert grew("hvdtrain_sequences_finished_total", ("reason", "cancelled")) > 20
    finished = sum(grew("hvdtrain_sequences_finished_total", ("reason", r)) for r in ("stop", "length", "cancelled"))
    assert finished == 200
    assert grew("hvdtrain_generation_tokens_total",) >= 16 * outcomes.count("done")
    assert grew("hvdtrain_time_to_first_token_seconds_count",) == 200
    assert grew("hvdtrain_inter_token_latency_seconds_count",) > 1000
    assert now[("hvdtrain_requests_total", ("endpoint", "/v1/completions"), ("status", "400"))] >= 1
    assert now[("hvdtrain_cache_slots",)] == 16


def test_a_draft_in_the_loop_gives_the_models_greedy_text_a_full_queue_503_and_sigterm_ends_in_flight_requests(
        server, llama_draft, llama_run):
    """Speculative decoding in the continuous-batching loop gives the model's greedy text; with 2 slots and 2
    places in the queue the fifth concurrent request gets 503 with Retry-After; SIGTERM while 4 stream lets each
    end whole, then the server exits 0 and listens no more."""
    import httpx

    plain = [completion(server.client(), server.name, p, max_tokens=20, temperature=0) for p in PROMPTS]
    s = Server(["--model", llama_run, "--draft", llama_draft[0] / "student.keras", "--slots", "2", "--max-queue",
                "2", "--served-model-name", "tiny"])
    try:
        client = s.client()
        assert "draft proposing 4 tokens" in s.output
        assert [completion(client, "tiny", p, max_tokens=20, temperature=0) for p in PROMPTS] == plain
        counts = metrics(s)  # the draft's proposals scored, and the share kept (a distilled student: most)
        drafted, kept = counts[("hvdtrain_draft_tokens_total",)], counts[("hvdtrain_accepted_tokens_total",)]
        assert drafted >= 3 * 4 and 0 < kept <= drafted
        sampled = client.completions.create(model="tiny", prompt="The ", max_tokens=20, temperature=0.8, seed=3)
        assert sampled.usage.completion_tokens == 20
        body = {"model": "tiny", "prompt": "The ", "max_tokens": CONTEXT - 2, "temperature": 0, "stream": True}

        def long(_):
            with httpx.stream("POST", s.url + "/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    return r.status_code, r.headers.get("retry-after"), r.read()
                return 200, None, [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(long, range(6)))
        refused = [a for a in answers if a[0] != 200]
        assert [a[0] for a in refused] == [503, 503] and all(a[1] == "1" for a in refused), answers
        assert "the server is busy" in json.loads(refused[0][2])["error"]["message"]
        # SIGTERM under load: 4 in flight (2 decoding, 2 waiting)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(long, i) for i in range(4)]
            time.sleep(0.5)
            s.proc.send_signal(signal.SIGTERM)
            ended = [f.result() for f in futures]
        assert s.proc.wait(60) == 0, s.output
        texts = set()
        for status, _, chunks in ended:
            assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "length"
            texts.add("".join(c["choices"][0]["text"] for c in chunks))
        assert len(texts) == 1 and texts.pop().startswith(plain[0])  # each whole, and the same greedy text
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/models")
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_serving_across_a_tensor_group_gives_one_process_text(server, llama_run):
    """`horovodrun -np 2 hvdtrain serve --set parallel.tensor=2`: each rank holds half of the heads and of the
    vocabulary; greedy and seeded completions and a streamed chat equal the one-process server's; SIGTERM to
    horovodrun ends both ranks with 0."""
    one = server.client()
    messages = [{"role": "user", "content": "Define a list."}]

    def answers(client, name):
        out = [completion(client, name, p, max_tokens=16, temperature=0) for p in PROMPTS]
        out.append(completion(client, name, "The ", max_tokens=16, temperature=0.8, seed=11))
        out.append("".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=name, messages=messages, max_tokens=10, temperature=0, stream=True)))
        return out

    want = answers(one, server.name)
    tp = Server(["--model", llama_run, "--set", "parallel.tensor=2"], np=2)
    try:
        assert "tensor=2" in tp.output
        assert answers(tp.client(), tp.name) == want
    finally:
        assert tp.stop() == 0, tp.output


def test_a_model_that_cannot_load_or_a_port_in_use_is_one_line_before_listening(llama_run, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run([str(BIN / "hvdtrain"), "serve", "--model", llama_run, "--port", str(port)], check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
            f"hvdtrain: error: cannot listen on 127.0.0.1:{port} (Address already in use)"), proc.stderr
    (tmp_path / "config.json").write_text("{}")
    for model, message in [(tmp_path / "missing", "does not exist"), (tmp_path, "model.safetensors")]:
        proc = run([str(BIN / "hvdtrain"), "serve", "--model", model, "--port", str(port)], check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
        with socket.socket() as free:  # nothing listens there
            free.bind(("127.0.0.1", port))


def test_the_serving_benchmark_reports_throughput_and_latencies_against_concurrency(llama_run, tmp_path):
    out = tmp_path / "bench"
    proc = run([str(BIN / "hvdtrain"), "benchmark", "--serving", "--model", llama_run, "--concurrency", "1,2",
                "--requests", "4", "--prompt-tokens", "8", "--max-tokens", "8", "--repeats", "1", "--output", out],
               timeout=300)
    report = json.loads((out / "benchmark.json").read_text())
    rows = {r["concurrency"]: r for r in report["results"]}
    assert set(rows) == {1, 2} and rows[1]["vs_one_client"] == 1
    for row in rows.values():
        assert row["tokens_per_sec"] > 0 and 0 < row["ttft_p50"] <= row["ttft_p99"] and row["requests"] == 4
    assert report["late_arrival"][0]["running"] == 1 and report["late_arrival"][0]["ttft"] > 0
    assert (out / "serving.png").stat().st_size > 10_000
    assert "decoding steps of theirs" in proc.stdout
