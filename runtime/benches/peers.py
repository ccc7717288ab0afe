"""The Python peer of `cargo bench -p projector --bench peers`: the
wallet-allowlist rule as a team would hand-write it with the standard
library's sqlite3, reading the same embedded log (`events.db`) in batches
after its checkpoint and committing state and checkpoint in one transaction,
on its best settings (a 64 MiB page cache, the WAL checkpointed once at the
end).

Usage: python3 peers.py <events.db> <state.db> <batch> [writes-only]
With `writes-only`, the rule as writes alone (the allowlist filled by
INSERT ... SELECT from users, as the shipped module does) rather than an
upsert whose RETURNING row decides a second insert. Prints the number of
events applied.
"""

import json
import sqlite3
import sys

ALLOWLIST = (
    "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) VALUES (?, ?, ?) "
    "ON CONFLICT (wallet_address) DO NOTHING"
)


ALLOWLIST_IF_VERIFIED = (
    "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) SELECT ?1, ?2, ?3 FROM users "
    "WHERE user_id = ?2 AND kyc_verified_at IS NOT NULL ON CONFLICT (wallet_address) DO NOTHING"
)
ALLOWLIST_CURRENT_WALLET = (
    "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) SELECT wallet_address, user_id, ?2 "
    "FROM users WHERE user_id = ?1 AND wallet_address IS NOT NULL ON CONFLICT (wallet_address) DO NOTHING"
)


def main():
    events_path, state_path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    writes_only = sys.argv[4:] == ["writes-only"]
    log = sqlite3.connect(f"file:{events_path}?mode=ro", uri=True)
    db = sqlite3.connect(state_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA cache_size=-65536")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.executescript(
        """
        CREATE TABLE IF NOT EXISTS allowlist (
            wallet_address TEXT PRIMARY KEY NOT NULL, user_id TEXT NOT NULL, allowlisted_at TEXT
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS users (
            user_id TEXT PRIMARY KEY NOT NULL, wallet_address TEXT, kyc_verified_at TEXT
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY, position INTEGER NOT NULL);
        """
    )
    row = db.execute("SELECT position FROM checkpoint WHERE id = 1").fetchone()
    checkpoint = row[0] if row else 0
    applied = 0
    while True:
        rows = log.execute(
            "SELECT position, type, time, data FROM events WHERE position > ? "
            "AND stream = 'wallets' ORDER BY position LIMIT ?",
            (checkpoint, batch),
        ).fetchall()
        if not rows:
            break
        db.execute("BEGIN IMMEDIATE")
        for position, event_type, time, data in rows:
            if writes_only and event_type == "wallet_updated":
                update = json.loads(data)
                at = update.get("created_at") or time
                db.execute(
                    "INSERT INTO users (user_id, wallet_address) VALUES (?, ?) "
                    "ON CONFLICT (user_id) DO UPDATE SET wallet_address = excluded.wallet_address",
                    (update["user_id"], update["wallet_address"]),
                )
                db.execute(ALLOWLIST_IF_VERIFIED, (update["wallet_address"], update["user_id"], at))
            elif writes_only and event_type == "kyc_verified":
                kyc = json.loads(data)
                at = kyc.get("kyc_verified_at") or time or ""
                db.execute(
                    "INSERT INTO users (user_id, kyc_verified_at) VALUES (?, ?) "
                    "ON CONFLICT (user_id) DO UPDATE "
                    "SET kyc_verified_at = coalesce(users.kyc_verified_at, excluded.kyc_verified_at)",
                    (kyc["user_id"], at),
                )
                db.execute(ALLOWLIST_CURRENT_WALLET, (kyc["user_id"], at))
            elif event_type == "wallet_updated":
                update = json.loads(data)
                at = update.get("created_at") or time
                verified = db.execute(
                    "INSERT INTO users (user_id, wallet_address) VALUES (?, ?) "
                    "ON CONFLICT (user_id) DO UPDATE SET wallet_address = excluded.wallet_address "
                    "RETURNING kyc_verified_at",
                    (update["user_id"], update["wallet_address"]),
                ).fetchone()
                if verified and verified[0] is not None:
                    db.execute(ALLOWLIST, (update["wallet_address"], update["user_id"], at))
            elif event_type == "kyc_verified":
                kyc = json.loads(data)
                at = kyc.get("kyc_verified_at") or time or ""
                wallet = db.execute(
                    "INSERT INTO users (user_id, kyc_verified_at) VALUES (?, ?) "
                    "ON CONFLICT (user_id) DO UPDATE "
                    "SET kyc_verified_at = coalesce(users.kyc_verified_at, excluded.kyc_verified_at) "
                    "RETURNING wallet_address",
                    (kyc["user_id"], at),
                ).fetchone()
                if wallet and wallet[0] is not None:
                    db.execute(ALLOWLIST, (wallet[0], kyc["user_id"], at))
        checkpoint = rows[-1][0]
        db.execute(
            "INSERT INTO checkpoint (id, position) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET position = excluded.position",
            (checkpoint,),
        )
        db.execute("COMMIT")
        applied += len(rows)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(applied)


if __name__ == "__main__":
    main()
