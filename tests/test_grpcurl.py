"""Real gRPC clients written by others: grpcurl through server reflection, grpc-health-probe."""

from __future__ import annotations

import json
import subprocess

import renderers

from tests.reference import reference_renderer
from tests.support import ServerProcess, tool


def grpcurl(server: ServerProcess, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [tool("grpcurl"), "-plaintext", "-max-msg-sz", str(2**30)]
    if data is not None:
        command += ["-d", "@"]
    return subprocess.run([*command, server.target, *args], input=data, capture_output=True, text=True, timeout=120)


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    listed = grpcurl(server, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {"render.v1.RenderService", "grpc.health.v1.Health"}
    described = grpcurl(server, "describe", "render.v1.RenderService")
    assert "rpc RenderTrainingSample" in described.stdout and "rpc ListModels" in described.stdout


def test_a_json_request_gets_the_in_process_sample(server: ServerProcess) -> None:
    # A request written as protobuf JSON, as a non-Python caller would send it.
    request = {
        "model": "qwen3",
        "messages": [
            {"role": "system", "text": "You are terse."},
            {"role": "user", "text": "What is 2 + 2? ünïcödé"},
            {
                "role": "assistant",
                "text": "",
                "reasoning_content": "Add them.",
                "tool_calls": {
                    "calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "add", "arguments_json": '{"a": 2, "b": 2.0}'},
                        }
                    ]
                },
            },
            {"role": "tool", "text": "4", "tool_call_id": "c1"},
            {"role": "assistant", "text": "4"},
        ],
        "tools_json": json.dumps([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]),
    }
    answered = grpcurl(server, "render.v1.RenderService/RenderTrainingSample", data=json.dumps(request))
    assert answered.returncode == 0, answered.stderr
    sample = json.loads(answered.stdout)["sample"]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2? ünïcödé"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Add them.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2.0}}}
            ],
        },
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
        {"role": "assistant", "content": "4"},
    ]
    expected = renderers.build_training_sample(
        reference_renderer("qwen3"), messages, tools=json.loads(request["tools_json"])
    )
    assert sample["token_ids"] == expected.token_ids
    assert sample["loss_mask"] == expected.loss_mask
    assert "multi_modal_data" not in sample and "mm_token_type_ids" not in sample


def test_grpcurl_sees_the_status_of_a_bad_request(server: ServerProcess) -> None:
    answered = grpcurl(
        server,
        "render.v1.RenderService/RenderTrainingSample",
        data='{"model": "nope", "messages": [{"role": "user", "text": "x"}]}',
    )
    assert answered.returncode != 0
    assert "NotFound" in answered.stderr and "model: no model 'nope'" in answered.stderr


def test_grpc_health_probe_reports_serving(server: ServerProcess) -> None:
    for service in ("", "render.v1.RenderService"):
        probe = subprocess.run(
            [tool("grpc-health-probe"), f"-addr={server.target}", f"-service={service}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert "SERVING" in probe.stdout + probe.stderr
