//! The plan of each case, as PostgreSQL ran the repository's own statement.
//!
//! The repositories' SQL lives inside `sqlx::query!` macros, so instead of copying it here to
//! `EXPLAIN` it, a separate connection `LOAD`s `auto_explain` (superuser only) with
//! `log_level = notice` and `log_format = json`: every statement it runs comes back to the
//! client as a NOTICE carrying `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of that very
//! statement. sqlx hands notices to `tracing` (target `sqlx::postgres::notice`), where
//! [`install_notice_capture`]'s layer keeps them; nothing else is traced, so measurements pay
//! nothing for it.
//!
//! Each case is called [`CALLS`] times with the same parameters: the first calls get custom
//! plans, and from the sixth on PostgreSQL may switch the prepared statement to a generic plan,
//! as it would on a long-lived pool connection. The report shows the last plan, and says so
//! when the indexes of the first differ.

use std::fmt::{self, Write as _};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context as _, bail};
use serde_json::Value;
use sqlx::PgConnection;
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

use super::measure::{Case, Samples};

/// Calls per case: five custom plans, then the plan cache decides.
const CALLS: usize = 8;

/// Where sqlx logs the server's notices.
const NOTICE_TARGET: &str = "sqlx::postgres::notice";

/// Notices received since the last [`take_notices`].
static NOTICES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the global tracing subscriber that keeps PostgreSQL's notices (and nothing else).
///
/// # Errors
/// A global subscriber is already installed.
pub fn install_notice_capture() -> anyhow::Result<()> {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(NoticeCapture))
        .context("cannot install the notice capture")
}

fn take_notices() -> Vec<String> {
    std::mem::take(&mut *NOTICES.lock().unwrap_or_else(PoisonError::into_inner))
}

struct NoticeCapture;

fn is_notice(metadata: &Metadata<'_>) -> bool {
    metadata.target() == NOTICE_TARGET
}

impl<S: Subscriber> Layer<S> for NoticeCapture {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if is_notice(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        is_notice(metadata)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut message = MessageField(None);
        event.record(&mut message);
        if let Some(text) = message.0 {
            NOTICES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(text);
        }
    }
}

/// Picks the `message` field out of an event.
struct MessageField(Option<String>);

impl Visit for MessageField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" && self.0.is_none() {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// One executed statement's plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The statement, as sent.
    pub query: String,
    /// The root plan node (`EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`'s `Plan`).
    pub root: Value,
}

impl Plan {
    /// Parses an auto_explain notice (`duration: … ms  plan:\n{json}`).
    fn from_notice(notice: &str) -> Option<Self> {
        let json: Value = serde_json::from_str(&notice[notice.find('{')?..]).ok()?;
        Some(Self {
            query: json.get("Query Text")?.as_str()?.to_owned(),
            root: json.get("Plan")?.clone(),
        })
    }

    /// The indexes the plan reads, in plan order, each once.
    pub fn indexes(&self) -> Vec<String> {
        let mut names = Vec::new();
        walk(&self.root, &mut |node| {
            if let Some(name) = node.get("Index Name").and_then(Value::as_str)
                && !names.iter().any(|known| known == name)
            {
                names.push(name.to_owned());
            }
        });
        names
    }

    /// The tables the plan reads whole.
    pub fn seq_scans(&self) -> Vec<String> {
        let mut tables = Vec::new();
        walk(&self.root, &mut |node| {
            if node.get("Node Type").and_then(Value::as_str) == Some("Seq Scan")
                && let Some(table) = node.get("Relation Name").and_then(Value::as_str)
                && !tables.iter().any(|known| known == table)
            {
                tables.push(table.to_owned());
            }
        });
        tables
    }

    /// What the plan reads, for the table: its indexes, then any sequential scans.
    pub fn access_summary(&self) -> String {
        let mut parts = self.indexes();
        parts.extend(
            self.seq_scans()
                .into_iter()
                .map(|t| format!("seq scan on {t}")),
        );
        if parts.is_empty() {
            "no index".into()
        } else {
            parts.join(", ")
        }
    }

    /// How long the executor took, in ms, as measured under auto_explain (timing on): the
    /// server's work short of turning rows into wire format and sending them.
    pub fn executor_ms(&self) -> Option<f64> {
        number(&self.root, "Actual Total Time")
    }

    /// The plan as an indented tree, close to `EXPLAIN (ANALYZE, BUFFERS)`'s text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        render_node(&self.root, 0, &mut out);
        out
    }
}

fn walk(node: &Value, visit: &mut impl FnMut(&Value)) {
    visit(node);
    for child in node
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        walk(child, visit);
    }
}

fn text<'v>(node: &'v Value, key: &str) -> Option<&'v str> {
    node.get(key).and_then(Value::as_str)
}

fn number(node: &Value, key: &str) -> Option<f64> {
    node.get(key).and_then(Value::as_f64)
}

/// `Hash Join` + join type `Left` → `Hash Left Join`, `Aggregate` + `Hashed` →
/// `HashAggregate`, `Index Scan` + `Backward` → `Index Scan Backward`, as EXPLAIN prints them.
fn node_title(node: &Value) -> String {
    let kind = text(node, "Node Type").unwrap_or("?");
    let mut title = match (kind, text(node, "Strategy")) {
        ("Aggregate", Some("Hashed")) => "HashAggregate".to_owned(),
        ("Aggregate", Some("Sorted")) => "GroupAggregate".to_owned(),
        ("Aggregate", Some("Mixed")) => "MixedAggregate".to_owned(),
        ("SetOp", Some("Hashed")) => "HashSetOp".to_owned(),
        _ => kind.to_owned(),
    };
    if let Some(join) = text(node, "Join Type").filter(|join| *join != "Inner") {
        title = match title.strip_suffix(" Join") {
            Some(method) => format!("{method} {join} Join"),
            None => format!("{title} {join} Join"),
        };
    }
    if text(node, "Scan Direction") == Some("Backward") {
        title.push_str(" Backward");
    }
    if let Some(index) = text(node, "Index Name") {
        let _ = write!(title, " using {index}");
    }
    if let Some(table) = text(node, "Relation Name") {
        let _ = write!(title, " on {table}");
        if let Some(alias) = text(node, "Alias").filter(|alias| *alias != table) {
            let _ = write!(title, " {alias}");
        }
    }
    if let Some(name) = text(node, "Subplan Name") {
        title = format!("{title} ({name})");
    }
    title
}

fn render_node(node: &Value, depth: usize, out: &mut String) {
    let pad = "      ".repeat(depth.saturating_sub(1)) + if depth > 0 { "  ->  " } else { "" };
    let _ = write!(out, "{pad}{}", node_title(node));
    let _ = write!(
        out,
        "  (rows={} actual rows={} loops={} time={:.3} ms)",
        number(node, "Plan Rows").unwrap_or(0.0),
        number(node, "Actual Rows").unwrap_or(0.0),
        number(node, "Actual Loops").unwrap_or(0.0),
        number(node, "Actual Total Time").unwrap_or(0.0),
    );
    out.push('\n');
    let detail = " ".repeat(pad.len() + 4);
    for key in [
        "Index Cond",
        "Recheck Cond",
        "Hash Cond",
        "Merge Cond",
        "Join Filter",
        "Filter",
    ] {
        if let Some(condition) = text(node, key) {
            let _ = writeln!(out, "{detail}{key}: {condition}");
        }
    }
    for key in ["Rows Removed by Filter", "Heap Fetches"] {
        if let Some(count) = number(node, key).filter(|count| *count > 0.0) {
            let _ = writeln!(out, "{detail}{key}: {count}");
        }
    }
    for key in ["Sort Key", "Group Key"] {
        if let Some(keys) = node.get(key).and_then(Value::as_array) {
            let keys: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
            let _ = writeln!(out, "{detail}{key}: {}", keys.join(", "));
        }
    }
    let hit = number(node, "Shared Hit Blocks").unwrap_or(0.0);
    let read = number(node, "Shared Read Blocks").unwrap_or(0.0);
    if hit > 0.0 || read > 0.0 {
        let _ = writeln!(out, "{detail}Buffers: shared hit={hit} read={read}");
    }
    for child in node
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        render_node(child, depth + 1, out);
    }
}

/// The plans of one case: of its first call and of its last.
#[derive(Debug, Clone)]
pub struct CasePlans {
    /// First call: a custom plan for the sample's parameters.
    pub first: Plan,
    /// Last call: what a long-lived connection runs (custom or generic).
    pub steady: Plan,
}

/// Catches the plans of every case on `conn`, a connection of its own (auto_explain stays
/// loaded in it). Each case gets its plans or the reason it has none.
///
/// # Errors
/// A repository call fails.
pub async fn capture(
    conn: &mut PgConnection,
    samples: &Samples,
) -> anyhow::Result<Vec<(Case, Result<CasePlans, String>)>> {
    // One call of each before auto_explain: sqlx looks up the enum types on a statement's
    // first use, and those catalog queries would be explained too.
    for case in Case::ALL {
        case.call(&mut *conn, samples, 0).await?;
    }
    if let Err(error) = sqlx::raw_sql(
        "LOAD 'auto_explain';
         SET auto_explain.log_min_duration = 0;
         SET auto_explain.log_analyze = on;
         SET auto_explain.log_buffers = on;
         SET auto_explain.log_format = 'json';
         SET auto_explain.log_level = 'notice';
         SET client_min_messages = 'notice';",
    )
    .execute(&mut *conn)
    .await
    {
        let reason = format!("no plan: auto_explain unavailable ({error})");
        return Ok(Case::ALL.map(|case| (case, Err(reason.clone()))).to_vec());
    }
    let mut plans = Vec::new();
    for case in Case::ALL {
        take_notices();
        let mut first = None;
        let mut last = None;
        for _ in 0..CALLS {
            case.call(&mut *conn, samples, 0).await?;
            let plan = take_notices()
                .iter()
                .filter_map(|notice| Plan::from_notice(notice))
                .rfind(|plan| {
                    !plan.query.contains("pg_catalog") && !plan.query.contains("pg_type")
                });
            if first.is_none() {
                first.clone_from(&plan);
            }
            last = plan;
        }
        let outcome = match (first, last) {
            (Some(first), Some(steady)) => Ok(CasePlans { first, steady }),
            _ => Err("no plan: auto_explain sent no notice".to_owned()),
        };
        plans.push((case, outcome));
    }
    sqlx::raw_sql("SET auto_explain.log_min_duration = -1")
        .execute(&mut *conn)
        .await?;
    Ok(plans)
}

/// Fails unless `plan` reads one index of each of the case's intended groups and reads no big
/// table whole; says which.
///
/// # Errors
/// The plan is not the intended one (the message says why).
pub fn check_intended(case: Case, plan: &Plan) -> anyhow::Result<()> {
    let used = plan.indexes();
    for group in case.intended_indexes() {
        if !group.iter().any(|index| used.iter().any(|u| u == index)) {
            bail!("reads none of {}", group.join(" / "));
        }
    }
    let big: Vec<String> = plan
        .seq_scans()
        .into_iter()
        .filter(|t| matches!(t.as_str(), "job_requests" | "job_executions" | "machines"))
        .collect();
    if !big.is_empty() {
        bail!("scans {} whole", big.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTICE: &str = r#"duration: 0.071 ms  plan:
{
  "Query Text": "SELECT id FROM job_requests WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2",
  "Plan": {
    "Node Type": "Limit", "Plan Rows": 51, "Actual Rows": 51, "Actual Loops": 1, "Actual Total Time": 0.05,
    "Plans": [
      {"Node Type": "Index Scan", "Parent Relationship": "Outer", "Scan Direction": "Forward",
       "Index Name": "job_requests_user_created_idx", "Relation Name": "job_requests", "Alias": "job_requests",
       "Plan Rows": 900, "Actual Rows": 51, "Actual Loops": 1, "Actual Total Time": 0.04,
       "Index Cond": "(user_id = $1)", "Shared Hit Blocks": 55, "Shared Read Blocks": 0},
      {"Node Type": "Seq Scan", "Relation Name": "users", "Alias": "u", "Plan Rows": 1}
    ]
  }
}"#;

    #[test]
    fn reads_an_auto_explain_notice() {
        let plan = Plan::from_notice(NOTICE).unwrap();
        assert!(plan.query.starts_with("SELECT id FROM job_requests"));
        assert_eq!(plan.indexes(), ["job_requests_user_created_idx"]);
        assert_eq!(plan.seq_scans(), ["users"]);
        assert_eq!(
            plan.access_summary(),
            "job_requests_user_created_idx, seq scan on users"
        );
        let text = plan.render();
        assert!(text.starts_with("Limit  (rows=51 actual rows=51"), "{text}");
        assert!(
            text.contains(
                "  ->  Index Scan using job_requests_user_created_idx on job_requests  (rows=900"
            ),
            "{text}"
        );
        assert!(text.contains("Index Cond: (user_id = $1)"), "{text}");
        assert!(
            text.contains("  ->  Seq Scan on users u  (rows=1"),
            "{text}"
        );
        assert!(Plan::from_notice("duration: 1 ms  plan: garbage").is_none());
    }

    #[test]
    fn names_nodes_as_explain_does() {
        let node: Value = serde_json::json!({
            "Node Type": "Hash Join", "Join Type": "Left"
        });
        assert_eq!(node_title(&node), "Hash Left Join");
        let node: Value = serde_json::json!({
            "Node Type": "Index Only Scan", "Scan Direction": "Backward",
            "Index Name": "i", "Relation Name": "t", "Alias": "t"
        });
        assert_eq!(node_title(&node), "Index Only Scan Backward using i on t");
        let node: Value = serde_json::json!({ "Node Type": "Aggregate", "Strategy": "Hashed" });
        assert_eq!(node_title(&node), "HashAggregate");
    }

    #[test]
    fn checks_the_intended_indexes() {
        let plan = Plan::from_notice(NOTICE).unwrap();
        assert!(check_intended(Case::HistoryFirst, &plan).is_ok());
        let error = check_intended(Case::FindById, &plan).unwrap_err();
        assert_eq!(error.to_string(), "reads none of job_requests_pkey");
    }
}
