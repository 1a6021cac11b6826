//! Submit-time validation, step for step as ComfyUI's `validate_prompt` does it.
//!
//! The order of checks decides which error a client sees, so it is kept: every node must name
//! a known `class_type` (`invalid_prompt`), there must be an output node (`prompt_no_outputs`),
//! then each output is validated recursively through its inputs. Errors are attached to the node
//! that has them; a node that is only invalid because something upstream is gets no entry. One
//! valid output is enough for the prompt to be accepted, with the invalid outputs dropped and
//! still reported in `node_errors`. Literal values are converted in place (`"5"` → `5` for an
//! `INT`), and the converted graph is what runs and what `/queue` and `/history` show.

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use crate::graph::Graph;
use crate::nodes::Builtin;
use crate::nodes::catalog::Catalog;
use crate::paths::Dirs;
use crate::py;

/// A prompt that may run: the output nodes to execute, and errors of dropped outputs.
#[derive(Debug)]
pub struct Accepted {
    pub outputs: Vec<String>,
    pub node_errors: Map<String, Value>,
}

/// Why a prompt was refused.
#[derive(Debug)]
pub enum Refusal {
    /// A 400 with `{"error": ..., "node_errors": ...}`.
    Invalid {
        error: Value,
        node_errors: Map<String, Value>,
    },
    /// A graph so malformed that ComfyUI's handler raises: a 500.
    Crash(String),
}

/// A Python exception raised while validating.
#[derive(Debug)]
struct PyExc {
    kind: &'static str,
    message: String,
}

impl PyExc {
    fn key_error(key: &Value) -> PyExc {
        PyExc {
            kind: "KeyError",
            message: py::repr(key),
        }
    }
}

/// `(valid, reasons)` for one node, as ComfyUI records it in `validated`.
type Verdict = (bool, Vec<Value>);

fn traceback(function: &str) -> Value {
    json!([format!(
        "  File \"/emp-comfyui-sim/execution.py\", line 1, in {function}\n"
    )])
}

fn error(kind: &str, message: &str, details: &str) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": {}})
}

/// Validates `graph` (converting literal inputs in place).
///
/// # Errors
/// `Refusal::Invalid` for the 400 answers, `Refusal::Crash` where ComfyUI would answer 500.
pub fn validate_prompt(
    graph: &mut Graph,
    partial_targets: Option<&[String]>,
    catalog: &Catalog,
    dirs: &Dirs,
) -> Result<Accepted, Refusal> {
    let mut outputs = Vec::new();
    for (id, node) in graph.iter() {
        let class_value = match node {
            Value::Object(map) => map.get("class_type"),
            Value::String(_) | Value::Array(_) => None,
            other => {
                return Err(Refusal::Crash(format!(
                    "argument of type '{}' is not iterable",
                    py::type_name(other)
                )));
            }
        };
        let Some(class_value) = class_value else {
            return Err(Refusal::Invalid {
                error: error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: Map::new(),
            });
        };
        let class_type = class_value.as_str().filter(|name| catalog.contains(name));
        let Some(class_type) = class_type else {
            return Err(Refusal::Invalid {
                error: error(
                    "invalid_prompt",
                    &format!(
                        "Cannot execute because node {} does not exist.",
                        py::str(class_value)
                    ),
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: Map::new(),
            });
        };
        let targeted = partial_targets.is_none_or(|targets| targets.iter().any(|t| t == id));
        if catalog.is_output_node(class_type) && targeted {
            outputs.push(id.to_string());
        }
    }
    if outputs.is_empty() {
        return Err(Refusal::Invalid {
            error: error("prompt_no_outputs", "Prompt has no outputs", ""),
            node_errors: Map::new(),
        });
    }

    let mut validator = Validator {
        graph,
        catalog,
        dirs,
        validated: Vec::new(),
        in_progress: HashSet::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors = Map::new();
    for output in &outputs {
        let (valid, reasons) = match validator.node(output) {
            Ok(verdict) => verdict,
            Err(exc) => {
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": exc.message,
                    "extra_info": {"exception_type": exc.kind, "traceback": traceback("validate_prompt")},
                })];
                validator.record(output, (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good.push(output.clone());
            continue;
        }
        failed.push((output.clone(), reasons));
        // ComfyUI credits this output to every node with errors validated so far, including
        // ones reached only from earlier outputs; clients see that, so it is kept.
        for (node_id, (node_valid, node_reasons)) in &validator.validated {
            if *node_valid || node_reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                json!({
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": validator.graph.class_type(node_id).unwrap_or_default(),
                })
            });
            if let Some(list) = entry
                .get_mut("dependent_outputs")
                .and_then(Value::as_array_mut)
            {
                list.push(json!(output));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|reason| {
                format!(
                    "{}: {}",
                    py::str(&reason["message"]),
                    py::str(&reason["details"])
                )
            })
            .collect();
        return Err(Refusal::Invalid {
            error: error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &details.join("\n"),
            ),
            node_errors,
        });
    }
    Ok(Accepted {
        outputs: good,
        node_errors,
    })
}

struct Validator<'a> {
    graph: &'a mut Graph,
    catalog: &'a Catalog,
    dirs: &'a Dirs,
    /// Verdicts in the order ComfyUI's `validated` dict holds them.
    validated: Vec<(String, Verdict)>,
    /// Nodes on the current recursion path: a link back to one is a cycle, which ComfyUI
    /// meets as a `RecursionError`.
    in_progress: HashSet<String>,
}

/// One input's spec: `(type or choices, "required"/"optional", options)`.
struct InputSpec {
    kind: Value,
    required: bool,
    options: Map<String, Value>,
}

impl InputSpec {
    /// `input_config` as ComfyUI reports it: `[type, options]`.
    fn config(&self) -> Value {
        json!([self.kind, self.options])
    }
}

impl Validator<'_> {
    fn record(&mut self, id: &str, verdict: Verdict) {
        match self.validated.iter_mut().find(|(key, _)| key == id) {
            Some(slot) => slot.1 = verdict,
            None => self.validated.push((id.to_string(), verdict)),
        }
    }

    fn specs(&self, class_type: &str) -> Vec<(String, InputSpec)> {
        let Some(info) = self.catalog.info(class_type) else {
            return Vec::new();
        };
        let mut specs = Vec::new();
        for (category, required) in [("required", true), ("optional", false)] {
            let Some(section) = info["input"].get(category).and_then(Value::as_object) else {
                continue;
            };
            let order: Vec<String> = info["input_order"]
                .get(category)
                .and_then(Value::as_array)
                .map_or_else(
                    || section.keys().cloned().collect(),
                    |names| {
                        names
                            .iter()
                            .filter_map(Value::as_str)
                            .map(String::from)
                            .collect()
                    },
                );
            for name in order
                .iter()
                .chain(section.keys().filter(|k| !order.contains(k)))
            {
                let Some(spec) = section.get(name) else {
                    continue;
                };
                if specs.iter().any(|(existing, _)| existing == name) {
                    continue;
                }
                let parts = spec.as_array().cloned().unwrap_or_default();
                specs.push((
                    name.clone(),
                    InputSpec {
                        kind: parts.first().cloned().unwrap_or(Value::Null),
                        required,
                        options: parts
                            .get(1)
                            .and_then(Value::as_object)
                            .cloned()
                            .unwrap_or_default(),
                    },
                ));
            }
        }
        specs
    }

    /// ComfyUI's `validate_inputs` for one node.
    fn node(&mut self, id: &str) -> Result<Verdict, PyExc> {
        if let Some((_, verdict)) = self.validated.iter().find(|(key, _)| key == id) {
            return Ok(verdict.clone());
        }
        if self.in_progress.contains(id) {
            return Err(PyExc {
                kind: "RecursionError",
                message: "maximum recursion depth exceeded".into(),
            });
        }
        let node = self
            .graph
            .get(id)
            .ok_or_else(|| PyExc::key_error(&json!(id)))?;
        let class_type = node
            .get("class_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let inputs = match node.get("inputs") {
            Some(Value::Object(map)) => map.clone(),
            Some(other) => {
                return Err(PyExc {
                    kind: "TypeError",
                    message: format!("'{}' object is not a mapping", py::type_name(other)),
                });
            }
            None => return Err(PyExc::key_error(&json!("inputs"))),
        };
        let builtin = Builtin::from_name(&class_type);
        let custom: &[&str] = builtin.map_or(&[], Builtin::custom_validated_inputs);

        let mut errors = Vec::new();
        let mut valid = true;
        let mut converted = inputs.clone();
        for (name, spec) in self.specs(&class_type) {
            let Some(value) = inputs.get(&name) else {
                if spec.required {
                    errors.push(json!({
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": name,
                        "extra_info": {"input_name": name},
                    }));
                }
                continue;
            };
            if let Value::Array(link) = value {
                match self.linked_input(id, &name, &spec, link, value)? {
                    LinkOutcome::Fine => {}
                    LinkOutcome::UpstreamInvalid => valid = false,
                    LinkOutcome::Error(reason) => errors.push(reason),
                }
                continue;
            }
            match check_literal(&name, &spec, value, custom.contains(&name.as_str()))? {
                Ok(converted_value) => {
                    converted.insert(name, converted_value);
                }
                Err(reason) => errors.push(reason),
            }
        }
        if let Some(builtin) = builtin.filter(|_| !custom.is_empty()) {
            if let Err(text) = builtin.custom_validate(&converted, self.dirs) {
                for name in custom.iter().filter(|name| converted.contains_key(**name)) {
                    errors.push(json!({
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": format!("{name} - {text}"),
                        "extra_info": {"input_name": name},
                    }));
                }
            }
        }
        if let Some(Value::Object(node)) = self.graph.get_mut(id) {
            node.insert("inputs".into(), Value::Object(converted));
        }
        let verdict = if errors.is_empty() && valid {
            (true, Vec::new())
        } else {
            (false, errors)
        };
        self.record(id, verdict.clone());
        Ok(verdict)
    }

    fn linked_input(
        &mut self,
        id: &str,
        name: &str,
        spec: &InputSpec,
        link: &[Value],
        value: &Value,
    ) -> Result<LinkOutcome, PyExc> {
        if link.len() != 2 {
            return Ok(LinkOutcome::Error(json!({
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": name,
                "extra_info": {"input_name": name, "input_config": spec.config(), "received_value": value},
            })));
        }
        let source = link[0]
            .as_str()
            .filter(|s| self.graph.contains(s))
            .ok_or_else(|| PyExc::key_error(&link[0]))?;
        let source = source.to_string();
        let source_class = self
            .graph
            .class_type(&source)
            .unwrap_or_default()
            .to_string();
        let outputs = self.catalog.outputs(&source_class);
        let index = match &link[1] {
            Value::Number(_) | Value::Bool(_) => match py::Num::of(&link[1]) {
                Some(py::Num::Int(i)) => i,
                _ => {
                    return Err(PyExc {
                        kind: "TypeError",
                        message: "tuple indices must be integers or slices, not float".into(),
                    });
                }
            },
            other => {
                return Err(PyExc {
                    kind: "TypeError",
                    message: format!(
                        "tuple indices must be integers or slices, not {}",
                        py::type_name(other)
                    ),
                });
            }
        };
        let position = if index < 0 {
            outputs.len() as i128 + index
        } else {
            index
        };
        let received = usize::try_from(position)
            .ok()
            .and_then(|i| outputs.get(i))
            .cloned()
            .ok_or_else(|| PyExc {
                kind: "IndexError",
                message: "tuple index out of range".into(),
            })?;
        if !types_match(&received, &spec.kind) {
            return Ok(LinkOutcome::Error(json!({
                "type": "return_type_mismatch",
                "message": "Return type mismatch between linked nodes",
                "details": format!("{name}, received_type({}) mismatch input_type({})", py::str(&received), py::str(&spec.kind)),
                "extra_info": {
                    "input_name": name,
                    "input_config": spec.config(),
                    "received_type": received,
                    "linked_node": value,
                },
            })));
        }
        self.in_progress.insert(id.to_string());
        let upstream = self.node(&source);
        self.in_progress.remove(id);
        match upstream {
            Ok((true, _)) => Ok(LinkOutcome::Fine),
            Ok((false, _)) => Ok(LinkOutcome::UpstreamInvalid),
            Err(exc) => {
                let reasons = vec![json!({
                    "type": "exception_during_inner_validation",
                    "message": "Exception when validating inner node",
                    "details": exc.message,
                    "extra_info": {
                        "input_name": name,
                        "input_config": spec.config(),
                        "exception_message": exc.message,
                        "exception_type": exc.kind,
                        "traceback": traceback("validate_inputs"),
                        "linked_node": value,
                    },
                })];
                self.record(&source, (false, reasons));
                Ok(LinkOutcome::UpstreamInvalid)
            }
        }
    }
}

enum LinkOutcome {
    Fine,
    UpstreamInvalid,
    Error(Value),
}

/// ComfyUI's `validate_node_input`: equal types, `*` on either side, or overlapping
/// comma-separated unions.
fn types_match(received: &Value, wanted: &Value) -> bool {
    if received == wanted {
        return true;
    }
    let (Some(received), Some(wanted)) = (received.as_str(), wanted.as_str()) else {
        return false;
    };
    let split = |text: &str| {
        text.split(',')
            .map(str::trim)
            .map(String::from)
            .collect::<HashSet<_>>()
    };
    let (received, wanted) = (split(received), split(wanted));
    received.contains("*") || wanted.contains("*") || !received.is_disjoint(&wanted)
}

/// Converts a literal to its declared type and checks min, max and combo choices.
/// The outer `Err` is an exception; the inner one a validation error for the node.
fn check_literal(
    name: &str,
    spec: &InputSpec,
    value: &Value,
    custom: bool,
) -> Result<Result<Value, Value>, PyExc> {
    let kind = spec.kind.as_str();
    let conversion = match kind {
        Some("INT") => Some(py::to_int(value)),
        Some("FLOAT") => Some(py::to_float(value)),
        Some("STRING") => Some(Ok(Value::String(py::str(value)))),
        Some("BOOLEAN") => Some(Ok(Value::Bool(py::truthy(value)))),
        _ => None,
    };
    let value = match conversion {
        None => value.clone(),
        Some(Ok(converted)) => converted,
        Some(Err(message)) => {
            return Ok(Err(json!({
                "type": "invalid_input_type",
                "message": format!("Failed to convert an input value to a {} value", kind.unwrap_or_default()),
                "details": format!("{name}, {}, {message}", py::str(value)),
                "extra_info": {
                    "input_name": name,
                    "input_config": spec.config(),
                    "received_value": value,
                    "exception_message": message,
                },
            })));
        }
    };
    if custom {
        return Ok(Ok(value));
    }
    for (bound, smaller) in [("min", true), ("max", false)] {
        let Some(limit) = spec.options.get(bound) else {
            continue;
        };
        let (Some(v), Some(l)) = (py::Num::of(&value), py::Num::of(limit)) else {
            return Err(PyExc {
                kind: "TypeError",
                message: format!(
                    "'{}' not supported between instances of '{}' and '{}'",
                    if smaller { "<" } else { ">" },
                    py::type_name(&value),
                    py::type_name(limit)
                ),
            });
        };
        let out_of_range = if smaller { v.lt(l) } else { l.lt(v) };
        if out_of_range {
            let (kind, word) = if smaller {
                ("value_smaller_than_min", "smaller than min")
            } else {
                ("value_bigger_than_max", "bigger than max")
            };
            return Ok(Err(json!({
                "type": kind,
                "message": format!("Value {} {word} of {}", py::str(&value), py::str(limit)),
                "details": name,
                "extra_info": {"input_name": name, "input_config": spec.config(), "received_value": value},
            })));
        }
    }
    let choices = match &spec.kind {
        Value::Array(choices) => Some(choices.clone()),
        Value::String(kind) if kind == "COMBO" => Some(
            spec.options
                .get("options")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        ),
        _ => None,
    };
    if let Some(choices) = choices {
        if !choices.iter().any(|choice| py::equals(choice, &value)) {
            let (list_info, config) = if choices.len() > 20 {
                (format!("(list of length {})", choices.len()), Value::Null)
            } else {
                (py::repr(&Value::Array(choices)), spec.config())
            };
            return Ok(Err(json!({
                "type": "value_not_in_list",
                "message": "Value not in list",
                "details": format!("{name}: '{}' not in {list_info}", py::str(&value)),
                "extra_info": {"input_name": name, "input_config": config, "received_value": value},
            })));
        }
    }
    Ok(Ok(value))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::nodes::catalog::Sources;

    fn catalog() -> Catalog {
        let models = BTreeMap::from([(
            "checkpoints".to_string(),
            vec!["real.safetensors".to_string()],
        )]);
        let extra = BTreeMap::new();
        Catalog::build(&Sources {
            models: &models,
            input_files: vec![],
            extra: &extra,
        })
    }

    fn dirs() -> Dirs {
        Dirs {
            input: PathBuf::from("/nonexistent/input"),
            output: PathBuf::from("/nonexistent/output"),
            temp: PathBuf::from("/nonexistent/temp"),
        }
    }

    fn graph(value: Value) -> Graph {
        serde_json::from_value(value).unwrap()
    }

    fn basic() -> Value {
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": "64", "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        })
    }

    #[test]
    fn valid_graph_is_accepted_and_converted() {
        let mut g = graph(basic());
        let accepted = validate_prompt(&mut g, None, &catalog(), &dirs()).unwrap();
        assert_eq!(accepted.outputs, ["3"]);
        assert!(accepted.node_errors.is_empty());
        assert_eq!(g.get("1").unwrap()["inputs"]["width"], json!(64));
    }

    #[test]
    fn unknown_class_names_the_class() {
        let mut g = graph(json!({"1": {"class_type": "Nope", "inputs": {}}}));
        let Err(Refusal::Invalid { error, .. }) =
            validate_prompt(&mut g, None, &catalog(), &dirs())
        else {
            panic!("accepted")
        };
        assert_eq!(error["type"], "invalid_prompt");
        assert_eq!(
            error["message"],
            "Cannot execute because node Nope does not exist."
        );
    }

    #[test]
    fn missing_model_is_value_not_in_list_with_dependents() {
        let mut value = basic();
        value["4"] = json!({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}});
        value["5"] =
            json!({"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["4", 2]}});
        value["6"] = json!({"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}});
        value["7"] = json!({"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "y"}});
        let mut g = graph(value);
        let accepted = validate_prompt(&mut g, None, &catalog(), &dirs()).unwrap();
        assert_eq!(accepted.outputs, ["3"]);
        let error = &accepted.node_errors["4"];
        assert_eq!(error["class_type"], "CheckpointLoaderSimple");
        assert_eq!(error["dependent_outputs"], json!(["7"]));
        assert_eq!(error["errors"][0]["type"], "value_not_in_list");
        assert_eq!(
            error["errors"][0]["details"],
            "ckpt_name: 'missing.safetensors' not in ['real.safetensors']"
        );
        assert!(
            !accepted.node_errors.contains_key("5"),
            "only invalid upstream: no entry"
        );
    }

    #[test]
    fn all_outputs_invalid_is_refused() {
        let mut value = basic();
        value["1"]["inputs"]["width"] = json!(0);
        let mut g = graph(value);
        let Err(Refusal::Invalid { error, node_errors }) =
            validate_prompt(&mut g, None, &catalog(), &dirs())
        else {
            panic!("accepted")
        };
        assert_eq!(error["type"], "prompt_outputs_failed_validation");
        assert_eq!(
            node_errors["1"]["errors"][0]["type"],
            "value_smaller_than_min"
        );
        assert_eq!(
            node_errors["1"]["errors"][0]["message"],
            "Value 0 smaller than min of 1"
        );
    }

    #[test]
    fn broken_links_and_cycles_do_not_loop() {
        let mut g = graph(json!({
            "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "x"}},
        }));
        let Err(Refusal::Invalid { error, node_errors }) =
            validate_prompt(&mut g, None, &catalog(), &dirs())
        else {
            panic!("accepted")
        };
        assert_eq!(error["type"], "prompt_outputs_failed_validation");
        assert_eq!(
            node_errors["4"]["errors"][0]["type"],
            "exception_during_validation"
        );
    }

    #[test]
    fn no_output_node() {
        let mut value = basic();
        value.as_object_mut().unwrap().remove("3");
        let mut g = graph(value);
        let Err(Refusal::Invalid { error, .. }) =
            validate_prompt(&mut g, None, &catalog(), &dirs())
        else {
            panic!("accepted")
        };
        assert_eq!(error["type"], "prompt_no_outputs");
    }
}
