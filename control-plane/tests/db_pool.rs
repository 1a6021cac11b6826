//! `db::connect_lazy` and the mapping of connection failures onto [`DbError::Unavailable`].

use emp_control_plane::config::Config;
use emp_control_plane::db::{self, DbError, users};

fn config(database_url: &str) -> Config {
    let database_url = database_url.to_owned();
    Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some(database_url.clone()),
        "DB_QUERY_TIMEOUT" => Some("1234".to_owned()),
        "DB_CONNECTION_LIMIT" => Some("2".to_owned()),
        _ => None,
    })
    .expect("valid configuration")
}

#[tokio::test]
async fn the_pool_connects_lazily_with_the_statement_timeout() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
    let pool = db::connect_lazy(&config(&url)).unwrap();
    assert_eq!(pool.size(), 0, "nothing connects before the first query");
    let (timeout, application): (String, String) = sqlx::query_as(
        "SELECT current_setting('statement_timeout'), current_setting('application_name')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(timeout, "1234ms");
    assert_eq!(application, "emp-control-plane");
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    // Nothing listens on port 1: the pool retries until its acquire timeout, then gives up.
    let pool = db::connect_lazy(&config("postgres://postgres@127.0.0.1:1/emp"))
        .expect("lazy: no connection yet");
    let error = users::count(&pool).await.expect_err("no database there");
    assert!(error.is_unavailable(), "{error:?}");
    assert!(matches!(error, DbError::Unavailable(_)));
    assert!(
        db::schema_is_current(&pool)
            .await
            .unwrap_err()
            .is_unavailable()
    );
}

#[test]
fn a_malformed_url_is_refused_before_connecting() {
    let result = db::connect_lazy(&config("postgres://[::1"));
    assert!(matches!(result, Err(DbError::Query(_))), "{result:?}");
}
