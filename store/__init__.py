"""SQLite store: schema, migrations and repositories. The only code that writes SQL."""

from berth.store.db import Store, StoreError
from berth.store.records import EndpointRecord, EventRecord, ReplicaRecord, TaskRecord

__all__ = ["EndpointRecord", "EventRecord", "ReplicaRecord", "Store", "StoreError",
           "TaskRecord"]
