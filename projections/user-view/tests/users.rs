//! user-view's rules, natively: registration, partial updates, soft
//! deletes, revival, rejects for users never registered, and duplicate
//! deliveries.

use projector_sdk::testing::Harness;
use projector_sdk::{Event, Failure};
use serde_json::{Value, json};
use user_view::{UserAnswer, UserView};

fn registered(id: &str, user: &str, email: &str, name: &str) -> Event {
    Event::json(
        "user_registered",
        &json!({"user_id": user, "email": email, "name": name, "registered_at": "2026-01-01T00:00:00Z"}),
    )
    .with_id(id)
    .with_stream("users")
}

fn updated(id: &str, data: Value) -> Event {
    Event::json("user_updated", &data).with_id(id).with_stream("users")
}

fn deleted(id: &str, user: &str) -> Event {
    Event::json("user_deleted", &json!({"user_id": user, "deleted_at": "2026-02-01T00:00:00Z"}))
        .with_id(id)
        .with_stream("users")
}

fn ask(h: &Harness<UserView>, user: &str) -> UserAnswer {
    h.query_json(&json!({"user_id": user})).unwrap()
}

fn live(email: &str, name: &str) -> UserAnswer {
    UserAnswer { exists: true, email: Some(email.into()), name: Some(name.into()) }
}

fn gone() -> UserAnswer {
    UserAnswer { exists: false, email: None, name: None }
}

#[test]
fn a_registered_user_exists_and_an_unknown_one_does_not() {
    let mut h = Harness::<UserView>::new();
    h.handle(registered("e1", "u1", "ann@example.com", "Ann")).unwrap();
    assert_eq!(ask(&h, "u1"), live("ann@example.com", "Ann"));
    assert_eq!(ask(&h, "u2"), gone());
    let raw: Value = h.query_json(&json!({"user_id": "u2"})).unwrap();
    assert_eq!(raw, json!({"exists": false, "email": null, "name": null}));
}

#[test]
fn an_update_changes_only_the_fields_it_carries() {
    let mut h = Harness::<UserView>::new();
    h.handle(registered("e1", "u1", "ann@example.com", "Ann")).unwrap();
    h.handle(updated("e2", json!({"user_id": "u1", "name": "Annie", "updated_at": "2026-01-02T00:00:00Z"})))
        .unwrap();
    assert_eq!(ask(&h, "u1"), live("ann@example.com", "Annie"));
    h.handle(updated(
        "e3",
        json!({"user_id": "u1", "email": "annie@example.com", "name": null, "updated_at": "2026-01-03T00:00:00Z"}),
    ))
    .unwrap();
    assert_eq!(ask(&h, "u1"), live("annie@example.com", "Annie"));
}

#[test]
fn a_delete_is_soft_and_hides_the_user() {
    let mut h = Harness::<UserView>::new();
    h.handle(registered("e1", "u1", "ann@example.com", "Ann")).unwrap();
    h.handle(deleted("e2", "u1")).unwrap();
    assert_eq!(ask(&h, "u1"), gone());
    // Soft: the row is kept, marked deleted.
    let row = h.rows("SELECT email, deleted_at FROM users WHERE user_id = 'u1'");
    assert_eq!(row.first().unwrap()[0].as_str(), Some("ann@example.com"));
    assert_eq!(row.first().unwrap()[1].as_str(), Some("2026-02-01T00:00:00Z"));
    // An update of a deleted user changes nothing, and is not an error.
    h.handle(updated("e3", json!({"user_id": "u1", "name": "Ghost", "updated_at": "2026-02-02T00:00:00Z"})))
        .unwrap();
    assert_eq!(ask(&h, "u1"), gone());
}

#[test]
fn a_registration_revives_a_deleted_user_with_the_new_data() {
    let mut h = Harness::<UserView>::new();
    h.handle(registered("e1", "u1", "ann@example.com", "Ann")).unwrap();
    h.handle(deleted("e2", "u1")).unwrap();
    h.handle(registered("e3", "u1", "ann@new.example", "Ann B")).unwrap();
    assert_eq!(ask(&h, "u1"), live("ann@new.example", "Ann B"));
    let row = h.rows("SELECT deleted_at, updated_at FROM users WHERE user_id = 'u1'");
    assert!(row.first().unwrap().iter().all(|v| v.is_null()));
}

#[test]
fn an_update_or_delete_of_a_user_never_registered_is_parked_not_applied() {
    let mut h = Harness::<UserView>::new();
    let parked = h
        .process_batch(vec![
            registered("e1", "u1", "ann@example.com", "Ann"),
            updated(
                "e2",
                json!({"user_id": "ghost", "name": "Nobody", "updated_at": "2026-01-02T00:00:00Z"}),
            ),
            deleted("e3", "ghost"),
            updated("e4", json!({"user_id": "u1", "name": "Annie", "updated_at": "2026-01-02T00:00:00Z"})),
        ])
        .unwrap();
    let parked: Vec<(&str, &str)> = parked.iter().map(|d| (d.id.as_str(), d.reason.as_str())).collect();
    assert_eq!(
        parked,
        [
            ("e2", "event e2 (user_updated): user \"ghost\" was never registered"),
            ("e3", "event e3 (user_deleted): user \"ghost\" was never registered"),
        ]
    );
    assert_eq!(ask(&h, "ghost"), gone());
    assert!(h.rows("SELECT 1 FROM users WHERE user_id = 'ghost'").is_empty());
    assert_eq!(ask(&h, "u1"), live("ann@example.com", "Annie"));
    // Rejected events leave no trace, not even as applied ids: once the
    // user registers, retrying the dead letter applies it.
    h.handle(registered("e5", "ghost", "g@example.com", "G")).unwrap();
    h.handle(updated(
        "e2",
        json!({"user_id": "ghost", "name": "Nobody", "updated_at": "2026-01-02T00:00:00Z"}),
    ))
    .unwrap();
    assert_eq!(ask(&h, "ghost"), live("g@example.com", "Nobody"));
}

#[test]
fn the_same_event_delivered_twice_changes_nothing_the_second_time() {
    let mut h = Harness::<UserView>::new();
    let first_update =
        updated("e2", json!({"user_id": "u1", "name": "Annie", "updated_at": "2026-01-02T00:00:00Z"}));
    h.handle(registered("e1", "u1", "ann@example.com", "Ann")).unwrap();
    h.handle(first_update.clone()).unwrap();
    h.handle(updated("e3", json!({"user_id": "u1", "name": "Anna", "updated_at": "2026-01-03T00:00:00Z"})))
        .unwrap();
    // A redelivered update does not undo the later one.
    h.handle(first_update).unwrap();
    assert_eq!(ask(&h, "u1"), live("ann@example.com", "Anna"));
    // A redelivered registration does not revive a user deleted since.
    h.handle(deleted("e4", "u1")).unwrap();
    h.handle(registered("e1", "u1", "ann@example.com", "Ann")).unwrap();
    assert_eq!(ask(&h, "u1"), gone());
    // Within one batch too.
    h.handle_batch(vec![
        registered("e5", "u2", "bo@example.com", "Bo"),
        deleted("e6", "u2"),
        registered("e5", "u2", "bo@example.com", "Bo"),
    ])
    .unwrap();
    assert_eq!(ask(&h, "u2"), gone());
}

#[test]
fn data_that_can_never_apply_is_rejected() {
    let mut h = Harness::<UserView>::new();
    let cases = [
        (
            Event::json("user_registered", &json!({"user_id": "u1", "email": "a@x", "name": "A"})),
            "missing field `registered_at`",
        ),
        (Event::json("user_updated", &json!({"user_id": "u1", "name": "A"})), "missing field `updated_at`"),
        (Event::json("user_deleted", &json!({"user_id": 7, "deleted_at": "t"})), "invalid type: integer `7`"),
        (
            Event::json(
                "user_registered",
                &json!({"user_id": "", "email": "a@x", "name": "A", "registered_at": "t"}),
            ),
            "user_id is empty",
        ),
        (Event::new("user_registered", "not json"), "data is not a valid UserRegistered"),
    ];
    for (event, expected) in cases {
        let Err(Failure::Reject(reason)) = h.handle(event) else { panic!("{expected}: not rejected") };
        assert!(reason.contains(expected), "{reason}");
    }
    assert!(h.rows("SELECT 1 FROM users").is_empty());
    // Other event types are not this projection's business.
    h.handle(Event::json("user_logged_in", &json!({"user_id": "u1"}))).unwrap();
}

#[test]
fn a_query_that_is_not_a_user_id_is_refused() {
    let h = Harness::<UserView>::new();
    let err = h.query(br#"{"id": "u1"}"#).unwrap_err();
    assert!(err.starts_with("the request is not a valid UserQuery: unknown field `id`"), "{err}");
}
