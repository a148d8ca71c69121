"""gRPC server reflection (grpc.reflection.v1 and v1alpha), served through connectrpc.

`grpcurl list/describe`, `buf curl --list-services` and grpcio's reflection client ask
`ServerReflection/ServerReflectionInfo` (a bidi stream) for the services and their
descriptors, so nobody needs the broker's proto files. The answers come from
grpcio-reflection's own servicer (its request dispatch and descriptor answers), run here on
one request at a time over a descriptor pool that holds only what the broker serves: its
services, the `ramp.v1` messages they use, grpc.health.v1 and reflection itself, with their
imports. v1 and v1alpha are the same messages under two package names (same fields and
numbers), so a v1 request is answered by re-reading it, and the answer, in the other package.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, Protocol, cast

from connectrpc.interceptor import Interceptor
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from grpc_reflection.v1alpha.reflection import ReflectionServicer

from broker.rpc.codecs import MAX_BODY_BYTES, server_codecs, server_compressions
from ramp.broker.v1 import broker_pb2
from ramp.grpc.reflection.v1 import reflection_pb2 as v1
from ramp.grpc.reflection.v1.reflection_connect import (
    ServerReflectionASGIApplication as V1Application,
)
from ramp.grpc.reflection.v1alpha.reflection_connect import (
    ServerReflectionASGIApplication as V1AlphaApplication,
)
from ramp.v1 import ramp_pb2
from rpc_server.serving import ASGIApp

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_SERVICES = (V1_SERVICE, V1ALPHA_SERVICE)

# The files reflection describes (with everything they import).
_FILES: tuple[FileDescriptor, ...] = (
    broker_pb2.DESCRIPTOR, ramp_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, v1.DESCRIPTOR, alpha.DESCRIPTOR)


class _Answers(Protocol):
    """grpcio-reflection's servicer method, as it behaves (its published stub says `-> None`)."""

    def __call__(self, requests: Iterable[Any], context: Any) -> Iterator[Any]: ...


def descriptor_pool_of(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool with these files and, before each, the files it imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for file in files:
        add(file)
    return pool


class Reflection:
    """Answers reflection requests about `services` (full names) from the broker's descriptors."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services = tuple(sorted({*services, *REFLECTION_SERVICES}))
        servicer = ReflectionServicer(self.services, pool=descriptor_pool_of(_FILES))
        self._answers = cast(_Answers, servicer.ServerReflectionInfo)

    def answer(self, request: Any) -> Any:
        """One v1alpha answer to one v1alpha request (never raises: errors are answers)."""
        return next(iter(self._answers(iter([request]), None)))

    async def v1alpha(self, requests: AsyncIterator[Any], ctx: object) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)

    async def v1(
        self, requests: AsyncIterator[v1.ServerReflectionRequest], ctx: object
    ) -> AsyncIterator[v1.ServerReflectionResponse]:
        async for request in requests:
            answer = self.answer(alpha.ServerReflectionRequest.FromString(request.SerializeToString()))
            yield v1.ServerReflectionResponse.FromString(answer.SerializeToString())


class _V1Service:
    def __init__(self, reflection: Reflection) -> None:
        self._reflection = reflection

    def server_reflection_info(
        self, requests: AsyncIterator[v1.ServerReflectionRequest], ctx: object, /
    ) -> AsyncIterator[v1.ServerReflectionResponse]:
        return self._reflection.v1(requests, ctx)


class _V1AlphaService:
    def __init__(self, reflection: Reflection) -> None:
        self._reflection = reflection

    def server_reflection_info(self, requests: AsyncIterator[Any], ctx: object, /) -> AsyncIterator[Any]:
        return self._reflection.v1alpha(requests, ctx)


def reflection_apps(services: Sequence[str], interceptors: Sequence[Interceptor] = ()) -> dict[str, ASGIApp]:
    """The v1 and v1alpha ServerReflection applications, by the path prefix the Router serves them on.

    No authentication: descriptors are the published API (proto/), and probes and tools call
    without keys.
    """
    reflection = Reflection(services)
    common: dict[str, Any] = {"interceptors": interceptors, "codecs": server_codecs(),
                              "compressions": server_compressions(), "read_max_bytes": MAX_BODY_BYTES}
    apps: list[V1Application | V1AlphaApplication] = [
        V1Application(_V1Service(reflection), **common),
        V1AlphaApplication(_V1AlphaService(reflection), **common),
    ]
    return {app.path: app for app in apps}
