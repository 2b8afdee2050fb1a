"""The barosync Python client: reconnect with backoff, heartbeat, acks, a persistent
offline queue and an optimistic local view. See docs/client.md.

    async with SyncClient("ws://127.0.0.1:8080/ws", token=TOKEN, store="state") as client:
        await client.subscribe("demo")
        event = await client.create("demo", title="Standup",
                                    startDate="2026-12-01T09:00:00Z", endDate="2026-12-01T09:15:00Z")
"""

from .core import SyncClient
from .state import NotificationStream, PendingMutation, QueuedMutation, new_id, ws_url
from .model import (
    ClientClosed,
    ClientError,
    ClientGaveUp,
    Conflict,
    ConflictDetected,
    ConflictError,
    ConnectionState,
    CursorMoved,
    HeartbeatPolicy,
    MutationFailed,
    MutationRefused,
    MutationSettled,
    Notification,
    PresenceChanged,
    QueueProgress,
    ReconnectPolicy,
    RemoteChange,
    ServerError,
    SnapshotApplied,
    StateChanged,
    StoreLocked,
    SubscriptionRefused,
    backoff_ceiling,
    backoff_delay,
)

__all__ = [
    "ClientClosed", "ClientError", "ClientGaveUp", "Conflict", "ConflictDetected", "ConflictError",
    "ConnectionState", "CursorMoved", "HeartbeatPolicy", "MutationFailed", "MutationRefused",
    "MutationSettled", "Notification", "NotificationStream", "PendingMutation", "PresenceChanged",
    "QueueProgress", "QueuedMutation", "ReconnectPolicy", "RemoteChange", "ServerError",
    "SnapshotApplied", "StateChanged", "StoreLocked", "SubscriptionRefused", "SyncClient",
    "backoff_ceiling", "backoff_delay", "new_id", "ws_url",
]
