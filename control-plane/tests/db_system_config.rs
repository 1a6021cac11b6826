//! `db::system_config`: the migration's defaults, fallbacks for missing or unusable rows, set.

use emp_control_plane::db::system_config::{self, SystemConfig, keys};
use serde_json::{Value, json};
use sqlx::PgPool;

async fn delete_row(pool: &PgPool, key: &str) {
    sqlx::query("DELETE FROM system_config WHERE key = $1")
        .bind(key)
        .execute(pool)
        .await
        .unwrap();
}

async fn stored(pool: &PgPool, key: &str) -> Option<Value> {
    sqlx::query_scalar("SELECT value FROM system_config WHERE key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn load_reads_the_migrations_defaults(pool: PgPool) {
    let config = system_config::load(&pool).await.unwrap();
    assert_eq!(
        config,
        SystemConfig {
            max_concurrent_jobs_per_user: 10,
            default_job_timeout_minutes: 30,
            max_queue_size: 1000
        }
    );
    assert_eq!(config, SystemConfig::default());
    assert_eq!(config.default_job_timeout_seconds(), 1800);
}

#[sqlx::test(migrations = "../migrations")]
async fn set_then_load(pool: PgPool) {
    system_config::set(&pool, keys::MAX_CONCURRENT_JOBS_PER_USER, &json!(3))
        .await
        .unwrap();
    system_config::set(&pool, keys::DEFAULT_JOB_TIMEOUT_MINUTES, &json!("45"))
        .await
        .unwrap();
    system_config::set(&pool, keys::MAX_QUEUE_SIZE, &json!(50_000))
        .await
        .unwrap();
    assert_eq!(
        stored(&pool, keys::MAX_CONCURRENT_JOBS_PER_USER).await,
        Some(json!(3))
    );
    let config = system_config::load(&pool).await.unwrap();
    assert_eq!(
        config,
        SystemConfig {
            max_concurrent_jobs_per_user: 3,
            default_job_timeout_minutes: 45,
            max_queue_size: 50_000
        }
    );
    assert_eq!(config.default_job_timeout_seconds(), 2700);

    // Setting again overwrites (one row per key).
    system_config::set(&pool, keys::MAX_QUEUE_SIZE, &json!(7))
        .await
        .unwrap();
    assert_eq!(system_config::load(&pool).await.unwrap().max_queue_size, 7);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM system_config")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);

    // A key load does not know is stored and ignored.
    system_config::set(&pool, "something_else", &json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(stored(&pool, "something_else").await, Some(json!({"x": 1})));
    assert_eq!(
        system_config::load(&pool)
            .await
            .unwrap()
            .max_concurrent_jobs_per_user,
        3
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_missing_row_falls_back_to_its_default(pool: PgPool) {
    system_config::set(&pool, keys::MAX_QUEUE_SIZE, &json!(5))
        .await
        .unwrap();
    delete_row(&pool, keys::MAX_CONCURRENT_JOBS_PER_USER).await;
    delete_row(&pool, keys::DEFAULT_JOB_TIMEOUT_MINUTES).await;
    assert_eq!(
        system_config::load(&pool).await.unwrap(),
        SystemConfig {
            max_concurrent_jobs_per_user: 10,
            default_job_timeout_minutes: 30,
            max_queue_size: 5
        }
    );
    sqlx::query("DELETE FROM system_config")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        system_config::load(&pool).await.unwrap(),
        SystemConfig::default()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unusable_value_falls_back_to_its_default(pool: PgPool) {
    for bad in [
        json!(0),
        json!(-5),
        json!("0"),
        json!("-1"),
        json!(2.5),
        json!("lots"),
        json!(null),
        json!(true),
        json!([10]),
        json!({"value": 10}),
        json!(5_000_000_000_u64),
    ] {
        // Set a good value first, so that the fallback is the default and not what was there.
        system_config::set(&pool, keys::MAX_CONCURRENT_JOBS_PER_USER, &json!(4))
            .await
            .unwrap();
        assert_eq!(
            system_config::load(&pool)
                .await
                .unwrap()
                .max_concurrent_jobs_per_user,
            4
        );
        system_config::set(&pool, keys::MAX_CONCURRENT_JOBS_PER_USER, &bad)
            .await
            .unwrap();
        let config = system_config::load(&pool).await.unwrap();
        assert_eq!(config.max_concurrent_jobs_per_user, 10, "{bad}");
        assert_eq!(
            config.max_queue_size, 1000,
            "the others are unaffected by {bad}"
        );
    }
}
