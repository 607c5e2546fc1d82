"""Tell a task's own cancellation from a CancelledError a library raised inside it.

gRPC cancels the calls still running on a channel it closes (new TLS material, a new address), and the
caller sees asyncio.CancelledError although nobody cancelled its task. Such an error is answered (a retry, an
error to dockerd); a real cancellation of the task (task.cancel(), asyncio.timeout, a shutdown) must go on.
"""

from __future__ import annotations

import asyncio


def cancelled_from_outside() -> bool:
    """Whether the running task itself is being cancelled (no task: taken as the caller's cancellation)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
