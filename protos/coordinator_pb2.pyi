from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("token", "public_key", "hivemind_peer_id", "device", "client_version", "swarm_auth_key")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    HIVEMIND_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SWARM_AUTH_KEY_FIELD_NUMBER: _ClassVar[int]
    token: str
    public_key: bytes
    hivemind_peer_id: str
    device: str
    client_version: str
    swarm_auth_key: bytes
    def __init__(self, token: _Optional[str] = ..., public_key: _Optional[bytes] = ..., hivemind_peer_id: _Optional[str] = ..., device: _Optional[str] = ..., client_version: _Optional[str] = ..., swarm_auth_key: _Optional[bytes] = ...) -> None: ...

class AccessLists(_message.Message):
    __slots__ = ("version", "allow", "deny")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    DENY_FIELD_NUMBER: _ClassVar[int]
    version: str
    allow: _containers.RepeatedScalarFieldContainer[str]
    deny: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., allow: _Optional[_Iterable[str]] = ..., deny: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("peer_id", "session", "org", "run_id", "run_config_toml", "run_config_hash", "initial_peers", "epoch", "checkpoint_epoch", "checkpoint_sha256", "checkpoint_bytes", "start_from_checkpoint", "coordinator_public_key", "access_token", "access_lists", "swarm_empty")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    START_FROM_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LISTS_FIELD_NUMBER: _ClassVar[int]
    SWARM_EMPTY_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session: str
    org: str
    run_id: str
    run_config_toml: str
    run_config_hash: str
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    checkpoint_epoch: int
    checkpoint_sha256: str
    checkpoint_bytes: int
    start_from_checkpoint: bool
    coordinator_public_key: bytes
    access_token: bytes
    access_lists: AccessLists
    swarm_empty: bool
    def __init__(self, peer_id: _Optional[str] = ..., session: _Optional[str] = ..., org: _Optional[str] = ..., run_id: _Optional[str] = ..., run_config_toml: _Optional[str] = ..., run_config_hash: _Optional[str] = ..., initial_peers: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ..., checkpoint_epoch: _Optional[int] = ..., checkpoint_sha256: _Optional[str] = ..., checkpoint_bytes: _Optional[int] = ..., start_from_checkpoint: _Optional[bool] = ..., coordinator_public_key: _Optional[bytes] = ..., access_token: _Optional[bytes] = ..., access_lists: _Optional[_Union[AccessLists, _Mapping]] = ..., swarm_empty: _Optional[bool] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("peer_id", "session", "report_id", "epoch", "samples", "loss", "compute_seconds", "metrics", "parameters", "sketches", "compute_dtype", "signature", "attestations")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SKETCHES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ATTESTATIONS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session: str
    report_id: str
    epoch: int
    samples: int
    loss: float
    compute_seconds: float
    metrics: _containers.ScalarMap[str, float]
    parameters: SketchOfParameters
    sketches: _containers.RepeatedCompositeFieldContainer[SketchOfGradient]
    compute_dtype: str
    signature: bytes
    attestations: _containers.RepeatedCompositeFieldContainer[Attestation]
    def __init__(self, peer_id: _Optional[str] = ..., session: _Optional[str] = ..., report_id: _Optional[str] = ..., epoch: _Optional[int] = ..., samples: _Optional[int] = ..., loss: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., parameters: _Optional[_Union[SketchOfParameters, _Mapping]] = ..., sketches: _Optional[_Iterable[_Union[SketchOfGradient, _Mapping]]] = ..., compute_dtype: _Optional[str] = ..., signature: _Optional[bytes] = ..., attestations: _Optional[_Iterable[_Union[Attestation, _Mapping]]] = ...) -> None: ...

class Attestation(_message.Message):
    __slots__ = ("role", "kind", "group", "epoch", "sender", "reducer", "length", "sketch", "norm_sq", "weight", "score", "clipped", "time")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    REDUCER_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SKETCH_FIELD_NUMBER: _ClassVar[int]
    NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    role: str
    kind: str
    group: str
    epoch: int
    sender: str
    reducer: str
    length: int
    sketch: _containers.RepeatedScalarFieldContainer[float]
    norm_sq: float
    weight: float
    score: float
    clipped: bool
    time: float
    def __init__(self, role: _Optional[str] = ..., kind: _Optional[str] = ..., group: _Optional[str] = ..., epoch: _Optional[int] = ..., sender: _Optional[str] = ..., reducer: _Optional[str] = ..., length: _Optional[int] = ..., sketch: _Optional[_Iterable[float]] = ..., norm_sq: _Optional[float] = ..., weight: _Optional[float] = ..., score: _Optional[float] = ..., clipped: _Optional[bool] = ..., time: _Optional[float] = ...) -> None: ...

class SketchOfParameters(_message.Message):
    __slots__ = ("norm", "projection")
    NORM_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    norm: float
    projection: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, norm: _Optional[float] = ..., projection: _Optional[_Iterable[float]] = ...) -> None: ...

class SketchOfGradient(_message.Message):
    __slots__ = ("index", "samples", "norm", "projection")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    index: int
    samples: int
    norm: float
    projection: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., samples: _Optional[int] = ..., norm: _Optional[float] = ..., projection: _Optional[_Iterable[float]] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("peer_id", "session", "epoch", "samples_per_second", "access_lists_version", "renew_access_token")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LISTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    RENEW_ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session: str
    epoch: int
    samples_per_second: float
    access_lists_version: str
    renew_access_token: bool
    def __init__(self, peer_id: _Optional[str] = ..., session: _Optional[str] = ..., epoch: _Optional[int] = ..., samples_per_second: _Optional[float] = ..., access_lists_version: _Optional[str] = ..., renew_access_token: _Optional[bool] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("epoch", "live_peers", "swarm_samples_per_second", "run_finished", "peers_behind", "credit", "samples_recorded", "audits_passed", "audits_failed", "credit_verified", "access_token", "access_lists")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIVE_PEERS_FIELD_NUMBER: _ClassVar[int]
    SWARM_SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    PEERS_BEHIND_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_RECORDED_FIELD_NUMBER: _ClassVar[int]
    AUDITS_PASSED_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CREDIT_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LISTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    live_peers: int
    swarm_samples_per_second: float
    run_finished: bool
    peers_behind: int
    credit: float
    samples_recorded: int
    audits_passed: int
    audits_failed: int
    credit_verified: bool
    access_token: bytes
    access_lists: AccessLists
    def __init__(self, epoch: _Optional[int] = ..., live_peers: _Optional[int] = ..., swarm_samples_per_second: _Optional[float] = ..., run_finished: _Optional[bool] = ..., peers_behind: _Optional[int] = ..., credit: _Optional[float] = ..., samples_recorded: _Optional[int] = ..., audits_passed: _Optional[int] = ..., audits_failed: _Optional[int] = ..., credit_verified: _Optional[bool] = ..., access_token: _Optional[bytes] = ..., access_lists: _Optional[_Union[AccessLists, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("peer_id", "session", "reason")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session: str
    reason: str
    def __init__(self, peer_id: _Optional[str] = ..., session: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointFetchRequest(_message.Message):
    __slots__ = ("peer_id", "session", "sha256", "offset")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session: str
    sha256: str
    offset: int
    def __init__(self, peer_id: _Optional[str] = ..., session: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatusProbeRequest(_message.Message):
    __slots__ = ("peer_id", "session", "host", "port", "nonce")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session: str
    host: str
    port: int
    nonce: str
    def __init__(self, peer_id: _Optional[str] = ..., session: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., nonce: _Optional[str] = ...) -> None: ...

class StatusProbeReply(_message.Message):
    __slots__ = ("connected", "greeting", "detail", "greeted")
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    GREETING_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    GREETED_FIELD_NUMBER: _ClassVar[int]
    connected: bool
    greeting: str
    detail: str
    greeted: bool
    def __init__(self, connected: _Optional[bool] = ..., greeting: _Optional[str] = ..., detail: _Optional[str] = ..., greeted: _Optional[bool] = ...) -> None: ...
