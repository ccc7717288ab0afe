//! Operating on dead letters from the files — list them, hand them to the
//! current module again, discard them — so it works while `run` is running
//! (SQLite serialises the writes; each retry is one transaction). What was
//! settled is recorded (`projector_discarded`, `projector_resolved`) in the
//! transaction that settles it, for rebuilds to honour.

use crate::bindings::Failure;
use crate::config::Config;
use crate::sandbox::engine::ProjectorEngine;
use crate::sandbox::host::{GuestHost, Origin};
use crate::sandbox::instance::{Attempt, GuestInstance};
use crate::store::{self, DeadLetter, Settlement};
use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use std::sync::Arc;

/// A dead letter a retry chose was retried or discarded by someone else
/// before the retry's transaction began.
#[derive(Debug, thiserror::Error)]
#[error("the dead letter was retried or discarded meanwhile")]
struct TakenMeanwhile;

/// Which dead letters to act on.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every one.
    All,
    /// These event ids.
    Ids(Vec<String>),
}

/// What a retry did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RetryOutcome {
    /// Ids now applied and removed from the dead letters.
    pub resolved: Vec<String>,
    /// Ids that failed again (kept, attempts + 1), with the new reason.
    pub failed: Vec<FailedRetry>,
    /// Events the resolved letters emitted into the outbox.
    #[serde(skip)]
    pub emitted: u64,
}

/// A dead letter that failed again.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FailedRetry {
    /// The event's id.
    pub id: String,
    /// Why it failed this time.
    pub reason: String,
}

/// The dead letters of projection `name`.
pub fn list(config: &Config, name: &str) -> Result<Vec<DeadLetter>> {
    config.projection(name)?;
    let read = |path: &std::path::Path| -> Result<Option<Vec<DeadLetter>>> {
        match store::open_read_only(path)? {
            Some(db) if store::is_initialized(&db)? => Ok(Some(store::dead_letters(&db)?)),
            _ => Ok(None),
        }
    };
    let mut path = config.database_path(name);
    // A rebuild taking over points the projection at a new file and removes
    // the one read a moment ago: then read the new one.
    for _ in 0..3 {
        let letters = read(&path);
        let now = config.database_path(name);
        if now == path || matches!(letters, Ok(Some(_))) {
            return letters.map(Option::unwrap_or_default);
        }
        path = now;
    }
    read(&path).map(Option::unwrap_or_default)
}

/// Hand the selected dead letters of `name`, in position order, to the
/// module the config names: a success removes one, a failure keeps it with
/// attempts + 1 and the new reason.
pub fn retry(config: &Config, name: &str, selection: &Selection) -> Result<RetryOutcome> {
    let projection = config.projection(name)?;
    let chosen = select(config, name, selection)?;
    if chosen.is_empty() {
        return Ok(RetryOutcome { resolved: Vec::new(), failed: Vec::new(), emitted: 0 });
    }
    let limits = config.limits(projection);
    let engine = Arc::new(ProjectorEngine::new(limits.fuel.is_some())?);
    let module = engine
        .load_file(&projection.module)
        .with_context(|| format!("projection {name}: cannot load its module"))?;
    let db = store::open(&config.database_path(name))?;
    let mut instance = GuestInstance::new(engine, module, GuestHost::new(db, name.into(), limits)?)?;
    retry_with(&mut instance, chosen)
}

/// Hand `letters`, in order, to `instance`'s module over its database, each
/// in its own transaction: a success applies it, removes it and records it
/// resolved (so a rebuild keeps it applied); a failure keeps it with
/// attempts + 1 and the new reason. A letter gone meanwhile (another retry
/// or a discard took it) is skipped.
pub fn retry_with(instance: &mut GuestInstance, letters: Vec<DeadLetter>) -> Result<RetryOutcome> {
    let mut outcome = RetryOutcome { resolved: Vec::new(), failed: Vec::new(), emitted: 0 };
    for letter in letters {
        // The selection was read before this transaction: a concurrent
        // retry or discard may have taken the letter since. Then nothing of
        // this attempt may stay, or the event would be applied twice.
        let origin = crate::sources::own_partition(&letter.source).map(|partition| Origin {
            partition: Some(partition.into()),
            number: crate::sources::partition_number(partition),
            through: crate::sources::checkpoint_through(partition, letter.position),
        });
        let attempt = instance.handle_in_transaction(&[letter.event()], origin.as_slice(), |db| {
            if !store::remove_dead_letter(db, &letter.source, letter.position)? {
                return Err(anyhow::Error::new(TakenMeanwhile));
            }
            store::record_settled(db, Settlement::Resolved, &letter.source, letter.position, &letter.id)
        });
        let attempt = match attempt {
            Err(err) if err.downcast_ref::<TakenMeanwhile>().is_some() => continue,
            attempt => attempt?,
        };
        let reason = match attempt {
            Attempt::Committed => {
                outcome.emitted += instance.emitted();
                outcome.resolved.push(letter.id);
                continue;
            }
            Attempt::Failed(Failure::Retry(reason) | Failure::Reject(reason)) => reason,
            Attempt::Trapped(reason) | Attempt::Exhausted(reason) => reason,
        };
        let module = instance.module().sha256.clone();
        store::record_failed_retry(instance.db(), &letter.source, letter.position, &reason, &module)?;
        outcome.failed.push(FailedRetry { id: letter.id, reason });
    }
    Ok(outcome)
}

/// Remove the dead letters with these ids from `name` for good; all must
/// exist, or nothing is removed. Each is recorded discarded in the same
/// transaction, so a rebuild neither applies nor parks it again. Returns
/// how many were removed.
pub fn discard(config: &Config, name: &str, ids: &[String]) -> Result<usize> {
    let chosen = select(config, name, &Selection::Ids(ids.to_vec()))?;
    let mut db = store::open(&config.database_path(name))?;
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for letter in &chosen {
        if !store::remove_dead_letter(&tx, &letter.source, letter.position)? {
            bail!(
                "projection {name:?}: the dead letter {} was retried or discarded meanwhile; \
                 nothing was discarded",
                letter.id
            );
        }
        store::record_settled(&tx, Settlement::Discarded, &letter.source, letter.position, &letter.id)?;
    }
    tx.commit()?;
    Ok(chosen.len())
}

/// Ids named that are not (or no longer) dead letters of the projection.
#[derive(Debug, thiserror::Error)]
#[error(
    "projection {projection:?} has no dead letter with id {}; `projector dead-letters list` shows them",
    ids.join(", ")
)]
pub struct NoSuchDeadLetter {
    /// The projection.
    pub projection: String,
    /// The ids not found.
    pub ids: Vec<String>,
}

fn select(config: &Config, name: &str, selection: &Selection) -> Result<Vec<DeadLetter>> {
    let all = list(config, name)?;
    match selection {
        Selection::All => Ok(all),
        Selection::Ids(ids) => {
            if ids.is_empty() {
                bail!("name the dead letters' event ids, or pass --all");
            }
            let missing: Vec<&str> =
                ids.iter().filter(|id| !all.iter().any(|l| &&l.id == id)).map(String::as_str).collect();
            if !missing.is_empty() {
                return Err(NoSuchDeadLetter {
                    projection: name.to_string(),
                    ids: missing.into_iter().map(String::from).collect(),
                }
                .into());
            }
            Ok(all.into_iter().filter(|l| ids.contains(&l.id)).collect())
        }
    }
}
