//! user-view: who the users are now, from the `users` stream.
//!
//! Events (data is JSON, timestamps RFC 3339):
//! - `user_registered` `{user_id, email, name, registered_at}`;
//! - `user_updated` `{user_id, email?, name?, updated_at}`: absent (or
//!   `null`) fields stay as they were;
//! - `user_deleted` `{user_id, deleted_at}`: a soft delete.
//!
//! Rules:
//! - an update or delete for a user never registered is rejected (a dead
//!   letter), not applied;
//! - a registration sets the user's data whether the user is unknown,
//!   deleted (it is revived with the new data) or live;
//! - an update of a deleted user changes nothing (a registration revives it
//!   with data of its own), and deleting a deleted user keeps the first
//!   deletion;
//! - the same event delivered twice (same id) changes nothing the second
//!   time: the ids applied are kept, so a redelivered update can never undo
//!   a later one and a redelivered registration never revives a user
//!   deleted since;
//! - data that does not parse (a missing field, a wrong type, an empty
//!   `user_id`) is rejected; other event types are ignored.
//!
//! Reads: `query` takes `{"user_id": "…"}` and answers
//! `{"exists": true|false, "email": …|null, "name": …|null}`; `exists` is
//! false, and email and name null, for a deleted or unknown user.

use projector_sdk::{Context, Event, Failure, Projection, query_json};
use serde::{Deserialize, Serialize};

/// The projection.
pub struct UserView;

#[derive(Deserialize)]
struct UserRegistered {
    user_id: String,
    email: String,
    name: String,
    registered_at: String,
}

#[derive(Deserialize)]
struct UserUpdated {
    user_id: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    updated_at: String,
}

#[derive(Deserialize)]
struct UserDeleted {
    user_id: String,
    deleted_at: String,
}

/// `{"user_id": "…"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserQuery {
    /// The user asked about.
    pub user_id: String,
}

/// The answer to a [`UserQuery`].
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserAnswer {
    /// Whether the user is registered and not deleted.
    pub exists: bool,
    /// The user's email, if it exists.
    pub email: Option<String>,
    /// The user's name, if it exists.
    pub name: Option<String>,
}

/// One user's row: registered (even if deleted since).
#[derive(Deserialize)]
struct Known {
    deleted_at: Option<String>,
}

impl Projection for UserView {
    const STATE_VERSION: u32 = 1;

    const MIGRATIONS: &'static [&'static str] = &[
        "CREATE TABLE users (
            user_id TEXT PRIMARY KEY NOT NULL,
            email TEXT NOT NULL,
            name TEXT NOT NULL,
            registered_at TEXT NOT NULL,
            updated_at TEXT,
            deleted_at TEXT
        ) WITHOUT ROWID",
        "CREATE TABLE applied_events (event_id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID",
    ];

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let apply = match event.event_type() {
            "user_registered" => registered,
            "user_updated" => updated,
            "user_deleted" => deleted,
            _ => return Ok(()),
        };
        // Recorded in the batch's transaction: if the event is rejected,
        // its id goes with the rest of its writes.
        let first_time = ctx
            .sql()
            .execute("INSERT OR IGNORE INTO applied_events (event_id) VALUES (?1)", (event.id(),))?;
        if first_time == 0 {
            ctx.log().debug(&format!("event {} was applied before; skipped", event.id()));
            return Ok(());
        }
        apply(ctx, event)
    }

    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        query_json(request, |q: UserQuery| {
            let user: Option<(String, String)> = ctx.sql().query_first(
                "SELECT email, name FROM users WHERE user_id = ?1 AND deleted_at IS NULL",
                (&q.user_id,),
            )?;
            Ok(match user {
                Some((email, name)) => UserAnswer { exists: true, email: Some(email), name: Some(name) },
                None => UserAnswer { exists: false, email: None, name: None },
            })
        })
    }
}

fn non_empty(event: &Event, user_id: &str) -> Result<(), Failure> {
    if user_id.is_empty() {
        return Err(Failure::reject(format!(
            "event {} ({}): user_id is empty",
            event.id(),
            event.event_type()
        )));
    }
    Ok(())
}

/// The user's row, if it was ever registered.
fn known(ctx: &Context, user_id: &str) -> Result<Option<Known>, Failure> {
    Ok(ctx.sql().query_first("SELECT deleted_at FROM users WHERE user_id = ?1", (user_id,))?)
}

fn never_registered(event: &Event, user_id: &str) -> Failure {
    Failure::reject(format!(
        "event {} ({}): user {user_id:?} was never registered",
        event.id(),
        event.event_type()
    ))
}

fn registered(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let user: UserRegistered = event.data_json()?;
    non_empty(event, &user.user_id)?;
    ctx.sql().execute(
        "INSERT INTO users (user_id, email, name, registered_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, name = excluded.name, \
         registered_at = excluded.registered_at, updated_at = NULL, deleted_at = NULL",
        (&user.user_id, &user.email, &user.name, &user.registered_at),
    )?;
    Ok(())
}

fn updated(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let update: UserUpdated = event.data_json()?;
    non_empty(event, &update.user_id)?;
    match known(ctx, &update.user_id)? {
        None => Err(never_registered(event, &update.user_id)),
        Some(Known { deleted_at: Some(_) }) => {
            ctx.log().info(&format!(
                "user {:?} is deleted; update {} changes nothing",
                update.user_id,
                event.id()
            ));
            Ok(())
        }
        Some(Known { deleted_at: None }) => {
            ctx.sql().execute(
                "UPDATE users SET email = coalesce(?2, email), name = coalesce(?3, name), updated_at = ?4 \
                 WHERE user_id = ?1",
                (&update.user_id, &update.email, &update.name, &update.updated_at),
            )?;
            Ok(())
        }
    }
}

fn deleted(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let delete: UserDeleted = event.data_json()?;
    non_empty(event, &delete.user_id)?;
    if known(ctx, &delete.user_id)?.is_none() {
        return Err(never_registered(event, &delete.user_id));
    }
    ctx.sql().execute(
        "UPDATE users SET deleted_at = coalesce(deleted_at, ?2) WHERE user_id = ?1",
        (&delete.user_id, &delete.deleted_at),
    )?;
    Ok(())
}

projector_sdk::export!(UserView);
