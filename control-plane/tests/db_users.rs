//! `db::users`: create and find (emails case-insensitive), the atomic user-with-key creation,
//! soft deletion, lists and counts.

mod common;

use chrono::{DateTime, Utc};
use common::{at, make_job, make_user};
use emp_control_plane::db::users::{self, Role};
use emp_control_plane::db::{Cursor, DbError, api_keys, jobs};
use sqlx::PgPool;
use uuid::Uuid;

async fn count_rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

fn is_email_conflict<T: std::fmt::Debug>(result: &Result<T, DbError>) -> bool {
    matches!(result, Err(DbError::Conflict { constraint }) if constraint == "users_email_key")
}

#[sqlx::test(migrations = "../migrations")]
async fn create_and_find(pool: PgPool) {
    let before = common::db_now(&pool).await;
    let user = users::create(&pool, "Alice@Example.com", Some("Alice"), Role::User)
        .await
        .unwrap();
    assert_eq!(
        user.email, "Alice@Example.com",
        "the email is stored as given"
    );
    assert_eq!(user.name.as_deref(), Some("Alice"));
    assert_eq!(user.role, Role::User);
    assert!(!user.is_admin());
    assert!(user.created_at >= before);
    assert_eq!(user.id.get_version_num(), 7, "ids are UUIDv7");

    assert_eq!(users::find_by_id(&pool, user.id).await.unwrap(), user);
    for spelling in [
        "Alice@Example.com",
        "alice@example.com",
        "ALICE@EXAMPLE.COM",
    ] {
        assert_eq!(
            users::find_by_email(&pool, spelling).await.unwrap(),
            user,
            "{spelling}"
        );
    }
    let admin = users::create(&pool, "root@example.com", None, Role::Admin)
        .await
        .unwrap();
    assert!(admin.is_admin());
    assert_eq!(admin.name, None);

    assert!(matches!(
        users::find_by_id(&pool, Uuid::now_v7()).await,
        Err(DbError::NotFound)
    ));
    assert!(matches!(
        users::find_by_email(&pool, "nobody@example.com").await,
        Err(DbError::NotFound)
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_taken_email_is_a_conflict_whatever_its_case(pool: PgPool) {
    make_user(&pool, "dup@example.com").await;
    for email in ["dup@example.com", "DUP@example.com", "Dup@Example.Com"] {
        let result = users::create(&pool, email, None, Role::User).await;
        assert!(is_email_conflict(&result), "{email}: {result:?}");
    }
    assert_eq!(users::count(&pool).await.unwrap(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_creations_of_one_email_have_one_winner(pool: PgPool) {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..8 {
        let pool = pool.clone();
        let email = if n % 2 == 0 {
            "race@example.com"
        } else {
            "RACE@example.com"
        };
        tasks.spawn(async move { users::create(&pool, email, None, Role::User).await });
    }
    let (mut created, mut conflicts) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap();
        if result.is_ok() {
            created += 1;
        } else {
            assert!(is_email_conflict(&result), "{result:?}");
            conflicts += 1;
        }
    }
    assert_eq!((created, conflicts), (1, 7));
    assert_eq!(users::count(&pool).await.unwrap(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn create_with_key_makes_both_and_the_key_authenticates(pool: PgPool) {
    let (user, key) =
        users::create_with_key(&pool, "new@example.com", Some("New"), Role::Admin, "first")
            .await
            .unwrap();
    assert_eq!(users::find_by_id(&pool, user.id).await.unwrap(), user);
    assert_eq!(key.key.user_id, user.id);
    assert_eq!(key.key.name, "first");
    let auth = api_keys::validate(&pool, &key.plaintext)
        .await
        .unwrap()
        .expect("key works");
    assert_eq!(auth.user, user);
}

#[sqlx::test(migrations = "../migrations")]
async fn create_with_key_is_atomic(pool: PgPool) {
    make_user(&pool, "taken@example.com").await;
    let result = users::create_with_key(&pool, "TAKEN@example.com", None, Role::User, "k").await;
    assert!(is_email_conflict(&result), "{:?}", result.map(|(u, _)| u));
    assert_eq!(count_rows(&pool, "api_keys").await, 0, "no key left behind");
    assert_eq!(count_rows(&pool, "users").await, 1);

    // The key fails after the user row was written (empty name): the user is rolled back too.
    let result = users::create_with_key(&pool, "half@example.com", None, Role::User, "").await;
    assert!(
        matches!(result, Err(DbError::Query(_))),
        "{:?}",
        result.map(|(u, _)| u)
    );
    assert!(matches!(
        users::find_by_email(&pool, "half@example.com").await,
        Err(DbError::NotFound)
    ));
    assert_eq!(count_rows(&pool, "users").await, 1, "no user left behind");
    assert_eq!(count_rows(&pool, "api_keys").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn delete_is_soft_keeps_jobs_revokes_keys_and_frees_the_email(pool: PgPool) {
    let (user, key) = users::create_with_key(&pool, "gone@example.com", None, Role::User, "k")
        .await
        .unwrap();
    let second_key = api_keys::create(&pool, user.id, "k2").await.unwrap();
    let job = make_job(&pool, user.id).await;
    let other = make_user(&pool, "stays@example.com").await;
    let others_key = api_keys::create(&pool, other.id, "theirs").await.unwrap();

    users::delete(&pool, user.id).await.unwrap();

    assert!(matches!(
        users::find_by_id(&pool, user.id).await,
        Err(DbError::NotFound)
    ));
    assert!(matches!(
        users::find_by_email(&pool, "gone@example.com").await,
        Err(DbError::NotFound)
    ));
    let listed = users::list(&pool, 50, None).await.unwrap();
    assert_eq!(listed.items, vec![other.clone()]);
    assert_eq!(users::count(&pool).await.unwrap(), 1);

    // The row stays (jobs reference it), marked deleted.
    let deleted_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT deleted_at FROM users WHERE id = $1")
            .bind(user.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(deleted_at.is_some());
    assert_eq!(
        jobs::find_by_id(&pool, job.id).await.unwrap(),
        job,
        "jobs remain"
    );

    // Every key of theirs is revoked (and still listed as such); others' keys are not.
    for plaintext in [&key.plaintext, &second_key.plaintext] {
        assert!(
            api_keys::validate(&pool, plaintext)
                .await
                .unwrap()
                .is_none()
        );
    }
    let keys = api_keys::list_of_user(&pool, user.id, 10, None)
        .await
        .unwrap();
    assert_eq!(keys.items.len(), 2);
    assert!(keys.items.iter().all(|k| !k.is_active));
    assert!(
        api_keys::validate(&pool, &others_key.plaintext)
            .await
            .unwrap()
            .is_some()
    );

    // The email is free again, for a new user with a new id.
    let again = users::create(&pool, "Gone@example.com", None, Role::User)
        .await
        .unwrap();
    assert_ne!(again.id, user.id);
    assert_eq!(
        users::find_by_email(&pool, "gone@example.com")
            .await
            .unwrap(),
        again
    );

    // Deleting twice, or an unknown user, is NotFound.
    assert!(matches!(
        users::delete(&pool, user.id).await,
        Err(DbError::NotFound)
    ));
    assert!(matches!(
        users::delete(&pool, Uuid::now_v7()).await,
        Err(DbError::NotFound)
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn list_pages_live_users_newest_first(pool: PgPool) {
    let offsets = [0, 10, 10, 20, 30, 30, 40];
    let mut made = Vec::new();
    for (n, offset) in offsets.into_iter().enumerate() {
        let user = make_user(&pool, &format!("u{n}@example.com")).await;
        sqlx::query("UPDATE users SET created_at = $2 WHERE id = $1")
            .bind(user.id)
            .bind(at(offset))
            .execute(&pool)
            .await
            .unwrap();
        made.push((at(offset), user.id));
    }
    // One of them is deleted and must not be listed or counted.
    let deleted = made.remove(3).1;
    users::delete(&pool, deleted).await.unwrap();
    made.sort_by(|a, b| b.cmp(a));
    let expected: Vec<Uuid> = made.iter().map(|(_, id)| *id).collect();

    for limit in [1, 2, 3, 6, 50] {
        let mut served = Vec::new();
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = users::list(&pool, limit, cursor).await.unwrap();
            assert!(page.items.len() <= limit);
            served.extend(page.items.iter().map(|u| u.id));
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(served, expected, "limit {limit}");
    }
    assert_eq!(users::count(&pool).await.unwrap(), 6);
}

#[sqlx::test(migrations = "../migrations")]
async fn count_counts_live_users(pool: PgPool) {
    assert_eq!(users::count(&pool).await.unwrap(), 0);
    let a = make_user(&pool, "a@example.com").await;
    make_user(&pool, "b@example.com").await;
    assert_eq!(users::count(&pool).await.unwrap(), 2);
    users::delete(&pool, a.id).await.unwrap();
    assert_eq!(users::count(&pool).await.unwrap(), 1);
}
