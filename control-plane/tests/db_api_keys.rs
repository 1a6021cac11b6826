//! `db::api_keys`: keys are `emp_` + 64 hex, stored only as SHA-256; validation, the
//! once-a-minute `last_used`, revocation and listing.

mod common;

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use common::{at, make_user};
use emp_control_plane::db::api_keys::{self, KEY_PREFIX};
use emp_control_plane::db::users::{self, Role};
use emp_control_plane::db::{Cursor, DbError};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

fn is_key_shape(text: &str) -> bool {
    text.len() == 68
        && text.starts_with("emp_")
        && text[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

async fn last_used(pool: &PgPool, id: Uuid) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT last_used FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn create_returns_the_plaintext_once_and_stores_only_its_sha256(pool: PgPool) {
    let user = make_user(&pool, "k@example.com").await;
    let before = common::db_now(&pool).await;
    let new = api_keys::create(&pool, user.id, "laptop").await.unwrap();
    assert!(is_key_shape(&new.plaintext), "{}", new.plaintext);
    assert!(new.plaintext.starts_with(KEY_PREFIX));
    assert_eq!(new.key.name, "laptop");
    assert_eq!(new.key.user_id, user.id);
    assert!(new.key.is_active);
    assert_eq!(new.key.last_used, None);
    assert!(new.key.created_at >= before);

    let stored_hash: String = sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE id = $1")
        .bind(new.key.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        stored_hash,
        hex::encode(Sha256::digest(new.plaintext.as_bytes()))
    );
    assert_eq!(stored_hash, api_keys::hash_key(&new.plaintext));

    // Neither the plaintext nor its random part appears in any column of the row.
    let row: String =
        sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k WHERE id = $1")
            .bind(new.key.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!row.contains(&new.plaintext));
    assert!(!row.contains(&new.plaintext[KEY_PREFIX.len()..]));

    // Keys are random.
    let mut seen = HashSet::from([new.plaintext]);
    for _ in 0..5 {
        assert!(
            seen.insert(
                api_keys::create(&pool, user.id, "more")
                    .await
                    .unwrap()
                    .plaintext
            )
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn create_for_an_unknown_user_or_with_an_empty_name_fails(pool: PgPool) {
    let result = api_keys::create(&pool, Uuid::now_v7(), "orphan").await;
    assert!(matches!(result, Err(DbError::Query(_))), "{result:?}");
    let user = make_user(&pool, "k@example.com").await;
    let result = api_keys::create(&pool, user.id, "").await;
    assert!(matches!(result, Err(DbError::Query(_))), "{result:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn validate_returns_the_key_and_its_owner_without_writing(pool: PgPool) {
    let user = users::create(&pool, "Owner@Example.com", Some("Owner"), Role::Admin)
        .await
        .unwrap();
    let other = make_user(&pool, "other@example.com").await;
    let new = api_keys::create(&pool, user.id, "ci").await.unwrap();
    api_keys::create(&pool, other.id, "theirs").await.unwrap();

    let auth = api_keys::validate(&pool, &new.plaintext)
        .await
        .unwrap()
        .expect("active key");
    assert_eq!(auth.key, new.key);
    assert_eq!(auth.user, user);
    assert!(auth.user.is_admin());
    assert_eq!(
        last_used(&pool, new.key.id).await,
        None,
        "validate is a read"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn validate_refuses_unknown_malformed_revoked_and_orphaned_keys(pool: PgPool) {
    let user = make_user(&pool, "k@example.com").await;
    let good = api_keys::create(&pool, user.id, "good").await.unwrap();

    let unknown = format!("emp_{}", "0".repeat(64));
    let malformed = [
        String::new(),
        "emp_".to_owned(),
        good.plaintext[4..].to_owned(),
        good.plaintext.to_uppercase(),
        format!("EMP_{}", &good.plaintext[4..]),
        format!("{} ", good.plaintext),
        format!("Bearer {}", good.plaintext),
        good.plaintext[..67].to_owned(),
        format!("{}0", good.plaintext),
        // The stored hash itself is not a key.
        api_keys::hash_key(&good.plaintext),
    ];
    assert!(api_keys::validate(&pool, &unknown).await.unwrap().is_none());
    for text in &malformed {
        assert!(
            api_keys::validate(&pool, text).await.unwrap().is_none(),
            "{text:?}"
        );
    }

    let revoked = api_keys::create(&pool, user.id, "revoked").await.unwrap();
    api_keys::revoke(&pool, user.id, revoked.key.id)
        .await
        .unwrap();
    assert!(
        api_keys::validate(&pool, &revoked.plaintext)
            .await
            .unwrap()
            .is_none()
    );

    // An owner deleted behind the keys' back (keys still marked active): refused anyway.
    let ghost = make_user(&pool, "ghost@example.com").await;
    let orphan = api_keys::create(&pool, ghost.id, "orphan").await.unwrap();
    assert!(
        api_keys::validate(&pool, &orphan.plaintext)
            .await
            .unwrap()
            .is_some()
    );
    sqlx::query("UPDATE users SET deleted_at = now() WHERE id = $1")
        .bind(ghost.id)
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        api_keys::validate(&pool, &orphan.plaintext)
            .await
            .unwrap()
            .is_none()
    );

    // The good key still works after all that.
    assert!(
        api_keys::validate(&pool, &good.plaintext)
            .await
            .unwrap()
            .is_some()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn touch_last_used_writes_at_most_once_a_minute(pool: PgPool) {
    let user = make_user(&pool, "k@example.com").await;
    let key = api_keys::create(&pool, user.id, "busy").await.unwrap().key;
    let other = api_keys::create(&pool, user.id, "idle").await.unwrap().key;

    assert!(
        api_keys::touch_last_used(&pool, key.id, at(0))
            .await
            .unwrap()
    );
    assert_eq!(last_used(&pool, key.id).await, Some(at(0)));
    assert!(
        !api_keys::touch_last_used(&pool, key.id, at(30))
            .await
            .unwrap()
    );
    assert!(
        !api_keys::touch_last_used(&pool, key.id, at(59))
            .await
            .unwrap()
    );
    assert_eq!(
        last_used(&pool, key.id).await,
        Some(at(0)),
        "no write within the minute"
    );
    assert!(
        api_keys::touch_last_used(&pool, key.id, at(61))
            .await
            .unwrap()
    );
    assert_eq!(last_used(&pool, key.id).await, Some(at(61)));
    assert!(
        !api_keys::touch_last_used(&pool, key.id, at(61) + TimeDelta::seconds(59))
            .await
            .unwrap()
    );
    assert!(
        api_keys::touch_last_used(&pool, key.id, at(61) + TimeDelta::minutes(5))
            .await
            .unwrap()
    );

    assert_eq!(
        last_used(&pool, other.id).await,
        None,
        "only that key was touched"
    );
    assert!(
        !api_keys::touch_last_used(&pool, Uuid::now_v7(), at(0))
            .await
            .unwrap()
    );

    let listed = api_keys::list_of_user(&pool, user.id, 10, None)
        .await
        .unwrap();
    let busy = listed.items.iter().find(|k| k.id == key.id).unwrap();
    assert_eq!(busy.last_used, Some(at(61) + TimeDelta::minutes(5)));
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_touches_write_once(pool: PgPool) {
    // Several replicas authenticate the same key at the same moment: one write between them.
    let user = make_user(&pool, "k@example.com").await;
    let key = api_keys::create(&pool, user.id, "shared")
        .await
        .unwrap()
        .key;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..8 {
        let pool = pool.clone();
        tasks.spawn(async move { api_keys::touch_last_used(&pool, key.id, at(n)).await });
    }
    let mut writes = 0;
    while let Some(joined) = tasks.join_next().await {
        if joined.unwrap().unwrap() {
            writes += 1;
        }
    }
    assert_eq!(writes, 1);
    let stamp = last_used(&pool, key.id).await.expect("written once");
    assert!(stamp >= at(0) && stamp <= at(7));
}

#[sqlx::test(migrations = "../migrations")]
async fn revoke_only_the_owners_key(pool: PgPool) {
    let alice = make_user(&pool, "alice@example.com").await;
    let bob = make_user(&pool, "bob@example.com").await;
    let alices = api_keys::create(&pool, alice.id, "a").await.unwrap();

    let result = api_keys::revoke(&pool, bob.id, alices.key.id).await;
    assert!(matches!(result, Err(DbError::NotFound)), "{result:?}");
    assert!(
        api_keys::validate(&pool, &alices.plaintext)
            .await
            .unwrap()
            .is_some(),
        "still active"
    );
    let result = api_keys::revoke(&pool, alice.id, Uuid::now_v7()).await;
    assert!(matches!(result, Err(DbError::NotFound)), "{result:?}");

    api_keys::revoke(&pool, alice.id, alices.key.id)
        .await
        .unwrap();
    assert!(
        api_keys::validate(&pool, &alices.plaintext)
            .await
            .unwrap()
            .is_none()
    );
    let revoked_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(alices.key.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(revoked_at.is_some());

    // Revoking twice is fine and keeps the first revocation time.
    api_keys::revoke(&pool, alice.id, alices.key.id)
        .await
        .unwrap();
    let again: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(alices.key.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(again, revoked_at);
}

#[sqlx::test(migrations = "../migrations")]
async fn revoke_all_of_user_revokes_only_that_users_active_keys(pool: PgPool) {
    let alice = make_user(&pool, "alice@example.com").await;
    let bob = make_user(&pool, "bob@example.com").await;
    let mut alices = Vec::new();
    for n in 0..3 {
        alices.push(
            api_keys::create(&pool, alice.id, &format!("a{n}"))
                .await
                .unwrap(),
        );
    }
    api_keys::revoke(&pool, alice.id, alices[0].key.id)
        .await
        .unwrap();
    let bobs = api_keys::create(&pool, bob.id, "b").await.unwrap();

    assert_eq!(
        api_keys::revoke_all_of_user(&pool, alice.id).await.unwrap(),
        2
    );
    for key in &alices {
        assert!(
            api_keys::validate(&pool, &key.plaintext)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert!(
        api_keys::validate(&pool, &bobs.plaintext)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        api_keys::revoke_all_of_user(&pool, alice.id).await.unwrap(),
        0
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn list_of_user_pages_newest_first_with_revoked_keys(pool: PgPool) {
    let alice = make_user(&pool, "alice@example.com").await;
    let bob = make_user(&pool, "bob@example.com").await;
    api_keys::create(&pool, bob.id, "bob's").await.unwrap();

    let offsets = [0, 10, 10, 20, 30, 30, 30];
    let mut made = Vec::new();
    for (n, offset) in offsets.into_iter().enumerate() {
        let key = api_keys::create(&pool, alice.id, &format!("k{n}"))
            .await
            .unwrap()
            .key;
        sqlx::query("UPDATE api_keys SET created_at = $2 WHERE id = $1")
            .bind(key.id)
            .bind(at(offset))
            .execute(&pool)
            .await
            .unwrap();
        let revoked = n % 2 == 1;
        if revoked {
            api_keys::revoke(&pool, alice.id, key.id).await.unwrap();
        }
        made.push((at(offset), key.id, !revoked));
    }
    made.sort_by_key(|row| std::cmp::Reverse((row.0, row.1)));

    for limit in [1, 2, 3, 7, 50] {
        let mut served = Vec::new();
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = api_keys::list_of_user(&pool, alice.id, limit, cursor)
                .await
                .unwrap();
            assert!(page.items.len() <= limit);
            assert!(page.items.iter().all(|k| k.user_id == alice.id));
            served.extend(page.items.iter().map(|k| (k.created_at, k.id, k.is_active)));
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(served, made, "limit {limit}");
    }
    assert_eq!(
        made.iter().filter(|(_, _, active)| !active).count(),
        3,
        "revoked keys stay listed"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn find_by_id_finds_any_key_revoked_or_not(pool: PgPool) {
    let alice = make_user(&pool, "alice@example.com").await;
    let bob = make_user(&pool, "bob@example.com").await;
    let alices = api_keys::create(&pool, alice.id, "a").await.unwrap().key;
    let bobs = api_keys::create(&pool, bob.id, "b").await.unwrap().key;

    assert_eq!(
        api_keys::find_by_id(&pool, alices.id).await.unwrap(),
        alices
    );
    assert_eq!(api_keys::find_by_id(&pool, bobs.id).await.unwrap(), bobs);

    api_keys::revoke(&pool, alice.id, alices.id).await.unwrap();
    let revoked = api_keys::find_by_id(&pool, alices.id).await.unwrap();
    assert!(
        !revoked.is_active,
        "a revoked key is still found, as revoked"
    );
    assert_eq!(revoked.user_id, alice.id);

    let unknown = api_keys::find_by_id(&pool, Uuid::now_v7()).await;
    assert!(matches!(unknown, Err(DbError::NotFound)), "{unknown:?}");
}
