//! The embedded SQLite store (SPEC CTRL-3): every config version that ran, and the audit
//! log of every change. Created on first open with no setup; schema changes are numbered,
//! forward-only migrations recorded in `schema_version`.
//!
//! The store knows nothing about the gateway: `control` decides what to write and when, and
//! keeps a transaction open across the in-memory swap so that a version is committed only
//! once it runs.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "store {path}: schema version {found} is newer than this binary understands \
         ({supported}); run a newer gatehouse or restore a backup"
    )]
    TooNew {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("store {path}: migration {version} failed: {source}")]
    Migration {
        path: String,
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("backup to {path}: {source}")]
    Backup {
        path: String,
        #[source]
        source: BackupSource,
    },
}

/// How often a backup step that finds the store locked is retried (20 ms apart).
const BACKUP_ATTEMPTS: u32 = 250;

/// Why a backup failed: SQLite or the file system.
#[derive(Debug, thiserror::Error)]
pub enum BackupSource {
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Copies the database `source` into a new file at `dest` with SQLite's online backup API:
/// one consistent snapshot, taken while the gateway keeps running and applying (in WAL
/// mode a reader never blocks a writer). The copy is written next to `dest` and renamed
/// into place, so `dest` is never a partial file. The copy is a plain (rollback-journal)
/// database that `Store::open` or `sqlite3` can open directly, with mode 0600.
pub fn backup_connection(source: &Connection, dest: &Path) -> Result<(), StoreError> {
    let error = |source: BackupSource| StoreError::Backup {
        path: dest.display().to_string(),
        source,
    };
    let file_name = dest
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    let partial = dest.with_file_name(format!(".{file_name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&partial);
    let result = (|| -> Result<(), BackupSource> {
        // Mode 0600: stored configs hold the admin token hashes. SQLite takes an empty file
        // as a new database.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)?;
        }
        let mut target = Connection::open(&partial)?;
        {
            let backup = rusqlite::backup::Backup::new(source, &mut target)?;
            // All pages in one step (-1): one snapshot. BUSY/LOCKED (a writer holds the
            // lock right now) are retried briefly.
            let mut attempts = 0;
            loop {
                match backup.step(-1)? {
                    rusqlite::backup::StepResult::Done => break,
                    rusqlite::backup::StepResult::More => {}
                    _ if attempts < BACKUP_ATTEMPTS => {
                        attempts += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    _ => {
                        return Err(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                            Some("the store stayed locked".into()),
                        )
                        .into())
                    }
                }
            }
        }
        target.pragma_update(None, "journal_mode", "DELETE")?;
        target.close().map_err(|(_, err)| err)?;
        std::fs::rename(&partial, dest)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(error)
}

/// `gatehouse store backup`: opens the store file read-only (the running gateway keeps
/// it open) and backs it up to `dest`.
pub fn backup_file(source: &Path, dest: &Path) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags(
        source,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source_error| StoreError::Open {
        path: source.display().to_string(),
        source: source_error,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    backup_connection(&conn, dest)
}

/// Forward-only migrations: entry `i` takes the schema from version `i` to `i + 1`. Never
/// edit a released entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: config versions and the audit log.
    "CREATE TABLE config_versions (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        hash       TEXT NOT NULL,
        author     TEXT NOT NULL,
        created_at TEXT NOT NULL,
        message    TEXT NOT NULL,
        config     TEXT NOT NULL
    );
    CREATE TABLE audit_log (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        actor          TEXT NOT NULL,
        at             TEXT NOT NULL,
        action         TEXT NOT NULL,
        before_version INTEGER,
        before_hash    TEXT,
        after_version  INTEGER NOT NULL REFERENCES config_versions(id),
        after_hash     TEXT NOT NULL,
        message        TEXT NOT NULL
    );",
    // 2: signed bundles applied, for replay protection (SPEC CTRL-8).
    "CREATE TABLE bundles (
        version        INTEGER PRIMARY KEY,
        config_version INTEGER NOT NULL REFERENCES config_versions(id),
        author         TEXT NOT NULL,
        created        TEXT NOT NULL,
        key_name       TEXT,
        applied_at     TEXT NOT NULL
    );",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a statement waits for another process (a backup, an operator's `sqlite3`)
/// holding the database lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One stored config version, without the config body.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: i64,
    pub hash: String,
    pub author: String,
    pub created_at: String,
    pub message: String,
}

/// One audit record.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: i64,
    pub actor: String,
    pub at: String,
    pub action: String,
    pub before_version: Option<i64>,
    pub before_hash: Option<String>,
    pub after_version: i64,
    pub after_hash: String,
    pub message: String,
}

/// What a change writes: the new version and the audit record that explains it.
pub struct NewVersion<'a> {
    pub hash: &'a str,
    pub config_json: &'a str,
    pub actor: &'a str,
    pub action: &'a str,
    pub message: &'a str,
    /// The version running before this change, with its hash.
    pub before: Option<(i64, &'a str)>,
}

pub struct Store {
    conn: Connection,
    path: String,
}

impl Store {
    /// Opens (creating when missing) the store at `path` and brings its schema up to date.
    /// `None` opens a private in-memory store (the one-line `proxy` mode has no file).
    pub fn open(path: Option<&Path>) -> Result<Store, StoreError> {
        let shown = path.map_or_else(|| ":memory:".to_string(), |p| p.display().to_string());
        let open_error = |source| StoreError::Open {
            path: shown.clone(),
            source,
        };
        let conn = match path {
            Some(path) => Connection::open(path),
            None => Connection::open_in_memory(),
        }
        .map_err(open_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        // WAL: readers (backups, `sqlite3`) never block an apply. FULL: a committed version
        // survives power loss, not only a process crash; applies are rare, so the fsync is
        // cheap.
        if path.is_some() {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(open_error)?;
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_error)?;
        let mut store = Store { conn, path: shown };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// An online backup of this store to `dest` (see `backup_connection`).
    pub fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        backup_connection(&self.conn, dest)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let found: Option<i64> = tx
            .query_row("SELECT max(version) FROM schema_version", [], |row| {
                row.get(0)
            })
            .optional()?
            .flatten();
        let found = found.unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = index as i64 + 1;
            tx.execute_batch(sql)
                .and_then(|()| {
                    tx.execute("DELETE FROM schema_version", [])?;
                    tx.execute(
                        "INSERT INTO schema_version (version) VALUES (?1)",
                        params![version],
                    )
                    .map(drop)
                })
                .map_err(|source| StoreError::Migration {
                    path: path.clone(),
                    version,
                    source,
                })?;
            tracing::info!(store = %path, version, "store schema migrated");
        }
        tx.commit()?;
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT version FROM schema_version", [], |row| row.get(0))?)
    }

    /// The newest version with its config JSON, if any.
    pub fn head(&self) -> Result<Option<(VersionInfo, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, hash, author, created_at, message, config FROM config_versions
                 ORDER BY id DESC LIMIT 1",
                [],
                |row| Ok((version_info(row)?, row.get(5)?)),
            )
            .optional()?)
    }

    pub fn get(&self, version: i64) -> Result<Option<(VersionInfo, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, hash, author, created_at, message, config FROM config_versions
                 WHERE id = ?1",
                params![version],
                |row| Ok((version_info(row)?, row.get(5)?)),
            )
            .optional()?)
    }

    /// Newest first, at most `limit`.
    pub fn versions(&self, limit: u32) -> Result<Vec<VersionInfo>, StoreError> {
        let mut statement = self.conn.prepare(
            "SELECT id, hash, author, created_at, message FROM config_versions
             ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map(params![limit], version_info)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Newest first, at most `limit`.
    pub fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let mut statement = self.conn.prepare(
            "SELECT id, actor, at, action, before_version, before_hash, after_version,
                    after_hash, message
             FROM audit_log ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map(params![limit], |row| {
            Ok(AuditRecord {
                id: row.get(0)?,
                actor: row.get(1)?,
                at: row.get(2)?,
                action: row.get(3)?,
                before_version: row.get(4)?,
                before_hash: row.get(5)?,
                after_version: row.get(6)?,
                after_hash: row.get(7)?,
                message: row.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The highest bundle version applied so far (SPEC CTRL-8), if any.
    pub fn last_bundle_version(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT max(version) FROM bundles", [], |row| row.get(0))
            .optional()?
            .flatten())
    }

    /// Starts a write transaction. `Immediate` takes the write lock now, so a concurrent
    /// writer (another process on the same file) fails here, before memory is touched.
    pub fn begin(&mut self) -> Result<Transaction<'_>, StoreError> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

/// Inserts a version and its audit record inside `tx`; returns the new version's info.
pub fn insert_version(
    tx: &Transaction<'_>,
    new: &NewVersion<'_>,
) -> Result<VersionInfo, StoreError> {
    let created_at = now_rfc3339();
    tx.execute(
        "INSERT INTO config_versions (hash, author, created_at, message, config)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            new.hash,
            new.actor,
            created_at,
            new.message,
            new.config_json
        ],
    )?;
    let version = tx.last_insert_rowid();
    tx.execute(
        "INSERT INTO audit_log (actor, at, action, before_version, before_hash, after_version,
                                after_hash, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            new.actor,
            created_at,
            new.action,
            new.before.map(|(version, _)| version),
            new.before.map(|(_, hash)| hash),
            version,
            new.hash,
            new.message,
        ],
    )?;
    Ok(VersionInfo {
        version,
        hash: new.hash.to_string(),
        author: new.actor.to_string(),
        created_at,
        message: new.message.to_string(),
    })
}

/// What `record_bundle` writes: a bundle's metadata and the config version it became.
pub struct AppliedBundle<'a> {
    pub version: i64,
    pub config_version: i64,
    pub author: &'a str,
    pub created: &'a str,
    pub key_name: Option<&'a str>,
}

/// Records an applied bundle inside `tx`, so its version and the config it carried commit
/// together.
pub fn record_bundle(tx: &Transaction<'_>, bundle: &AppliedBundle<'_>) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO bundles (version, config_version, author, created, key_name, applied_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            bundle.version,
            bundle.config_version,
            bundle.author,
            bundle.created,
            bundle.key_name,
            now_rfc3339(),
        ],
    )?;
    Ok(())
}

fn version_info(row: &rusqlite::Row<'_>) -> rusqlite::Result<VersionInfo> {
    Ok(VersionInfo {
        version: row.get(0)?,
        hash: row.get(1)?,
        author: row.get(2)?,
        created_at: row.get(3)?,
        message: row.get(4)?,
    })
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(store: &mut Store, hash: &str, before: Option<(i64, &str)>) -> VersionInfo {
        let tx = store.begin().unwrap();
        let info = insert_version(
            &tx,
            &NewVersion {
                hash,
                config_json: "{}",
                actor: "tester",
                action: "apply",
                message: "m",
                before,
            },
        )
        .unwrap();
        tx.commit().unwrap();
        info
    }

    #[test]
    fn creates_schema_on_first_open_and_reopens_without_migrating_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mut store = Store::open(Some(&path)).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let first = add(&mut store, "h1", None);
        drop(store);
        let store = Store::open(Some(&path)).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let (head, json) = store.head().unwrap().unwrap();
        assert_eq!(head, first);
        assert_eq!(json, "{}");
    }

    #[test]
    fn refuses_a_schema_newer_than_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        drop(Store::open(Some(&path)).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(conn);
        match Store::open(Some(&path)) {
            Err(StoreError::TooNew { found: 99, .. }) => {}
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("opened a store from the future"),
        }
    }

    #[test]
    fn an_uncommitted_version_leaves_no_trace() {
        let mut store = Store::open(None).unwrap();
        let first = add(&mut store, "h1", None);
        {
            let tx = store.begin().unwrap();
            insert_version(
                &tx,
                &NewVersion {
                    hash: "h2",
                    config_json: "{}",
                    actor: "tester",
                    action: "apply",
                    message: "",
                    before: Some((first.version, "h1")),
                },
            )
            .unwrap();
            // Dropped without commit: rolled back.
        }
        assert_eq!(store.head().unwrap().unwrap().0, first);
        assert_eq!(store.audit(10).unwrap().len(), 1);
    }

    #[test]
    fn versions_and_audit_are_newest_first_with_before_and_after_hashes() {
        let mut store = Store::open(None).unwrap();
        let first = add(&mut store, "h1", None);
        let second = add(&mut store, "h2", Some((first.version, "h1")));
        let versions = store.versions(10).unwrap();
        assert_eq!(versions, vec![second.clone(), first.clone()]);
        assert_eq!(store.versions(1).unwrap(), vec![second.clone()]);
        let audit = store.audit(10).unwrap();
        assert_eq!(audit[0].before_version, Some(first.version));
        assert_eq!(audit[0].before_hash.as_deref(), Some("h1"));
        assert_eq!(audit[0].after_hash, "h2");
        assert_eq!(audit[0].actor, "tester");
        assert_eq!(audit[1].before_hash, None);
        assert!(store.get(second.version).unwrap().is_some());
        assert!(store.get(999).unwrap().is_none());
    }
}
