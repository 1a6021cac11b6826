//! JSON request bodies with the contract's answers instead of axum's plain-text rejections:
//!
//! - not `application/json` (parameters such as `charset` allowed), not JSON, or a top level
//!   that is not an object → `400 malformed_json`;
//! - more than `EMP_MAX_BODY_BYTES` → `413 payload_too_large` (exactly that many is fine);
//! - a key `__proto__`, `constructor` or `prototype` at any depth, a value that could not be
//!   stored and read back (a string or a key holding the NUL character U+0000, which
//!   PostgreSQL refuses in `text` and `jsonb` alike; a number whose exact decimal digits, as
//!   `jsonb` gives them back, do not parse as a double again), a field of the wrong type, a
//!   missing or an unknown field → `422 validation_failed` naming the field by its dotted path
//!   (`requirements.models.2`).
//!
//! [`ApiJson`] reads and checks the body as it is extracted. Where the contract wants the
//! resource checked first (`404` before `400`/`413`/`422`, e.g. `PATCH /templates/{id}`), take
//! a [`JsonBody`] instead and call [`JsonBody::parse`] once the resource is known: it holds the
//! body unread until then.
//!
//! Request types derive `Deserialize` with `#[serde(deny_unknown_fields)]`; a field that may be
//! given as `null` to clear it is `Option<Option<T>>` with
//! `#[serde(default, deserialize_with = "nullable")]`.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use emp_shared::workflow::{FieldError, MAX_ERRORS, forbidden_keys};
use futures::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::http::AppState;
use crate::http::error::ApiError;

/// A request body, checked and deserialised into `T` as it is extracted. Put it last among a
/// handler's arguments.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

/// A request body not read yet: [`JsonBody::parse`] reads and checks it when the handler is
/// ready to, after the checks that the contract puts before the body.
#[derive(Debug)]
pub struct JsonBody {
    headers: HeaderMap,
    body: Body,
    limit: usize,
}

impl<T> FromRequest<AppState> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let body = JsonBody::from_request(request, state).await?;
        body.parse().await.map(Self)
    }
}

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        Ok(Self {
            headers: parts.headers,
            body,
            limit: state.config.max_body_bytes,
        })
    }
}

impl JsonBody {
    /// Reads the body and deserialises it into `T`.
    ///
    /// # Errors
    /// `400 malformed_json`, `413 payload_too_large` or `422 validation_failed`, as the module
    /// documentation says.
    pub async fn parse<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        let value = self.parse_object().await?;
        from_object(value)
    }

    /// Reads the body and checks that it is a JSON object free of forbidden keys and of values
    /// that cannot be stored, without giving it a type (for handlers that need the raw value
    /// too, e.g. an idempotency hash).
    ///
    /// # Errors
    /// `400 malformed_json`, `413 payload_too_large`, or `422 validation_failed` for forbidden
    /// keys and values that cannot be stored.
    pub async fn parse_object(self) -> Result<Value, ApiError> {
        if !is_json_content_type(&self.headers) {
            return Err(ApiError::malformed_json(
                "The body must be JSON sent with `Content-Type: application/json`.",
            ));
        }
        let bytes = read_limited(&self.headers, self.body, self.limit).await?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|error| {
            ApiError::malformed_json(format!("The body is not valid JSON: {error}."))
        })?;
        if !value.is_object() {
            return Err(ApiError::malformed_json("The body must be a JSON object."));
        }
        let forbidden = forbidden_keys(&value, "");
        if !forbidden.is_empty() {
            return Err(ApiError::validation(forbidden));
        }
        let mut unstorable = Vec::new();
        unstorable_values(&value, "", &mut unstorable);
        if !unstorable.is_empty() {
            return Err(ApiError::validation(unstorable));
        }
        Ok(value)
    }
}

/// Records, under its dotted path, every value in `value` that PostgreSQL could not store or
/// that could not be read back once stored: strings and object keys holding the NUL character
/// (refused in `text` and `jsonb` alike) and numbers for which [`reads_back`] fails. Without
/// this check such a body is a `500`, or worse a row that breaks every later read of it.
/// Stops at [`MAX_ERRORS`]. (`serde_json` nests at most 128 levels deep, which bounds the
/// recursion.)
fn unstorable_values(value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    const NUL: &str = "must not contain the NUL character (U+0000)";
    let here = || if path.is_empty() { "body" } else { path };
    let child = |segment: &str| {
        if path.is_empty() {
            segment.to_owned()
        } else {
            format!("{path}.{segment}")
        }
    };
    match value {
        Value::String(text) if text.contains('\0') => errors.push(FieldError::new(here(), NUL)),
        Value::Number(number) if !reads_back(number) => errors.push(FieldError::new(
            here(),
            "must be a number that can be stored: this one is too close to the largest \
             double-precision number",
        )),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                if errors.len() >= MAX_ERRORS {
                    return;
                }
                unstorable_values(item, &child(&index.to_string()), errors);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                if errors.len() >= MAX_ERRORS {
                    return;
                }
                let field = child(key);
                if key.contains('\0') {
                    errors.push(FieldError::new(field, NUL));
                } else {
                    unstorable_values(item, &field, errors);
                }
            }
        }
        _ => {}
    }
}

/// Deserialises an already checked body into `T`, naming the offending field on failure.
///
/// # Errors
/// `422 validation_failed` with the field's dotted path.
pub fn from_object<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value)
        .map_err(|error| ApiError::validation(vec![field_error(&error)]))
}

/// `application/json`, with any parameters, compared case-insensitively.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Collects the body, refusing it as soon as it is known to be over `limit` bytes (from
/// `Content-Length`, or while streaming a body without one).
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut bytes = Vec::with_capacity(declared.map_or(0, |length| length as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::bad_request("The request body could not be read."))?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Turns a deserialisation error into `{field, problem}`: the path serde was at, plus the field
/// name for a missing one (serde reports those at the enclosing object).
fn field_error(error: &serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let mut path = dotted_path(error.path());
    let message = error.inner().to_string();
    let message = strip_position(&message);
    let problem = if let Some(name) = between(message, "missing field `", "`") {
        push_segment(&mut path, name);
        "is required".to_owned()
    } else if message.starts_with("unknown field `") {
        "is not a known field".to_owned()
    } else if let Some(expected) = message.strip_prefix("unknown variant ").and_then(|rest| {
        rest.split_once(", expected ")
            .map(|(_, expected)| expected.to_owned())
    }) {
        format!("must be {}", expected.replace('`', "\""))
    } else if let Some((_, expected)) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .or_else(|| message.strip_prefix("invalid length "))
        .and_then(|rest| rest.split_once(", expected "))
    {
        format!("must be {}", describe_expected(expected))
    } else {
        message.to_owned()
    };
    FieldError::new(if path.is_empty() { "body" } else { &path }, problem)
}

/// `a.b[2].c` as the contract's `a.b.2.c`.
fn dotted_path(path: &serde_path_to_error::Path) -> String {
    let mut dotted = String::new();
    for segment in path {
        match segment {
            serde_path_to_error::Segment::Map { key } => push_segment(&mut dotted, key),
            serde_path_to_error::Segment::Seq { index } => {
                push_segment(&mut dotted, &index.to_string());
            }
            serde_path_to_error::Segment::Enum { variant } => push_segment(&mut dotted, variant),
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    dotted
}

fn push_segment(path: &mut String, segment: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(segment);
}

/// serde_json's messages end in ` at line 1 column 5` when parsed from text; not from a value,
/// but strip it in case.
fn strip_position(message: &str) -> &str {
    message
        .rsplit_once(" at line ")
        .map_or(message, |(head, _)| head)
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = text.strip_prefix(start)?;
    rest.split_once(end).map(|(inner, _)| inner)
}

/// serde's "expected" phrases in words a client understands.
fn describe_expected(expected: &str) -> String {
    let integer = [
        "u8", "u16", "u32", "u64", "usize", "i8", "i16", "i32", "i64", "isize",
    ];
    if integer.contains(&expected) {
        let range = match expected {
            "u8" => Some((0, i128::from(u8::MAX))),
            "u16" => Some((0, i128::from(u16::MAX))),
            "u32" => Some((0, i128::from(u32::MAX))),
            "i32" => Some((i128::from(i32::MIN), i128::from(i32::MAX))),
            _ => None,
        };
        return match range {
            Some((low, high)) => format!("an integer from {low} to {high}"),
            None => "an integer".to_owned(),
        };
    }
    if expected == "f32" || expected == "f64" {
        return "a number".to_owned();
    }
    if expected.starts_with("struct ") || expected == "a map" {
        return "an object".to_owned();
    }
    if expected == "a sequence" {
        return "a list".to_owned();
    }
    if expected == "a UUID string" || expected.contains("UUID") {
        return "a UUID".to_owned();
    }
    expected.replace('`', "\"")
}

/// For `Option<Option<T>>` fields: absent → `None` (with `#[serde(default)]`), `null` →
/// `Some(None)` (clear it), a value → `Some(Some(value))`.
///
/// # Errors
/// The value is neither `null` nor a `T`.
pub fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Whether `number` survives a trip through a `jsonb` column: PostgreSQL keeps the digits it
/// is sent (`serde_json` writes a double in its shortest form, `1.7976931348623157e308`) and
/// gives them back written out in full, without an exponent (309 digits there), which
/// `serde_json` must parse again. Integers always do; doubles nearest to the largest one do
/// not (`serde_json` rounds them to infinity and fails).
fn reads_back(number: &serde_json::Number) -> bool {
    if !number.is_f64() {
        return true;
    }
    let Some(digits) = plain_decimal(&number.to_string()) else {
        return false;
    };
    serde_json::from_str::<Value>(&digits).is_ok()
}

/// A JSON number's text (`-1.5e-7`, `2e20`, `3.25`) with its exponent written out, as
/// PostgreSQL's `numeric` prints it (`-0.00000015`, `200000000000000000000`, `3.25`); `None`
/// for text that is not a JSON number's.
fn plain_decimal(text: &str) -> Option<String> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    // Where the decimal point goes, counted from the first digit.
    let point = i64::try_from(whole.len()).ok()?.checked_add(exponent)?;
    let mut plain = String::with_capacity(digits.len() + 8);
    if negative {
        plain.push('-');
    }
    if point <= 0 {
        plain.push_str("0.");
        plain.extend(std::iter::repeat_n('0', usize::try_from(-point).ok()?));
        plain.push_str(&digits);
    } else {
        let point = usize::try_from(point).ok()?;
        if point >= digits.len() {
            plain.push_str(&digits);
            plain.extend(std::iter::repeat_n('0', point - digits.len()));
        } else {
            plain.push_str(&digits[..point]);
            plain.push('.');
            plain.push_str(&digits[point..]);
        }
    }
    Some(plain)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only the errors are looked at
    struct Inner {
        count: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "lowercase")]
    enum Role {
        User,
        Admin,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, clippy::option_option)]
    struct Body {
        email: String,
        role: Option<Role>,
        inner: Option<Inner>,
        list: Option<Vec<Inner>>,
        #[serde(default, deserialize_with = "nullable")]
        note: Option<Option<String>>,
        priority: Option<i32>,
    }

    fn error_of(value: Value) -> (String, String) {
        let error = from_object::<Body>(value).unwrap_err();
        assert_eq!(error.code, "validation_failed");
        let field = &error.details.unwrap()["fields"][0];
        (
            field["field"].as_str().unwrap().to_owned(),
            field["problem"].as_str().unwrap().to_owned(),
        )
    }

    #[test]
    fn names_the_field_of_each_kind_of_error() {
        assert_eq!(error_of(json!({})), ("email".into(), "is required".into()));
        assert_eq!(
            error_of(json!({"email": 1})),
            ("email".into(), "must be a string".into())
        );
        assert_eq!(
            error_of(json!({"email": "a", "zzz": 1})),
            ("zzz".into(), "is not a known field".into())
        );
        assert_eq!(
            error_of(json!({"email": "a", "role": "boss"})),
            ("role".into(), "must be \"user\" or \"admin\"".into())
        );
        assert_eq!(
            error_of(json!({"email": "a", "inner": {}})),
            ("inner.count".into(), "is required".into())
        );
        assert_eq!(
            error_of(json!({"email": "a", "inner": "x"})),
            ("inner".into(), "must be an object".into())
        );
        assert_eq!(
            error_of(json!({"email": "a", "list": [{"count": 1}, {"count": -1}]})),
            (
                "list.1.count".into(),
                "must be an integer from 0 to 4294967295".into()
            )
        );
        assert_eq!(
            error_of(json!({"email": "a", "list": {}})),
            ("list".into(), "must be a list".into())
        );
        assert_eq!(
            error_of(json!({"email": "a", "priority": 1.5})),
            (
                "priority".into(),
                "must be an integer from -2147483648 to 2147483647".into()
            )
        );
    }

    #[test]
    fn names_strings_and_keys_holding_nul() {
        let mut errors = Vec::new();
        unstorable_values(
            &json!({"name": "a\u{0}b", "ok": "fine", "w": {"1": {"inputs": {"x": ["y", "\u{0}"]}}},
                    "m": {"k\u{0}": 1}}),
            "",
            &mut errors,
        );
        let mut fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["m.k\u{0}", "name", "w.1.inputs.x.1"]);
        let mut errors = Vec::new();
        unstorable_values(
            &json!({"name": "plain", "list": [1, "two", null, 1.5e300, -2.5e-300, u64::MAX]}),
            "",
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn names_numbers_that_would_not_read_back() {
        let mut errors = Vec::new();
        let body: Value = serde_json::from_str(
            r#"{"a": [1.7976931348623157e308], "b": {"c": -1.7976931348623155e308}}"#,
        )
        .unwrap();
        unstorable_values(&body, "", &mut errors);
        let mut fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["a.0", "b.c"]);
    }

    #[test]
    fn writes_exponents_out() {
        for (text, plain) in [
            ("3.25", "3.25"),
            ("-1.5e-7", "-0.00000015"),
            ("2e20", "200000000000000000000"),
            ("1.25e1", "12.5"),
            ("5e-324", &format!("0.{}5", "0".repeat(323))),
            ("0.0", "0.0"),
        ] {
            assert_eq!(plain_decimal(text).as_deref(), Some(plain), "{text}");
        }
        assert_eq!(plain_decimal("abc"), None);
        assert_eq!(plain_decimal("1e99999999999999999999"), None);
    }

    #[test]
    fn nullable_tells_absent_from_null() {
        let absent: Body = from_object(json!({"email": "a"})).unwrap();
        assert_eq!(absent.note, None);
        let null: Body = from_object(json!({"email": "a", "note": null})).unwrap();
        assert_eq!(null.note, Some(None));
        let set: Body = from_object(json!({"email": "a", "note": "x"})).unwrap();
        assert_eq!(set.note, Some(Some("x".into())));
    }

    #[test]
    fn content_type_must_be_json_with_any_parameters() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, value.parse().unwrap());
            is_json_content_type(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!is_json_content_type(&HeaderMap::new()));
    }
}
