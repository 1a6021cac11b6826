//! What the commands print: the API's JSON as it came (`--json`), or tables and key/value
//! blocks for people. Values missing or `null` print as `-`.

use comfy_table::{Table, presets};
use serde_json::Value;

/// Prints `value` as JSON (indented; the content is the API's, unchanged).
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A borderless table with a header row.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(headers.to_vec());
    for row in rows {
        table.add_row(row);
    }
    // comfy-table pads every cell with one space on each side; the first column's leading
    // space is dropped so the table starts at the margin.
    table
        .to_string()
        .lines()
        .map(|line| line.strip_prefix(' ').unwrap_or(line).trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints `label: value` lines, labels aligned.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0);
    for (label, value) in fields {
        println!("{label:width$}  {value}");
    }
}

/// `value[key]` as text: strings as they are, `null` or missing as `-`, anything else as JSON.
pub fn text(value: &Value, key: &str) -> String {
    show(value.get(key).unwrap_or(&Value::Null))
}

/// A JSON value as table text.
pub fn show(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// An RFC 3339 timestamp without its fraction of a second (`2026-01-02T03:04:05Z`).
pub fn time(value: &Value, key: &str) -> String {
    match value.get(key).and_then(Value::as_str) {
        Some(stamp) => match (stamp.find('.'), stamp.ends_with('Z')) {
            (Some(dot), true) => format!("{}Z", &stamp[..dot]),
            _ => stamp.to_owned(),
        },
        None => "-".to_owned(),
    }
}

/// The items of a list answer.
pub fn items(list: &Value) -> &[Value] {
    list.get("items")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Tells (on stderr, so stdout stays the table) how to get the next page, if there is one.
pub fn next_page_hint(list: &Value) {
    if let Some(cursor) = list.get("next_cursor").and_then(Value::as_str) {
        eprintln!("more: add --cursor {cursor}");
    }
}

/// A byte count for people (`12.3 KiB`).
pub fn bytes(size: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if size < 1024 {
        return format!("{size} B");
    }
    let mut value = size as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn values_print_for_people() {
        let value = json!({"a": "x", "b": null, "c": 3, "t": "2026-01-02T03:04:05.123456Z"});
        assert_eq!(text(&value, "a"), "x");
        assert_eq!(text(&value, "b"), "-");
        assert_eq!(text(&value, "missing"), "-");
        assert_eq!(text(&value, "c"), "3");
        assert_eq!(time(&value, "t"), "2026-01-02T03:04:05Z");
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn a_table_starts_at_the_margin_with_its_header() {
        let text = table(&["ID", "STATUS"], vec![vec!["a".into(), "QUEUED".into()]]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"), "{text}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with('a') && l.contains("QUEUED")),
            "{text}"
        );
    }
}
