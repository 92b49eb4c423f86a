"""Versioned wire messages, one module per domain. Every message is a tagged, frozen msgspec Struct."""

from duanflow_proto.messages.agent import CapacityReport, GpuInfo, ReplicaInfo, StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.build import BuildRequest, BuildResult, ImageSpec
from duanflow_proto.messages.common import Ack, ErrorReply, HealthReply, HealthRequest
from duanflow_proto.messages.invocation import Invocation, Result
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.price import PriceUpdate
from duanflow_proto.messages.release import (
    AppSpec,
    DeployReply,
    DeployRequest,
    EndpointSpec,
    FunctionLookup,
    FunctionRef,
    FunctionSpec,
    Release,
    ReleaseList,
    ReleaseListRequest,
    RouteEntry,
    UploadUrlReply,
    UploadUrlRequest,
)
from duanflow_proto.messages.scheduler import CandidateVerdict, SchedulerDecision

ALL_MESSAGES: tuple[type, ...] = (
    Ack,
    ErrorReply,
    HealthRequest,
    HealthReply,
    Invocation,
    Result,
    GpuInfo,
    ReplicaInfo,
    CapacityReport,
    StartReplica,
    StartReplicaReply,
    StopReplica,
    ImageSpec,
    BuildRequest,
    BuildResult,
    EndpointSpec,
    FunctionSpec,
    AppSpec,
    UploadUrlRequest,
    UploadUrlReply,
    DeployRequest,
    Release,
    DeployReply,
    ReleaseListRequest,
    ReleaseList,
    FunctionLookup,
    FunctionRef,
    RouteEntry,
    LogLine,
    PriceUpdate,
    CandidateVerdict,
    SchedulerDecision,
)

__all__ = [m.__name__ for m in ALL_MESSAGES] + ["ALL_MESSAGES"]
