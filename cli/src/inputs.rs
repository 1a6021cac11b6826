//! What the user hands in on the command line, turned into API values: `--require KEY=VALUE`
//! into [`Requirements`], `--param NAME=VALUE` into the parameters object, and workflow files
//! (or stdin) into JSON.

use std::io::Read as _;
use std::path::Path;

use emp_shared::requirements::Requirements;
use serde_json::{Map, Value};

use crate::error::CliError;

/// The requirement keys `--require` accepts, as `(alias, field)`.
const REQUIREMENT_KEYS: [(&str, &str); 6] = [
    ("gpu", "gpu_model"),
    ("vram", "min_vram_gb"),
    ("model", "models"),
    ("node", "node_types"),
    ("provider", "provider"),
    ("region", "region"),
];

fn valid_keys() -> String {
    REQUIREMENT_KEYS
        .iter()
        .map(|(alias, field)| {
            if alias == field {
                (*alias).to_owned()
            } else {
                format!("{alias} ({field})")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Splits `KEY=VALUE`.
fn split_pair<'a>(flag: &str, pair: &'a str) -> Result<(&'a str, &'a str), CliError> {
    match pair.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim(), value)),
        _ => Err(CliError::Usage(format!(
            "{flag} {pair:?}: expected KEY=VALUE"
        ))),
    }
}

/// Builds the job's requirements from `--require` pairs. A key given twice (other than the
/// list keys `model` and `node`) or an unknown key is a usage error naming the valid keys.
pub fn requirements(pairs: &[String]) -> Result<Requirements, CliError> {
    let mut requirements = Requirements::default();
    for pair in pairs {
        let (key, value) = split_pair("--require", pair)?;
        let field = REQUIREMENT_KEYS
            .iter()
            .find(|(alias, field)| key == *alias || key == *field)
            .map(|(_, field)| *field)
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--require {key}=…: unknown requirement; valid keys are {}",
                    valid_keys()
                ))
            })?;
        let value = value.trim();
        if value.is_empty() {
            return Err(CliError::Usage(format!(
                "--require {key}: the value is empty"
            )));
        }
        let twice = || CliError::Usage(format!("--require {key} is given twice"));
        match field {
            "gpu_model" => set_once(&mut requirements.gpu_model, value.to_owned(), twice)?,
            "min_vram_gb" => {
                let gb = value.parse::<u32>().map_err(|_| {
                    CliError::Usage(format!(
                        "--require {key}={value}: expected a whole number of GiB, e.g. vram=16"
                    ))
                })?;
                set_once(&mut requirements.min_vram_gb, gb, twice)?;
            }
            "models" => {
                requirements.models.insert(value.to_owned());
            }
            "node_types" => {
                requirements.node_types.insert(value.to_owned());
            }
            "provider" => set_once(&mut requirements.provider, value.to_owned(), twice)?,
            _ => set_once(&mut requirements.region, value.to_owned(), twice)?,
        }
    }
    Ok(requirements)
}

fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    twice: impl Fn() -> CliError,
) -> Result<(), CliError> {
    if slot.is_some() {
        return Err(twice());
    }
    *slot = Some(value);
    Ok(())
}

/// Builds the parameters object from `--param` pairs: a value that parses as JSON is that
/// JSON (`7`, `7.5`, `true`, `null`, `[1,2]`, `"quoted"`), anything else is text.
pub fn parameters(pairs: &[String]) -> Result<Map<String, Value>, CliError> {
    let mut parameters = Map::new();
    for pair in pairs {
        let (name, value) = split_pair("--param", pair)?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        if parameters.insert(name.to_owned(), value).is_some() {
            return Err(CliError::Usage(format!("--param {name} is given twice")));
        }
    }
    Ok(parameters)
}

/// Reads a JSON object from `path` (`-` is stdin).
pub fn read_json_object(path: &Path) -> Result<Value, CliError> {
    let (name, text) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|error| CliError::InvalidInput(format!("cannot read stdin: {error}")))?;
        ("stdin".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(path).map_err(|error| {
            CliError::InvalidInput(format!("cannot read {}: {error}", path.display()))
        })?;
        (path.display().to_string(), text)
    };
    let value: Value = serde_json::from_str(&text)
        .map_err(|error| CliError::InvalidInput(format!("{name} is not valid JSON: {error}")))?;
    if !value.is_object() {
        return Err(CliError::InvalidInput(format!(
            "{name} must hold a JSON object (a ComfyUI API-format workflow: node id → {{\"class_type\", \"inputs\"}})"
        )));
    }
    Ok(value)
}

/// Parses `--metadata`: a JSON object.
pub fn metadata(text: &str) -> Result<Value, CliError> {
    match serde_json::from_str::<Value>(text) {
        Ok(value) if value.is_object() => Ok(value),
        _ => Err(CliError::Usage(format!(
            "--metadata {text:?}: expected a JSON object, e.g. '{{\"run\": 1}}'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    #[test]
    fn short_and_long_requirement_keys_fill_the_requirements() {
        let got = requirements(&strings(&[
            "gpu=4090",
            "vram=16",
            "model=a.safetensors",
            "models=b.safetensors",
            "node=IPAdapterApply",
            "provider=salad",
            "region=us-east",
        ]))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&got).unwrap(),
            json!({
                "gpu_model": "4090", "min_vram_gb": 16,
                "models": ["a.safetensors", "b.safetensors"], "node_types": ["IPAdapterApply"],
                "provider": "salad", "region": "us-east"
            })
        );
    }

    #[test]
    fn bad_requirements_are_usage_errors_that_name_the_valid_keys() {
        let error = requirements(&strings(&["colour=red"])).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, CliError::Usage(_)));
        assert!(
            text.contains("gpu (gpu_model)") && text.contains("region"),
            "{text}"
        );
        assert!(matches!(
            requirements(&strings(&["vram=lots"])),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            requirements(&strings(&["gpu=a", "gpu_model=b"])),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            requirements(&strings(&["gpu"])),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn parameters_are_json_when_they_parse_and_text_otherwise() {
        let got = parameters(&strings(&[
            "seed=7",
            "cfg=7.5",
            "flag=true",
            "prompt=a cat",
            "quoted=\"42\"",
            "eq=a=b",
        ]))
        .unwrap();
        assert_eq!(
            Value::Object(got),
            json!({"seed": 7, "cfg": 7.5, "flag": true, "prompt": "a cat", "quoted": "42", "eq": "a=b"})
        );
        assert!(matches!(
            parameters(&strings(&["a=1", "a=2"])),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn workflow_files_must_be_json_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        std::fs::write(&path, "[1]").unwrap();
        assert!(matches!(
            read_json_object(&path),
            Err(CliError::InvalidInput(_))
        ));
        std::fs::write(&path, "{nope").unwrap();
        assert!(matches!(
            read_json_object(&path),
            Err(CliError::InvalidInput(_))
        ));
        assert!(matches!(
            read_json_object(&dir.path().join("missing.json")),
            Err(CliError::InvalidInput(_))
        ));
        std::fs::write(&path, r#"{"1": {"class_type": "X", "inputs": {}}}"#).unwrap();
        assert!(read_json_object(&path).unwrap().is_object());
    }
}
