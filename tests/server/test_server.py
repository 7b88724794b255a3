"""Server assembly details: reflection that resolves method names."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool

from render_client._pb import render_pb2
from render_server.server import MethodAwarePool


def test_reflection_finds_the_file_of_a_method() -> None:
    pool = MethodAwarePool(descriptor_pool.Default())
    assert pool.FindFileContainingSymbol("render.v1.RenderService.RenderTrainingSample") is render_pb2.DESCRIPTOR
    assert pool.FindFileContainingSymbol("render.v1.RenderService") is render_pb2.DESCRIPTOR
    for missing in ("render.v1.RenderService.Nope", "render.v1.Nope.RenderTrainingSample", "nope"):
        with pytest.raises(KeyError):
            pool.FindFileContainingSymbol(missing)
