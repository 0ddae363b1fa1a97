"""The provenance store: the agent's SQLite database and the signed log of protections in it, one
hash chain per user. The record format is specified in records/README.md (at the top of the
repository); the code is split by concern, and this package re-exports its public API:

    errors.py   ProvenanceError, DatabaseLockedError
    engine.py   where the database lives, opening and migrating it, transactions, errors, times
    schema.py   the tables (SQLAlchemy models), which migrations/ creates
    records.py  users and models, appending signed records, reading them back, the canonical form
    verify.py   checking the chains, chain heads for anchoring
    phash.py    the perceptual hash

Dependencies flow one way: errors <- phash <- engine <- records <- verify, and schema <- records.
"""

from .engine import (DATABASE_NAME, DEFAULT_TIMEOUT, MIGRATIONS_DIR, WRITE_OPTIONS, begin_write, database_path,
                     make_engine, migrate, open_database, session_timeout, time_text, translate_errors, utc_now)
from .errors import DatabaseLockedError, ProvenanceError
from .phash import PHASH_MAX_DISTANCE, hamming, perceptual_hash
from .records import (RECORD_FORMAT, RECORD_VERSION, SOURCES, Record, canonical, decrypt_record, file_sha256,
                      find_by_phash, find_by_sha256, list_records, open_recovery, record_body, record_hash,
                      record_protection, register_model, register_user, signed_message)
from .schema import (JOB_STATES, Base, JobRow, KeyRow, ModelRow, PairingCodeRow, ProtectionRow, TokenRow,
                     UserRow)
from .verify import (ChainHead, Problem, VerifyReport, chain_head, logged_public_key, public_keys_from_store,
                     record_faults, verify_chain)

__all__ = [
    # errors
    "DatabaseLockedError", "ProvenanceError",
    # engine
    "DATABASE_NAME", "DEFAULT_TIMEOUT", "MIGRATIONS_DIR", "WRITE_OPTIONS", "begin_write", "database_path",
    "make_engine", "migrate", "open_database", "session_timeout", "time_text", "translate_errors", "utc_now",
    # schema
    "JOB_STATES", "Base", "JobRow", "KeyRow", "ModelRow", "PairingCodeRow", "ProtectionRow", "TokenRow", "UserRow",
    # records
    "RECORD_FORMAT", "RECORD_VERSION", "SOURCES", "Record", "canonical", "decrypt_record", "file_sha256",
    "find_by_phash", "find_by_sha256", "list_records", "open_recovery", "record_body", "record_hash",
    "record_protection", "register_model", "register_user", "signed_message",
    # verify
    "ChainHead", "Problem", "VerifyReport", "chain_head", "logged_public_key", "public_keys_from_store",
    "record_faults", "verify_chain",
    # phash
    "PHASH_MAX_DISTANCE", "hamming", "perceptual_hash",
]
