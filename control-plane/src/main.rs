//! `emp-control-plane`: `migrate`, `serve`, `admin create-user`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use emp_control_plane::config::Config;
use emp_control_plane::db::{self, users};
use emp_control_plane::server::{self, ServeError};
use emp_control_plane::telemetry;
use tokio_util::sync::CancellationToken;

/// Exit status for a configuration error (sysexits `EX_CONFIG`-style, as the contract says).
const EXIT_CONFIG: u8 = 64;
/// Exit status when a required service is unreachable at start (`EX_UNAVAILABLE`).
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "emp-control-plane",
    version,
    about = "emp's control plane: REST API, persistence and dispatch duties"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations and exit.
    Migrate,
    /// Run the REST API and background duties until SIGTERM/SIGINT.
    Serve,
    /// Administrative tasks.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user and print their first API key on stdout.
    CreateUser {
        /// The user's email (unique).
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Migrate => migrate(&config).await,
        Command::Serve => serve(config).await,
        Command::Admin {
            command: AdminCommand::CreateUser { email, name, admin },
        } => create_user(&config, &email, name.as_deref(), admin).await,
    }
}

async fn migrate(config: &Config) -> ExitCode {
    let pool = match db::connect_lazy(config) {
        Ok(pool) => pool,
        Err(error) => {
            eprintln!("DATABASE_URL: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match server::migrate_with_retry(&pool).await {
        Ok(()) => {
            eprintln!("migrations applied");
            ExitCode::SUCCESS
        }
        Err(error @ ServeError::DatabaseUnreachable(_)) => {
            eprintln!("{error}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    tracing::info!(?config, "starting");
    let shutdown = CancellationToken::new();
    server::cancel_on_signal(shutdown.clone());
    match server::serve(config, shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(error @ ServeError::DatabaseUnreachable(_)) => {
            tracing::error!(%error, "cannot start");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(error) => {
            tracing::error!(%error, "cannot start");
            ExitCode::FAILURE
        }
    }
}

async fn create_user(config: &Config, email: &str, name: Option<&str>, admin: bool) -> ExitCode {
    let pool = match db::connect_lazy(config) {
        Ok(pool) => pool,
        Err(error) => {
            eprintln!("DATABASE_URL: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let role = if admin {
        users::Role::Admin
    } else {
        users::Role::User
    };
    match users::create_with_key(&pool, email, name, role, "bootstrap").await {
        Ok((user, key)) => {
            eprintln!(
                "created {} user {} ({})",
                if admin { "admin" } else { "plain" },
                user.email,
                user.id
            );
            println!("{}", key.plaintext);
            ExitCode::SUCCESS
        }
        Err(db::DbError::Conflict { .. }) => {
            eprintln!("a user with email {email} already exists");
            ExitCode::FAILURE
        }
        Err(error) if error.is_unavailable() => {
            eprintln!("PostgreSQL is unreachable: {error}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(error) => {
            eprintln!("cannot create the user: {error:?}");
            ExitCode::FAILURE
        }
    }
}
