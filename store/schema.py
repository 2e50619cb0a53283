"""Schema migrations: forward only, one list entry per version, tracked in PRAGMA user_version."""

MIGRATIONS: list[str] = [
    # 1: endpoints, replicas, GPU ownership, events, secrets.
    """
    CREATE TABLE endpoints (
        name        TEXT PRIMARY KEY,
        spec        TEXT NOT NULL,            -- EndpointSpec as JSON
        source      TEXT NOT NULL CHECK (source IN ('config', 'api')),
        generation  INTEGER NOT NULL DEFAULT 1, -- bumped when what a replica runs changes
        error       TEXT,                     -- why the endpoint cannot run, if it cannot
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE replicas (
        id            TEXT PRIMARY KEY,
        endpoint      TEXT NOT NULL,
        generation    INTEGER NOT NULL,
        state         TEXT NOT NULL CHECK (state IN
                        ('pending', 'starting', 'ready', 'draining', 'stopped', 'failed')),
        container_id  TEXT,
        address       TEXT,
        gpus          TEXT NOT NULL DEFAULT '[]', -- GPU uuids as JSON
        created_at    REAL NOT NULL,
        started_at    REAL,
        ready_at      REAL,
        last_call_at  REAL,
        stopped_at    REAL,
        failures      INTEGER NOT NULL DEFAULT 0,
        reason        TEXT
    );
    CREATE INDEX replicas_endpoint_state ON replicas (endpoint, state);
    CREATE TABLE gpu_owners (
        gpu_uuid    TEXT PRIMARY KEY,         -- one owner per GPU, enforced here
        replica_id  TEXT NOT NULL,
        since       REAL NOT NULL
    );
    CREATE TABLE events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        ts        REAL NOT NULL,
        kind      TEXT NOT NULL,
        endpoint  TEXT,
        replica   TEXT,
        message   TEXT NOT NULL
    );
    CREATE INDEX events_endpoint_ts ON events (endpoint, ts);
    CREATE TABLE secrets (
        name        TEXT PRIMARY KEY,
        value       TEXT NOT NULL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    """,
    # 2: async tasks. Bodies and results over 64 KiB live in files under state_dir/tasks.
    """
    CREATE TABLE tasks (
        id               TEXT PRIMARY KEY,      -- unguessable (128 random bits)
        endpoint         TEXT NOT NULL,
        method           TEXT NOT NULL,
        path             TEXT NOT NULL,
        query            TEXT NOT NULL DEFAULT '',
        headers          TEXT NOT NULL DEFAULT '[]',  -- kept request headers, JSON pairs
        body             BLOB,                  -- small bodies inline
        body_file        TEXT,                  -- else the file name
        status           TEXT NOT NULL CHECK (status IN
                           ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        replica          TEXT,
        created_at       REAL NOT NULL,
        started_at       REAL,
        finished_at      REAL,
        error            TEXT,
        result_status    INTEGER,
        result_type      TEXT,
        result_body      BLOB,
        result_file      TEXT,
        callback_url     TEXT,
        callback_state   TEXT,                  -- pending, delivered, failed
        callback_attempts INTEGER NOT NULL DEFAULT 0,
        callback_error   TEXT,
        purged_at        REAL                   -- body and result deleted after result_ttl_s
    );
    CREATE INDEX tasks_queue ON tasks (endpoint, status, created_at);
    CREATE INDEX tasks_finished ON tasks (finished_at) WHERE purged_at IS NULL;
    """,
    # 3: access tokens of endpoints, stored as SHA-256 of the token (tokens are 256 random bits).
    """
    CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        endpoint    TEXT NOT NULL,
        hash        TEXT NOT NULL UNIQUE,
        created_at  REAL NOT NULL
    );
    CREATE INDEX tokens_endpoint ON tokens (endpoint);
    """,
    # 4: an endpoint's tokens go in the same statement as the endpoint (a trigger runs inside
    # the DELETE's transaction), so a re-created endpoint never honours its old tokens; task
    # body sizes, for the per-endpoint bound on stored async bodies.
    """
    CREATE TRIGGER endpoint_tokens_go_with_it AFTER DELETE ON endpoints
    BEGIN
        DELETE FROM tokens WHERE endpoint = OLD.name;
    END;
    DELETE FROM tokens WHERE endpoint NOT IN (SELECT name FROM endpoints);
    ALTER TABLE tasks ADD COLUMN body_size INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: each endpoint's async backlog (tasks queued, bytes of queued and running bodies) kept
    # by triggers, so the intake bound is checked in O(1) instead of counting every row.
    """
    CREATE TABLE task_backlog (
        endpoint  TEXT PRIMARY KEY,
        queued    INTEGER NOT NULL DEFAULT 0,
        bytes     INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO task_backlog (endpoint, queued, bytes)
        SELECT endpoint, sum(status = 'queued'),
               sum(CASE WHEN status IN ('queued', 'running') THEN body_size ELSE 0 END)
        FROM tasks GROUP BY endpoint;
    CREATE TRIGGER task_backlog_insert AFTER INSERT ON tasks
    BEGIN
        INSERT OR IGNORE INTO task_backlog (endpoint) VALUES (NEW.endpoint);
        UPDATE task_backlog SET queued = queued + (NEW.status = 'queued'),
            bytes = bytes + CASE WHEN NEW.status IN ('queued', 'running')
                                 THEN NEW.body_size ELSE 0 END
        WHERE endpoint = NEW.endpoint;
    END;
    CREATE TRIGGER task_backlog_update AFTER UPDATE OF status, body_size ON tasks
    BEGIN
        UPDATE task_backlog SET
            queued = queued - (OLD.status = 'queued') + (NEW.status = 'queued'),
            bytes = bytes
                - CASE WHEN OLD.status IN ('queued', 'running') THEN OLD.body_size ELSE 0 END
                + CASE WHEN NEW.status IN ('queued', 'running') THEN NEW.body_size ELSE 0 END
        WHERE endpoint = NEW.endpoint;
    END;
    CREATE TRIGGER task_backlog_delete AFTER DELETE ON tasks
    BEGIN
        UPDATE task_backlog SET queued = queued - (OLD.status = 'queued'),
            bytes = bytes - CASE WHEN OLD.status IN ('queued', 'running')
                                 THEN OLD.body_size ELSE 0 END
        WHERE endpoint = OLD.endpoint;
    END;
    """,
    # 6: per-token limits, and usage (calls, errors, model tokens) per principal (a token id,
    # "admin" or "public"), endpoint, model and UTC hour. Usage outlives tokens and endpoints:
    # it is history, not configuration.
    """
    ALTER TABLE tokens ADD COLUMN requests_per_minute INTEGER;
    ALTER TABLE tokens ADD COLUMN tokens_per_day INTEGER;
    CREATE TABLE usage (
        hour               INTEGER NOT NULL,   -- unix time of the UTC hour's start
        principal          TEXT NOT NULL,
        endpoint           TEXT NOT NULL,
        model              TEXT NOT NULL,
        calls              INTEGER NOT NULL DEFAULT 0,
        errors             INTEGER NOT NULL DEFAULT 0,
        prompt_tokens      INTEGER NOT NULL DEFAULT 0,
        completion_tokens  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, principal, endpoint, model)
    ) WITHOUT ROWID;
    CREATE INDEX usage_principal ON usage (principal, hour);
    """,
    # 7: the audit log: every control write, refused ones too (never a secret or a token).
    """
    CREATE TABLE audit (
        id       INTEGER PRIMARY KEY,
        ts       REAL NOT NULL,
        actor    TEXT NOT NULL,     -- admin, a token id, none, unknown-token, or sighup
        remote   TEXT NOT NULL,
        action   TEXT NOT NULL,     -- endpoint.create, token.revoke, config.reload, ...
        target   TEXT NOT NULL,
        status   INTEGER NOT NULL,  -- the HTTP status answered (0 for a signal)
        outcome  TEXT NOT NULL      -- ok, or the error code / why it was refused
    );
    CREATE INDEX audit_ts ON audit (ts);
    """,
    # 8: replicas may sleep (the sleep tier). SQLite cannot change a CHECK: the table is made
    # anew and its rows copied.
    """
    CREATE TABLE replicas_8 (
        id            TEXT PRIMARY KEY,
        endpoint      TEXT NOT NULL,
        generation    INTEGER NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('pending', 'starting', 'ready',
                        'sleeping', 'draining', 'stopped', 'failed')),
        container_id  TEXT,
        address       TEXT,
        gpus          TEXT NOT NULL DEFAULT '[]',
        created_at    REAL NOT NULL,
        started_at    REAL,
        ready_at      REAL,
        last_call_at  REAL,
        stopped_at    REAL,
        failures      INTEGER NOT NULL DEFAULT 0,
        reason        TEXT
    );
    INSERT INTO replicas_8 SELECT id, endpoint, generation, state, container_id, address, gpus,
        created_at, started_at, ready_at, last_call_at, stopped_at, failures, reason
        FROM replicas;
    DROP TABLE replicas;
    ALTER TABLE replicas_8 RENAME TO replicas;
    CREATE INDEX replicas_endpoint_state ON replicas (endpoint, state);
    """,
    # 9: GPUs taken out of service: cordoned by an admin, or found unhealthy.
    """
    CREATE TABLE gpu_marks (
        gpu_uuid  TEXT NOT NULL,
        kind      TEXT NOT NULL CHECK (kind IN ('cordoned', 'unhealthy')),
        reason    TEXT NOT NULL,
        since     REAL NOT NULL,
        PRIMARY KEY (gpu_uuid, kind)
    );
    """,
    # 10: replicas sharing one GPU by memory (gpu_memory). A GPU held whole takes no share and
    # a shared GPU is never held whole: the trigger refuses the whole claim, the share's
    # INSERT checks the owners and the sum (store.claim_share), both inside SQLite.
    """
    CREATE TABLE gpu_shares (
        gpu_uuid    TEXT NOT NULL,
        replica_id  TEXT NOT NULL,
        memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
        since       REAL NOT NULL,
        PRIMARY KEY (gpu_uuid, replica_id)
    );
    CREATE TRIGGER gpu_owner_not_shared BEFORE INSERT ON gpu_owners
    WHEN EXISTS (SELECT 1 FROM gpu_shares WHERE gpu_uuid = NEW.gpu_uuid)
    BEGIN SELECT RAISE(ABORT, 'the GPU is shared by memory'); END;
    """,
    # 11: GPUs of sleeping replicas lent to a replica of another endpoint (one borrower each).
    """
    CREATE TABLE gpu_loans (
        gpu_uuid  TEXT PRIMARY KEY,
        borrower  TEXT NOT NULL,
        since     REAL NOT NULL
    );
    """,
    # 12: whom a task's usage counts for (its token id, "admin" or "public"), as a call's.
    """
    ALTER TABLE tasks ADD COLUMN principal TEXT NOT NULL DEFAULT 'public';
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
