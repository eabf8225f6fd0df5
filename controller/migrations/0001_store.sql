-- fleetgate's store in PostgreSQL, version 1: what redb's fleet.redb holds, table for table.
-- Applied by `Store::open_postgres` in one transaction (see controller/src/store/postgres.rs);
-- never edited once released: a change of the schema is a new, numbered file.
--
-- Records are the store's serde JSON, kept as written (`json`, not `jsonb`: the text is stored
-- as it came, `\u0000` included), under their key. Keys sort in byte order (`COLLATE "C"`), as
-- redb sorts them, so pages and lists come in the same order from both backends.

-- Serial → station record.
CREATE TABLE stations (
    serial text COLLATE "C" PRIMARY KEY,
    record json NOT NULL
);

-- Serial → when the station was last seen, in whole seconds since the Unix epoch. Apart from
-- the record (written by the minute for every online station); deleted with its station.
CREATE TABLE seen (
    serial text COLLATE "C" PRIMARY KEY REFERENCES stations (serial) ON DELETE CASCADE,
    at bigint NOT NULL
);

-- MAC → phone record; `tenant` is the record's own, copied for the index.
CREATE TABLE phones (
    mac text COLLATE "C" PRIMARY KEY,
    tenant text NOT NULL,
    record json NOT NULL
);
CREATE INDEX phones_by_tenant ON phones (tenant, mac);

-- Records of which there is one for the whole controller, by name ("whitelists").
CREATE TABLE singles (
    name text PRIMARY KEY,
    record json NOT NULL
);

-- Sequence number → audit record. `audit_by_tenant` is the index by which one tenant's records
-- are read, however many other tenants have.
CREATE TABLE audit (
    seq bigint PRIMARY KEY CHECK (seq > 0),
    tenant text NOT NULL,
    record json NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant, seq);

-- Tenant → `hash` of its newest audit record: the head of its chain, where the next record's
-- `prev_hash` comes from. Written in the transaction that stores that record.
CREATE TABLE audit_heads (
    tenant text PRIMARY KEY,
    hash text NOT NULL
);

-- Counters that must survive restarts. `next_audit_seq` is read and written in the transaction
-- that appends audit records (not a SQL sequence: a rolled-back transaction leaves no gap, and
-- a number is never reused, even if old records are pruned one day).
CREATE TABLE counters (
    name text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO counters (name, value) VALUES ('next_audit_seq', 1);

-- The controller epoch: raised by every fleetd that takes the controller lock (the
-- session-level advisory lock of controller/src/store/lease.rs) before it writes anything.
INSERT INTO counters (name, value) VALUES ('controller_epoch', 0);

-- The fence of every write transaction, called right after the write lock: a fleetd whose
-- epoch is no longer the database's (another took over) writes nothing. SQLSTATE FG001.
CREATE FUNCTION fleet_fence(epoch bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    SELECT value INTO current FROM counters WHERE name = 'controller_epoch';
    IF current IS DISTINCT FROM epoch THEN
        RAISE EXCEPTION 'another fleetd took over this database (controller epoch %, ours %)',
            current, epoch USING ERRCODE = 'FG001';
    END IF;
END
$$;
