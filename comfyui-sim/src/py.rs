//! Python's view of JSON values.
//!
//! ComfyUI is a Python server: its error messages embed `str()`/`repr()` of values, its checks use
//! Python truthiness and `int()`/`float()` conversions, and it writes PNG metadata with
//! `json.dumps`. Clients match on those strings, so the simulator reproduces them here.

use std::fmt::Write as _;

use serde_json::{Number, Value};

/// `repr(float)`: shortest round-trip digits, always with a fraction or exponent.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let magnitude = x.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        // Rust writes `1e-5` / `1.5e20`; Python writes `1e-05` / `1.5e+20`.
        let text = format!("{x:e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let (sign, digits) = match exponent.strip_prefix('-') {
            Some(digits) => ('-', digits),
            None => ('+', exponent),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn number_repr(number: &Number) -> String {
    if number.is_f64() {
        float_repr(number.as_f64().unwrap_or(f64::NAN))
    } else {
        number.to_string()
    }
}

fn string_repr(text: &str, out: &mut String) {
    // Python prefers single quotes and switches to double quotes only to avoid escaping.
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `repr(value)` of the Python object that `json.loads` would have produced.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

fn write_repr(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(number) => out.push_str(&number_repr(number)),
        Value::String(text) => string_repr(text, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                string_repr(key, out);
                out.push_str(": ");
                write_repr(item, out);
            }
            out.push('}');
        }
    }
}

/// `str(value)`: strings as they are, everything else as its repr.
pub fn str(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => repr(other),
    }
}

/// Python truthiness of a JSON value.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

/// Python's type name, for `TypeError` messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// A number as Python sees it: ints are unbounded there, so keep them wide.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    pub fn of(value: &Value) -> Option<Num> {
        match value {
            Value::Bool(b) => Some(Num::Int(i128::from(*b))),
            Value::Number(n) => Some(if let Some(i) = n.as_i64() {
                Num::Int(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Num::Int(i128::from(u))
            } else {
                Num::Float(n.as_f64().unwrap_or(f64::NAN))
            }),
            _ => None,
        }
    }

    pub fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(x) => x,
        }
    }

    pub fn lt(self, other: Num) -> bool {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a < b,
            (a, b) => a.as_f64() < b.as_f64(),
        }
    }
}

fn int_value(i: i128) -> Value {
    if let Ok(small) = i64::try_from(i) {
        Value::from(small)
    } else if let Ok(big) = u64::try_from(i) {
        Value::from(big)
    } else {
        Value::from(i as f64)
    }
}

/// `int(value)`, with Python's error text on failure.
pub fn to_int(value: &Value) -> Result<Value, String> {
    match value {
        Value::Bool(_) | Value::Number(_) => match Num::of(value) {
            Some(Num::Int(i)) => Ok(int_value(i)),
            Some(Num::Float(x)) if x.is_finite() => Ok(int_value(x.trunc() as i128)),
            _ => Err("cannot convert float infinity to integer".into()),
        },
        Value::String(text) => {
            let cleaned: String = text.trim().chars().filter(|c| *c != '_').collect();
            cleaned
                .parse::<i128>()
                .map(int_value)
                .map_err(|_| format!("invalid literal for int() with base 10: {}", repr(value)))
        }
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            type_name(other)
        )),
    }
}

/// `float(value)`, with Python's error text on failure.
pub fn to_float(value: &Value) -> Result<Value, String> {
    let parsed = match value {
        Value::Bool(_) | Value::Number(_) => Num::of(value).map(Num::as_f64),
        Value::String(text) => {
            let trimmed = text.trim();
            match trimmed.to_ascii_lowercase().as_str() {
                "nan" | "+nan" | "-nan" => Some(f64::NAN),
                "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
                "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
                _ => trimmed.parse::<f64>().ok(),
            }
            .ok_or_else(|| format!("could not convert string to float: {}", repr(value)))
            .map(Some)?
        }
        other => {
            return Err(format!(
                "float() argument must be a string or a real number, not '{}'",
                type_name(other)
            ));
        }
    };
    let x = parsed.unwrap_or(f64::NAN);
    // JSON cannot carry NaN or infinities; keep the value as text rather than lose it.
    Ok(Number::from_f64(x).map_or_else(|| Value::String(float_repr(x)), Value::Number))
}

/// Python `==` between two JSON-decoded values (so `1 == 1.0 == True`).
#[allow(
    clippy::float_cmp,
    reason = "Python's == on floats is exact, and that is what is mimicked"
)]
pub fn equals(a: &Value, b: &Value) -> bool {
    match (Num::of(a), Num::of(b)) {
        (Some(Num::Int(x)), Some(Num::Int(y))) => x == y,
        (Some(x), Some(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// `json.dumps(value)` with Python's defaults: `", "` and `": "` separators and ASCII-only output.
pub fn dumps(value: &Value) -> String {
    let mut out = String::new();
    write_dumps(value, &mut out);
    out
}

/// `json.dumps` of an object whose keys must keep their order (a prompt graph).
pub fn dumps_entries<'a>(entries: impl IntoIterator<Item = (&'a str, &'a Value)>) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_json_string(key, &mut out);
        out.push_str(": ");
        write_dumps(value, &mut out);
    }
    out.push('}');
    out
}

fn write_dumps(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number_repr(n)),
        Value::String(text) => write_json_string(text, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_dumps(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push_str(&dumps_entries(map.iter().map(|(k, v)| (k.as_str(), v))));
        }
    }
}

fn write_json_string(text: &str, out: &mut String) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii() && (c as u32) >= 0x20 => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn floats_print_like_python() {
        assert_eq!(float_repr(1.0), "1.0");
        assert_eq!(float_repr(0.1), "0.1");
        assert_eq!(float_repr(1e-5), "1e-05");
        assert_eq!(float_repr(1.5e20), "1.5e+20");
        assert_eq!(float_repr(-2.0), "-2.0");
    }

    #[test]
    fn reprs_match_python() {
        assert_eq!(
            repr(&json!(["a", 1, 2.5, null, true])),
            "['a', 1, 2.5, None, True]"
        );
        assert_eq!(repr(&json!("it's")), "\"it's\"");
        assert_eq!(str(&json!("plain")), "plain");
    }

    #[test]
    fn conversions_follow_python() {
        assert_eq!(to_int(&json!(3.9)).unwrap(), json!(3));
        assert_eq!(to_int(&json!("12")).unwrap(), json!(12));
        assert_eq!(to_int(&json!(true)).unwrap(), json!(1));
        assert_eq!(
            to_int(&json!("x")).unwrap_err(),
            "invalid literal for int() with base 10: 'x'"
        );
        assert_eq!(to_float(&json!(2)).unwrap(), json!(2.0));
        assert!(to_float(&json!(null)).is_err());
    }

    #[test]
    fn dumps_is_ascii_with_python_separators() {
        assert_eq!(dumps(&json!({"a": [1, "é"]})), "{\"a\": [1, \"\\u00e9\"]}");
    }
}
