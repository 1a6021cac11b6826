//! The benchmark database: where it is, dropping and creating it, connecting to it.
//!
//! A benchmark owns its database outright: [`BenchDb::recreate`] drops it with whatever is in
//! it. It only ever drops the database named in the URL, and refuses the ones every cluster
//! needs.

use std::str::FromStr;

use anyhow::{Context as _, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgConnection, PgPool};

/// Databases that are never dropped, whatever the URL says.
const PROTECTED: &[&str] = &["postgres", "template0", "template1"];

/// The database a benchmark fills and measures.
#[derive(Debug, Clone)]
pub struct BenchDb {
    options: PgConnectOptions,
    name: String,
}

impl BenchDb {
    /// Parses a `postgres://` URL, which must name its database.
    ///
    /// # Errors
    /// Not a valid URL, no database in it, or a database that may not be dropped.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .with_context(|| format!("{url} is not a PostgreSQL URL"))?
            .application_name("emp-bench")
            .disable_statement_logging();
        let name = options
            .get_database()
            .context("the database URL must name the benchmark's database")?
            .to_owned();
        if PROTECTED.contains(&name.as_str()) {
            bail!("refusing to use {name:?} as the benchmark database: it would be dropped");
        }
        Ok(Self { options, name })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection to the cluster's `postgres` database, to drop and create this one.
    async fn admin(&self) -> anyhow::Result<PgConnection> {
        let options = self.options.clone().database("postgres");
        options
            .connect()
            .await
            .context("cannot connect to the `postgres` database of the benchmark's server")
    }

    /// Whether the database exists.
    ///
    /// # Errors
    /// The server is unreachable.
    pub async fn exists(&self) -> anyhow::Result<bool> {
        let mut admin = self.admin().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&self.name)
                .fetch_one(&mut admin)
                .await?;
        admin.close().await?;
        Ok(exists)
    }

    /// Drops the database (ending its sessions) and creates it empty.
    ///
    /// # Errors
    /// The server is unreachable or the user may not create databases.
    pub async fn recreate(&self) -> anyhow::Result<()> {
        let quoted = format!("\"{}\"", self.name.replace('"', "\"\""));
        let mut admin = self.admin().await?;
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot drop database {quoted}"))?;
        sqlx::raw_sql(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot create database {quoted}"))?;
        admin.close().await?;
        Ok(())
    }

    /// One connection to the database.
    ///
    /// # Errors
    /// The server is unreachable or the database does not exist.
    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        self.options
            .connect()
            .await
            .with_context(|| format!("cannot connect to database {:?}", self.name))
    }

    /// A pool of up to `size` connections, opened before it is returned.
    ///
    /// # Errors
    /// The server is unreachable or the database does not exist.
    pub async fn pool(&self, size: u32) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(size)
            .min_connections(size)
            .connect_with(self.options.clone())
            .await
            .with_context(|| format!("cannot connect to database {:?}", self.name))
    }
}
