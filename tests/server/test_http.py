"""The HTTP port: health, readiness, Prometheus metrics added up across workers, and JSON renders."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import renderers
from google.protobuf import json_format

from render_client import RenderClient, build_training_sample
from tests.reference import reference_renderer
from tests.support import ServerProcess, corpus, running_server, slow_request


def get(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    request = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("content-type", "")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def test_health_and_readiness(server: ServerProcess) -> None:
    assert get(f"{server.http}/healthz")[:2] == (200, b"ok\n")
    status, body, _ = get(f"{server.http}/readyz")
    assert status == 200 and body.startswith(b"ready: 2 workers serving")
    assert get(f"{server.http}/nope")[0] == 404
    assert get(f"{server.http}/v1/render_training_sample")[0] == 405


def test_metrics_add_up_across_workers(server: ServerProcess) -> None:
    before = get(f"{server.http}/metrics")[1].decode()
    conversation = corpus()[1]
    sent = 40
    # Eight connections: the kernel spreads them over both workers.
    with RenderClient(server.target, connections=8, timeout=60) as client:
        samples = [build_training_sample(client.renderer("qwen3"), conversation["messages"]) for _ in range(sent)]
        image = next(c for c in corpus() if "images" in c["tags"])
        build_training_sample(client.renderer("qwen3-vl"), image["messages"])
    status, body, content_type = get(f"{server.http}/metrics")
    after = body.decode()
    assert status == 200 and content_type.startswith("text/plain")
    counted = metric(after, "render_requests_total", method="RenderTrainingSample", model="qwen3", code="OK")
    assert (
        counted - metric(before, "render_requests_total", method="RenderTrainingSample", model="qwen3", code="OK")
        == sent
    )
    tokens = metric(after, "render_tokens_total", model="qwen3") - metric(before, "render_tokens_total", model="qwen3")
    assert tokens == sent * len(samples[0].token_ids)
    images = sum(
        1 for m in image["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url"
    )
    assert (
        metric(after, "render_images_total", model="qwen3-vl") - metric(before, "render_images_total", model="qwen3-vl")
        == images
    )
    assert metric(after, "render_request_duration_seconds_count", method="RenderTrainingSample", model="qwen3") >= sent
    assert "render_requests_in_flight" in after and "render_worker_restarts_total" in after


def test_json_render_matches_in_process(server: ServerProcess) -> None:
    body = {
        "model": "qwen3",
        "messages": [
            {"role": "user", "text": "What is 2 + 2?"},
            {"role": "assistant", "text": "4", "reasoning_content": "Add."},
        ],
    }
    status, answer, content_type = get(f"{server.http}/v1/render_training_sample", data=json.dumps(body).encode())
    assert status == 200 and content_type == "application/json"
    sample: dict[str, Any] = json.loads(answer)["sample"]
    expected = renderers.build_training_sample(
        reference_renderer("qwen3"),
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add."},
        ],
    )
    assert sample["token_ids"] == expected.token_ids and sample["loss_mask"] == expected.loss_mask


def test_json_errors_carry_the_grpc_code(server: ServerProcess) -> None:
    url = f"{server.http}/v1/render_training_sample"
    status, answer, _ = get(url, data=b'{"model": "nope", "messages": [{"role": "user", "text": "x"}]}')
    assert status == 404 and json.loads(answer)["code"] == "NOT_FOUND"
    status, answer, _ = get(url, data=b'{"model": ')
    assert status == 400 and json.loads(answer)["message"].startswith("request: ")
    status, answer, _ = get(url, data=b'{"model": "qwen3", "colour": 1}')
    assert status == 400 and "colour" in json.loads(answer)["message"]
    status, answer, _ = get(url, data=b'{"model": "qwen3-template", "messages": [{"role": "user", "text": "x"}]}')
    assert status == 400 and json.loads(answer)["error_type"] == "ValueError"


def test_json_renders_are_bounded_like_grpc_calls() -> None:
    url_path = "/v1/render_training_sample"
    slow = json_format.MessageToJson(slow_request()).encode()
    small = b'{"model": "qwen3", "messages": [{"role": "user", "text": "hi"}]}'
    with running_server("--workers", "1", "--max-concurrent-rpcs", "2") as server:
        url = f"{server.http}{url_path}"
        answers: dict[str, tuple[int, bytes, str]] = {}
        threads = [threading.Thread(target=lambda: answers.update(slow=get(url, data=slow)))]
        threads[0].start()
        time.sleep(1.0)  # the 4096x4096 image renders for seconds: one place taken
        threads.append(threading.Thread(target=lambda: answers.update(queued=get(url, data=small))))
        threads[1].start()
        time.sleep(0.5)  # the second waits for the render thread: both places taken
        status, body, _ = get(url, data=small)
        assert status == 429, body
        assert json.loads(body) == {
            "code": "RESOURCE_EXHAUSTED",
            "message": "the HTTP port is rendering its limit of 2 requests at once (--max-concurrent-rpcs); "
            "retry later",
        }
        assert "slow" not in answers, "the slow render ended early: the test proved nothing"
        for thread in threads:
            thread.join(timeout=120)
        assert answers["slow"][0] == 200 and answers["queued"][0] == 200
        assert get(url, data=small)[0] == 200  # places free again


def test_the_renderer_protocol_has_json_routes(server: ServerProcess) -> None:
    local = reference_renderer("qwen3")
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    wire_messages = [{"role": "user", "text": "What is 2 + 2?"}, {"role": "assistant", "text": "4"}]

    def post(route: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer, content_type = get(f"{server.http}/v1/{route}", data=json.dumps(body).encode())
        assert (status, content_type) == (200, "application/json"), answer
        return json.loads(answer)

    rendered = post("render", {"model": "qwen3", "messages": wire_messages[:1], "add_generation_prompt": True})
    expected = local.render(messages[:1], add_generation_prompt=True)
    assert rendered["tokens"]["token_ids"] == expected.token_ids
    assert rendered["tokens"]["message_indices"] == expected.message_indices  # -1s included
    assert rendered["tokens"]["sampled_mask"] == expected.sampled_mask
    assert rendered["tokens"]["message_roles"] == expected.message_roles

    full = local.render_ids(messages)
    completion = full[len(expected.token_ids) :]
    parsed = post("parse_response", {"model": "qwen3", "token_ids": completion})["parsed"]
    assert parsed["content"] == local.parse_response(completion).content == "4"

    info = post("describe_renderer", {"model": "qwen3"})
    assert info["stop_token_ids"] == local.get_stop_token_ids()

    # A tool call's answer extends the prompt (Qwen3 re-renders at a new user query instead).
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    ask = [{"role": "user", "content": "Add 2 and 2 with the tool."}]
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}],
    }
    prompt = local.render_ids(ask, tools=tools, add_generation_prompt=True)
    sampled = local.render_ids([*ask, call], tools=tools)[len(prompt) :]
    in_process = local.bridge_to_next_turn(prompt, sampled, [{"role": "tool", "content": "4"}], tools=tools)
    assert in_process is not None
    bridged = post(
        "bridge_to_next_turn",
        {
            "model": "qwen3",
            "previous_prompt_ids": prompt,
            "previous_completion_ids": sampled,
            "new_messages": [{"role": "tool", "text": "4"}],
            "tools_json": json.dumps(tools),
        },
    )
    assert bridged["tokens"]["token_ids"] == in_process.token_ids
    assert bridged["tokens"]["message_indices"] == in_process.message_indices

    status, answer, _ = get(f"{server.http}/v1/render", data=b'{"model": "qwen3", "messages": [{"role": "wizard"}]}')
    assert status == 400 and json.loads(answer)["message"].startswith("messages[0].role: ")


def maximal_json_bodies(limit: int) -> dict[str, tuple[str, bytes, str]]:
    """Bodies of just under `limit` bytes that json.loads takes seconds on, holding the GIL (~1 us an
    element), with how the port refuses each."""
    room = limit - 64
    return {
        "ids": (
            "/v1/parse_response",
            b'{"model": "qwen3", "token_ids": [' + b"1," * (room // 2) + b"1]}",
            f"token_ids: {room // 2 + 1} token ids exceed the limit of 262144 (--max-tokens)",
        ),
        "empty messages": (
            "/v1/render",
            b'{"model": "qwen3", "messages": [' + b"{}," * (room // 3) + b"{}]}",
            "request: more than 786432 JSON objects, more than a request within the limits holds",
        ),
    }


def test_health_answers_at_once_while_the_largest_json_bodies_are_refused(server: ServerProcess) -> None:
    """The HTTP process hands bodies to its render process: its event loop never parses them.

    Before, /healthz waited 10-17 s behind 19 MiB of JSON parsed on the loop."""
    for name, (route, body, refusal) in maximal_json_bodies(64 * 1024 * 1024).items():
        answers: dict[str, tuple[int, bytes, str]] = {}
        url = f"{server.http}{route}"
        posting = threading.Thread(
            target=lambda url=url, body=body, answers=answers: answers.update(post=get(url, data=body))
        )
        posting.start()
        slowest = {path: 0.0 for path in ("/healthz", "/readyz", "/metrics")}
        probes = 0
        while posting.is_alive():
            for path in slowest:
                started = time.monotonic()
                assert get(f"{server.http}{path}")[0] == 200
                slowest[path] = max(slowest[path], time.monotonic() - started)
                probes += 1
            time.sleep(0.05)
        posting.join()
        status, answer, _ = answers["post"]
        assert (status, json.loads(answer)) == (400, {"code": "INVALID_ARGUMENT", "message": refusal}), name
        assert probes >= 3, f"{name}: the body was refused before health was asked: nothing measured"
        assert max(slowest.values()) < 1.0, (name, slowest)
