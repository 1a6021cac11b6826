//! The command line: every command, flag and help text (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clap_complete::Shell;
use uuid::Uuid;

use crate::error::EXIT_CODES_HELP;

const ABOUT: &str = "The command line of emp: submit ComfyUI jobs to the fleet and manage it.";

const AFTER_HELP: &str = "\
Configuration (first found wins):
  --api-url / EMP_API_URL    the control plane, e.g. http://127.0.0.1:8080
  --api-key / EMP_API_KEY    an API key, emp_…
  the config file            written by `emp login` ($EMP_CONFIG, else
                             $XDG_CONFIG_HOME/emp/config.toml, else ~/.config/emp/config.toml)

Output: human tables on stdout by default; --json prints the API's JSON as it came.
Errors go to stderr.";

/// `emp`.
#[derive(Debug, Parser)]
#[command(name = "emp", version, about = ABOUT, after_long_help = format!("{AFTER_HELP}\n\n{EXIT_CODES_HELP}"), after_help = "See `emp --help` for configuration and exit codes.")]
pub struct Cli {
    /// Base URL of the control plane.
    #[arg(long, global = true, env = "EMP_API_URL", value_name = "URL")]
    pub api_url: Option<String>,
    /// API key (`emp_…`).
    #[arg(
        long,
        global = true,
        env = "EMP_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Print the API's JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job: a workflow file (ComfyUI API format) or a template with parameters.
    Submit(SubmitArgs),
    /// Your jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Workflow templates.
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// The fleet's machines (admin).
    #[command(subcommand)]
    Machines(MachinesCommand),
    /// Your API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Job and machine counts (admin).
    Stats,
    /// Check a key against the API and store it with the URL in the config file (the key
    /// from --api-key or EMP_API_KEY, else read from stdin).
    Login,
    /// Print a shell completion script: `emp completions bash > /etc/bash_completion.d/emp`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// `emp submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The workflow, a JSON file in ComfyUI's API format (`-` reads stdin). Not with
    /// --template.
    #[arg(
        value_name = "WORKFLOW.json",
        required_unless_present = "template",
        conflicts_with = "template"
    )]
    pub workflow: Option<PathBuf>,
    /// Run this template instead of a workflow file.
    #[arg(long, value_name = "ID")]
    pub template: Option<Uuid>,
    /// A template parameter; VALUE is taken as JSON when it parses (`seed=7`, `cfg=7.5`,
    /// `flag=true`), else as text (`prompt=a cat`). Repeat for more.
    #[arg(long = "param", value_name = "NAME=VALUE", requires = "template")]
    pub params: Vec<String>,
    /// Priority 0–100 (default 10); higher runs first.
    #[arg(long, value_name = "N")]
    pub priority: Option<u32>,
    /// A requirement on the machine: gpu=4090, vram=16, model=FILE, node=CLASS,
    /// provider=salad, region=us-east (long names gpu_model, min_vram_gb, models,
    /// node_types work too). Repeat for more.
    #[arg(long = "require", value_name = "KEY=VALUE")]
    pub requires: Vec<String>,
    /// Runs allowed, 1–10 (default 3).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Hard time limit of one run, in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u32>,
    /// Metadata to keep with the job: a JSON object.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// A webhook URL for the job's end.
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// `Idempotency-Key`: the same key again returns the first job instead of a new one.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Follow the job to its end with a progress bar, then download its outputs. The exit
    /// code tells how it ended (0 COMPLETED, 3 FAILED or CANCELLED).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub download: DownloadArgs,
}

/// Where outputs go.
#[derive(Debug, Args, Clone)]
pub struct DownloadArgs {
    /// Folder the outputs are downloaded into (created when missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub output_dir: PathBuf,
}

/// List paging.
#[derive(Debug, Args, Clone)]
pub struct PageArgs {
    /// Items per page, 1–200 (default 50).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[arg(long, value_name = "CURSOR")]
    pub cursor: Option<String>,
}

/// `emp jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List your jobs, newest first.
    List {
        /// Only jobs in this status (QUEUED, PROCESSING, COMPLETED, FAILED, CANCELLED).
        #[arg(long, value_parser = parse_status::<emp_shared::status::JobStatus>)]
        status: Option<emp_shared::status::JobStatus>,
        /// Another user's jobs (admin).
        #[arg(long, value_name = "ID")]
        user_id: Option<Uuid>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one job.
    Get {
        /// The job's id.
        id: Uuid,
    },
    /// Cancel a job (a running one stops shortly after).
    Cancel {
        /// The job's id.
        id: Uuid,
    },
    /// List a job's outputs, or download them with --download.
    Outputs {
        /// The job's id.
        id: Uuid,
        /// Download every output.
        #[arg(long)]
        download: bool,
        #[command(flatten)]
        to: DownloadArgs,
    },
    /// A job's executions (one per run), in start order.
    Executions {
        /// The job's id.
        id: Uuid,
    },
    /// Follow a job to its end like `submit --wait`, then download its outputs.
    Wait {
        /// The job's id.
        id: Uuid,
        #[command(flatten)]
        to: DownloadArgs,
    },
}

/// `emp templates …`.
#[derive(Debug, Subcommand)]
pub enum TemplatesCommand {
    /// Your templates and the public ones.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one template.
    Get {
        /// The template's id.
        id: Uuid,
    },
    /// Create a template from a workflow file with `{{placeholders}}`.
    Create {
        /// Its name.
        #[arg(long)]
        name: String,
        /// The workflow, a JSON file (`-` reads stdin).
        #[arg(long, value_name = "WORKFLOW.json")]
        file: PathBuf,
        /// A description.
        #[arg(long)]
        description: Option<String>,
        /// A category.
        #[arg(long)]
        category: Option<String>,
        /// Visible to every user.
        #[arg(long)]
        public: bool,
    },
    /// Change a template.
    Update {
        /// The template's id.
        id: Uuid,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        /// A new workflow file.
        #[arg(long, value_name = "WORKFLOW.json")]
        file: Option<PathBuf>,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
        /// A new category.
        #[arg(long)]
        category: Option<String>,
        /// Public or not.
        #[arg(long, value_name = "BOOL")]
        public: Option<bool>,
    },
    /// Delete a template.
    Delete {
        /// The template's id.
        id: Uuid,
    },
}

/// `emp machines …`.
#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// List machines.
    List {
        /// Only machines in this status (AVAILABLE, BUSY, DRAINING, …).
        #[arg(long, value_parser = parse_status::<emp_shared::status::MachineStatus>)]
        status: Option<emp_shared::status::MachineStatus>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one machine.
    Get {
        /// The machine's id.
        id: Uuid,
    },
    /// Stop giving a machine new jobs; its running ones finish.
    Drain {
        /// The machine's id.
        id: Uuid,
    },
    /// Give a drained machine jobs again.
    Undrain {
        /// The machine's id.
        id: Uuid,
    },
}

/// `emp keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; it is shown this once.
    Create {
        /// A name to recognise it by.
        name: String,
        /// For another user (admin).
        #[arg(long, value_name = "ID")]
        user_id: Option<Uuid>,
    },
    /// List your keys (revoked ones too).
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Revoke a key; it stops working at once.
    Revoke {
        /// The key's id.
        id: Uuid,
    },
}

/// A status word, in any case.
fn parse_status<T>(word: &str) -> Result<T, emp_shared::status::UnknownStatus>
where
    T: std::str::FromStr<Err = emp_shared::status::UnknownStatus>,
{
    word.to_ascii_uppercase().parse()
}
