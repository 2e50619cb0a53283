"""What the scheduler can refuse, by meaning. No HTTP here: daemon/errors.py maps each class
to a status and code in one table.

Every error carries the message a person reads; those a caller may simply try again later
carry `retry_after` (seconds).
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of every refusal the scheduler makes to a caller."""

    retry_after: int | None = None

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class EndpointNotFound(SchedulerError):
    """No endpoint of that name (or it is being removed)."""


class ReplicaNotFound(SchedulerError):
    """A call pinned to a replica the endpoint does not have."""


class EndpointFailing(SchedulerError):
    """The endpoint cannot run now (image or secret missing, removed while a call waited)."""

    retry_after = 5


class EngineUnavailable(SchedulerError):
    """No replica can start: the Docker engine does not answer."""

    retry_after = 5


class QueueFull(SchedulerError):
    """The endpoint's queue of waiting calls is at queue_limit."""

    retry_after = 1


class NoCapacity(SchedulerError):
    """No replica had a free slot within the wait the endpoint allows."""

    retry_after = 5
