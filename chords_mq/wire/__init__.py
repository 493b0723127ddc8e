"""The wire format: the one module that knows bytes (ARCHITECTURE rule 3).

A message is ``[msgpack header][raw tensor frame]*``. The header holds the protocol version, the
message kind, the broker epoch, the request id, task id and attempt, one ``[name, dtype, shape]``
per tensor frame, and a per-kind body. Tensors go out zero-copy as uint8 views of contiguous
memory (bfloat16 included) and come back zero-copy through ``torch.frombuffer``.

Every kind is one frozen type (``HelloMessage``, ``EvalMessage`` ...; ``Kind`` names them), and
``decode`` turns frames straight into that type, checking everything once, here: the header, the
tensors, the body's fields and their types (derived from the type's own annotations), and what a
kind carries beyond plain fields (an EVAL's task entries and latents, a RESULT's solver results,
a PREPARED's solver frames). ``encode`` is its inverse. Anything that breaks a rule raises
``WireError``; pickle is never used.
"""

from chords_mq.wire.base import (
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    DTYPES,
    HEARTBEAT_IDS,
    MAX_POOL_KEYS,
    MAX_TASKS,
    PROTOCOL_VERSION,
    STATUS_PAGE,
    WireError,
    WireLimits,
    tensor_digest,
)
from chords_mq.wire.codec import decode, encode
from chords_mq.wire.messages import (
    CLIENT_SENDS,
    SOLVER_PREFIX,
    TYPES,
    WORKER_SENDS,
    AcceptedMessage,
    CancelMessage,
    DecodedMessage,
    DecodeMessage,
    DisconnectMessage,
    DoneMessage,
    DropMessage,
    ErrorMessage,
    EvalMessage,
    FailedMessage,
    HeartbeatMessage,
    HelloMessage,
    HitMessage,
    Kind,
    Message,
    PoolMessage,
    PreparedMessage,
    PrepareMessage,
    ProgressMessage,
    ReleaseMessage,
    ResultEntry,
    ResultMessage,
    SolverSpec,
    StatusMessage,
    SubmitMessage,
    TaskEntry,
    WelcomeMessage,
    failed_for,
)

__all__ = [
    "CLIENT_SENDS",
    "DEFAULT_LIMITS",
    "DTYPES",
    "DTYPE_NAMES",
    "HEARTBEAT_IDS",
    "MAX_POOL_KEYS",
    "MAX_TASKS",
    "PROTOCOL_VERSION",
    "SOLVER_PREFIX",
    "STATUS_PAGE",
    "TYPES",
    "WORKER_SENDS",
    "AcceptedMessage",
    "CancelMessage",
    "DecodeMessage",
    "DecodedMessage",
    "DisconnectMessage",
    "DoneMessage",
    "DropMessage",
    "ErrorMessage",
    "EvalMessage",
    "FailedMessage",
    "HeartbeatMessage",
    "HelloMessage",
    "HitMessage",
    "Kind",
    "Message",
    "PoolMessage",
    "PrepareMessage",
    "PreparedMessage",
    "ProgressMessage",
    "ReleaseMessage",
    "ResultEntry",
    "ResultMessage",
    "SolverSpec",
    "StatusMessage",
    "SubmitMessage",
    "TaskEntry",
    "WelcomeMessage",
    "WireError",
    "WireLimits",
    "decode",
    "encode",
    "failed_for",
    "tensor_digest",
]
