//! Template substitution (CONTRACT.md "Templates"): `{{name}}` placeholders in a template's
//! workflow are replaced by the request's `parameters`.
//!
//! - A string that is exactly `{{name}}` (spaces inside the braces allowed) becomes the
//!   parameter's JSON value with its type (`7`, `true`, `{"a": 1}`, `null`).
//! - Inside a longer string, `{{name}}` becomes the value's text: a string as it is, a number or
//!   a boolean in JSON form (`7`, `7.5`, `true`); an object, an array or `null` there is refused.
//! - Strings are substituted wherever they are (node inputs, arrays, nested objects); object
//!   keys never are. A substituted value is not searched again, so a parameter cannot inject
//!   placeholders of its own.
//! - Names match `[A-Za-z_][A-Za-z0-9_]*`; `{{` … `}}` around anything else is left as it is.
//! - A parameter the workflow uses but `parameters` lacks is refused, named
//!   `parameters.<name>`; unused parameters are fine.

use std::collections::BTreeSet;

use emp_shared::workflow::{FieldError, MAX_ERRORS};
use serde_json::{Map, Value};

/// `workflow` with every placeholder replaced by its parameter.
///
/// # Errors
/// One [`FieldError`] per missing parameter and per parameter whose value cannot go inside a
/// longer string, each named `parameters.<name>`, in the order first met, without repeats.
pub fn render(workflow: &Value, parameters: &Map<String, Value>) -> Result<Value, Vec<FieldError>> {
    let mut renderer = Renderer {
        parameters,
        errors: Vec::new(),
        reported: BTreeSet::new(),
    };
    let rendered = renderer.value(workflow);
    if renderer.errors.is_empty() {
        Ok(rendered)
    } else {
        Err(renderer.errors)
    }
}

/// The names of every placeholder `workflow` uses, sorted, without repeats.
pub fn placeholders(workflow: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    collect(workflow, &mut names);
    names
}

fn collect(value: &Value, names: &mut BTreeSet<String>) {
    match value {
        Value::String(text) => {
            for piece in split(text) {
                if let Piece::Placeholder(name) = piece {
                    names.insert(name.to_owned());
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect(item, names)),
        Value::Object(map) => map.values().for_each(|item| collect(item, names)),
        _ => {}
    }
}

struct Renderer<'a> {
    parameters: &'a Map<String, Value>,
    errors: Vec<FieldError>,
    /// Parameters already reported, so each is named once however often it is used.
    reported: BTreeSet<String>,
}

impl Renderer<'_> {
    fn value(&mut self, value: &Value) -> Value {
        match value {
            Value::String(text) => self.string(text),
            Value::Array(items) => {
                Value::Array(items.iter().map(|item| self.value(item)).collect())
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, item)| (key.clone(), self.value(item)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn string(&mut self, text: &str) -> Value {
        let pieces = split(text);
        if let [Piece::Placeholder(name)] = pieces.as_slice() {
            return self.lookup(name).cloned().unwrap_or(Value::Null);
        }
        if !pieces
            .iter()
            .any(|piece| matches!(piece, Piece::Placeholder(_)))
        {
            return Value::String(text.to_owned());
        }
        let mut out = String::with_capacity(text.len());
        for piece in pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Placeholder(name) => match self.lookup(name) {
                    Some(Value::String(value)) => out.push_str(value),
                    Some(value @ (Value::Number(_) | Value::Bool(_))) => {
                        out.push_str(&value.to_string());
                    }
                    Some(value) => {
                        let kind = match value {
                            Value::Object(_) => "an object",
                            Value::Array(_) => "an array",
                            _ => "null",
                        };
                        self.report(
                            name,
                            &format!(
                                "is {kind}, which cannot be put inside a longer string; only strings, numbers and booleans can"
                            ),
                        );
                    }
                    None => {}
                },
            }
        }
        Value::String(out)
    }

    /// The parameter's value; a missing one is reported.
    fn lookup(&mut self, name: &str) -> Option<&Value> {
        let parameters = self.parameters;
        let value = parameters.get(name);
        if value.is_none() {
            self.report(name, "is required by the template");
        }
        value
    }

    fn report(&mut self, name: &str, problem: &str) {
        if self.errors.len() < MAX_ERRORS && self.reported.insert(name.to_owned()) {
            self.errors
                .push(FieldError::new(format!("parameters.{name}"), problem));
        }
    }
}

/// A part of a string: literal text, or a placeholder's name.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits `text` into literal text and placeholders. `{{` that does not open a valid
/// placeholder is text.
fn split(text: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut literal_start = 0;
    let mut search_from = 0;
    while let Some(offset) = text[search_from..].find("{{") {
        let open = search_from + offset;
        let inner_start = open + 2;
        let Some(close) = text[inner_start..].find("}}").map(|i| inner_start + i) else {
            break;
        };
        let name = text[inner_start..close].trim_matches(' ');
        if is_name(name) {
            if literal_start < open {
                pieces.push(Piece::Text(&text[literal_start..open]));
            }
            pieces.push(Piece::Placeholder(name));
            literal_start = close + 2;
            search_from = literal_start;
        } else {
            // `{{{x}}}`: the placeholder may start at the next brace.
            search_from = open + 1;
        }
    }
    if literal_start < text.len() {
        pieces.push(Piece::Text(&text[literal_start..]));
    }
    pieces
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn is_name(text: &str) -> bool {
    let mut chars = text.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn params(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("parameters must be an object, not {other}"),
        }
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn a_whole_string_placeholder_keeps_the_parameters_type() {
        let workflow = json!({"3": {"class_type": "KSampler", "inputs": {
            "seed": "{{seed}}", "cfg": "{{cfg}}", "denoise": "{{ flag }}",
            "extra": "{{obj}}", "list": "{{ list }}", "nothing": "{{nothing}}", "text": "{{text}}"
        }}});
        let rendered = render(
            &workflow,
            &params(json!({
                "seed": 42, "cfg": 7.5, "flag": true, "obj": {"a": [1]}, "list": [1, "x"],
                "nothing": null, "text": "a cat"
            })),
        )
        .unwrap();
        assert_eq!(
            rendered["3"]["inputs"],
            json!({"seed": 42, "cfg": 7.5, "denoise": true, "extra": {"a": [1]},
                   "list": [1, "x"], "nothing": null, "text": "a cat"})
        );
    }

    #[test]
    fn inside_a_longer_string_the_text_is_put_in() {
        let workflow = json!({"text": "a {{animal}} with {{ legs }} legs, {{cute}}; cfg {{cfg}}!"});
        let rendered = render(
            &workflow,
            &params(json!({"animal": "cat", "legs": 4, "cute": false, "cfg": 7.5})),
        )
        .unwrap();
        assert_eq!(rendered["text"], "a cat with 4 legs, false; cfg 7.5!");
        // Spaces around the braces make it a longer string: the value's text.
        let rendered = render(&json!({"t": " {{n}}"}), &params(json!({"n": 7}))).unwrap();
        assert_eq!(rendered["t"], " 7");
    }

    #[test]
    fn arrays_and_nested_values_are_substituted() {
        let workflow = json!({"1": {"inputs": {"sizes": ["{{w}}", "{{h}}", ["deep {{w}}"]],
                                               "nested": {"x": {"y": "{{w}}"}}}}});
        let rendered = render(&workflow, &params(json!({"w": 512, "h": 768}))).unwrap();
        assert_eq!(
            rendered,
            json!({"1": {"inputs": {"sizes": [512, 768, ["deep 512"]], "nested": {"x": {"y": 512}}}}})
        );
    }

    #[test]
    fn object_keys_are_never_substituted() {
        let workflow = json!({"{{node}}": {"inputs": {"{{key}}": "{{key}}"}}});
        let rendered = render(&workflow, &params(json!({"node": "9", "key": "v"}))).unwrap();
        assert_eq!(rendered, json!({"{{node}}": {"inputs": {"{{key}}": "v"}}}));
    }

    #[test]
    fn missing_parameters_are_named_once_each() {
        let workflow =
            json!({"a": "{{prompt}}", "b": "x {{prompt}} {{seed}}", "c": ["{{ steps }}"]});
        let errors = render(&workflow, &params(json!({"unused": 1}))).unwrap_err();
        assert_eq!(
            fields(&errors),
            ["parameters.prompt", "parameters.seed", "parameters.steps"]
        );
        assert!(errors[0].problem.contains("required"));
    }

    #[test]
    fn objects_arrays_and_null_cannot_go_inside_a_string() {
        let workflow = json!({"a": "x {{o}}", "b": "{{l}} y", "c": "{{n}}{{n}}", "d": "{{o}}"});
        let errors = render(
            &workflow,
            &params(json!({"o": {"k": 1}, "l": [1], "n": null})),
        )
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            ["parameters.o", "parameters.l", "parameters.n"]
        );
        assert!(
            errors[0].problem.contains("an object"),
            "{}",
            errors[0].problem
        );
        assert!(errors[1].problem.contains("an array"));
        assert!(errors[2].problem.contains("null"));
    }

    #[test]
    fn only_valid_names_are_placeholders() {
        let workflow = json!({
            "a": "{{1abc}}", "b": "{{ a-b }}", "c": "{{}}", "d": "{{ }}", "e": "{{a b}}",
            "f": "{x}", "g": "{{unclosed", "h": "{{{x}}}", "i": "{{\tx}}", "j": "{{_x9}}"
        });
        let rendered = render(&workflow, &params(json!({"x": "X", "_x9": 9}))).unwrap();
        assert_eq!(
            rendered,
            json!({
                "a": "{{1abc}}", "b": "{{ a-b }}", "c": "{{}}", "d": "{{ }}", "e": "{{a b}}",
                "f": "{x}", "g": "{{unclosed", "h": "{X}", "i": "{{\tx}}", "j": 9
            })
        );
    }

    #[test]
    fn substituted_values_are_not_searched_again() {
        let workflow = json!({"a": "{{x}}", "b": "say {{x}}"});
        let rendered = render(&workflow, &params(json!({"x": "{{y}}", "y": "no"}))).unwrap();
        assert_eq!(rendered, json!({"a": "{{y}}", "b": "say {{y}}"}));
    }

    #[test]
    fn values_without_placeholders_are_untouched() {
        let workflow = json!({"3": {"class_type": "KSampler", "inputs": {
            "seed": 1, "cfg": 7.5, "model": ["4", 0], "ok": true, "none": null, "text": "plain"
        }}});
        assert_eq!(render(&workflow, &Map::new()).unwrap(), workflow);
    }

    #[test]
    fn lists_the_placeholders_used() {
        let workflow = json!({"a": "{{b}} {{ a }}", "k": ["{{c}}", {"{{key}}": "{{a}}"}]});
        let names: Vec<String> = placeholders(&workflow).into_iter().collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
