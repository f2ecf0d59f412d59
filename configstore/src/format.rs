//! Parsing config text (YAML, JSON, TOML) into one value tree.
//!
//! Every format becomes a [`serde_json::Value`] object so that overrides can be
//! merged and modules deserialize from one representation, with errors that
//! carry the source name and, where the parser knows it, line and column.

use serde_json::Value;

use crate::StoreError;

/// The text formats a document may be written in, chosen by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.yaml` or `.yml`
    Yaml,
    /// `.json`
    Json,
    /// `.toml`
    Toml,
}

impl Format {
    /// The format for a file extension, if it is a config file at all.
    pub fn from_extension(ext: &str) -> Option<Format> {
        match ext {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            "toml" => Some(Format::Toml),
            _ => None,
        }
    }
}

/// Parses `text` as `format`; the result is always an object. An empty YAML
/// document is an empty object.
pub fn parse(text: &str, format: Format, source: &str) -> Result<Value, StoreError> {
    let err = |message: String| StoreError::Parse {
        source_name: source.to_string(),
        message,
    };
    let value = match format {
        Format::Yaml => {
            if text.trim().is_empty() {
                return Ok(Value::Object(Default::default()));
            }
            serde_norway::from_str::<Value>(text).map_err(|e| err(format!("invalid YAML: {e}")))?
        }
        Format::Json => {
            serde_json::from_str::<Value>(text).map_err(|e| err(format!("invalid JSON: {e}")))?
        }
        Format::Toml => {
            let v: toml::Value =
                toml::from_str(text).map_err(|e| err(format!("invalid TOML: {e}")))?;
            serde_json::to_value(v).map_err(|e| err(format!("invalid TOML: {e}")))?
        }
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Null => Ok(Value::Object(Default::default())),
        other => Err(err(format!(
            "expected a map of keys at the top level, found {}",
            kind_of(&other)
        ))),
    }
}

/// A short name for a value's type, for error messages.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_json_toml_agree() {
        let y = parse(
            "kind: pipe\nlisten: 127.0.0.1:80\nn: 3\n",
            Format::Yaml,
            "a",
        )
        .unwrap();
        let j = parse(
            r#"{"kind":"pipe","listen":"127.0.0.1:80","n":3}"#,
            Format::Json,
            "b",
        )
        .unwrap();
        let t = parse(
            "kind = \"pipe\"\nlisten = \"127.0.0.1:80\"\nn = 3\n",
            Format::Toml,
            "c",
        )
        .unwrap();
        assert_eq!(y, j);
        assert_eq!(j, t);
    }

    #[test]
    fn empty_yaml_is_empty_map() {
        assert_eq!(
            parse("", Format::Yaml, "a").unwrap(),
            Value::Object(Default::default())
        );
        assert_eq!(
            parse("# only a comment\n", Format::Yaml, "a").unwrap(),
            Value::Object(Default::default())
        );
    }

    #[test]
    fn errors_name_source_and_position() {
        let e = parse(
            "kind: pipe\n  listen: [\n",
            Format::Yaml,
            "tenants/t/web.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("tenants/t/web.yaml: invalid YAML"), "{e}");
        assert!(e.contains("line"), "{e}");
        let e = parse("- a\n- b\n", Format::Yaml, "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a map"), "{e}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text in any format gives a value or an error naming the source; never a panic.
        #[test]
        fn parse_never_panics(text in any::<String>()) {
            for f in [Format::Yaml, Format::Json, Format::Toml] {
                match parse(&text, f, "f.yaml") {
                    Ok(v) => prop_assert!(v.is_object()),
                    Err(e) => prop_assert!(e.to_string().starts_with("f.yaml: ")),
                }
            }
        }

        /// YAML-looking input (keys, colons, brackets, indentation) too.
        #[test]
        fn yaml_like_never_panics(text in "([a-z_]{1,8}: ?[\\[\\]{}a-z0-9:,'\" -]{0,12}\n {0,4}){0,8}") {
            let _ = parse(&text, Format::Yaml, "f.yaml");
        }
    }
}
