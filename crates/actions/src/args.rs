//! Reading an action's `args` map: every problem becomes a [`FieldError`] at
//! `{job_path}.args.<field>`, and all of them are collected, not just the first.

use std::collections::BTreeMap;

use domain::FieldError;
use serde_json::{Map, Value};

use crate::secret::Text;

/// Names a JSON value's type the way a spec author writes it.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// A hint for YAML scalars that were meant as strings (`argv: [sleep, 5]`).
pub(crate) fn quote_hint(v: &Value) -> String {
    match v {
        Value::Number(_) | Value::Bool(_) => format!(" (quote it: \"{v}\")"),
        _ => String::new(),
    }
}

pub(crate) struct Args<'a> {
    map: &'a Map<String, Value>,
    job_path: &'a str,
    errs: Vec<FieldError>,
}

impl<'a> Args<'a> {
    /// Starts reading `map`; any key not in `known` is an error.
    pub(crate) fn new(map: &'a Map<String, Value>, job_path: &'a str, known: &[&str]) -> Args<'a> {
        let mut args = Args {
            map,
            job_path,
            errs: Vec::new(),
        };
        for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
            let message = if known.is_empty() {
                format!("unknown argument {key:?}; this action takes no arguments")
            } else {
                format!(
                    "unknown argument {key:?}; expected one of: {}",
                    known.join(", ")
                )
            };
            args.errs.push(FieldError::new(args.path(key), message));
        }
        args
    }

    pub(crate) fn path(&self, field: &str) -> String {
        format!("{}.args.{field}", self.job_path)
    }

    pub(crate) fn error(&mut self, field: &str, message: impl Into<String>) {
        let path = self.path(field);
        self.errs.push(FieldError::new(path, message));
    }

    /// The value of `field`; `null` (YAML `field:` with nothing after it) counts as absent.
    pub(crate) fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn required(&mut self, field: &str) -> Option<&'a Value> {
        let v = self.get(field);
        if v.is_none() {
            self.error(field, "required");
        }
        v
    }

    /// A string field; `None` (with an error recorded) if it has another type.
    pub(crate) fn string(&mut self, field: &str, required: bool) -> Option<&'a str> {
        let v = if required {
            self.required(field)?
        } else {
            self.get(field)?
        };
        match v {
            Value::String(s) => Some(s),
            other => {
                self.error(
                    field,
                    format!("must be a string, not {}{}", kind(other), quote_hint(other)),
                );
                None
            }
        }
    }

    /// A field that takes a string or a secret reference `{secret: NAME}`.
    pub(crate) fn text(&mut self, field: &str, required: bool) -> Option<Text> {
        let v = if required {
            self.required(field)?
        } else {
            self.get(field)?
        };
        self.text_value(field, "", v)
    }

    fn text_value(&mut self, field: &str, entry: &str, v: &Value) -> Option<Text> {
        match v {
            Value::String(s) => Some(Text::Plain(s.clone())),
            Value::Object(_) => match Text::reference(v) {
                Ok(Some(name)) => Some(Text::Secret(name)),
                Ok(None) => None,
                Err(m) => {
                    self.error(field, format!("{entry}{m}"));
                    None
                }
            },
            other => {
                // The value itself is not quoted back: it may be a secret.
                let hint = if matches!(other, Value::Number(_) | Value::Bool(_)) {
                    " (quote it)"
                } else {
                    ""
                };
                self.error(
                    field,
                    format!(
                        "{entry}must be a string or {{secret: NAME}}, not {}{hint}",
                        kind(other)
                    ),
                );
                None
            }
        }
    }

    /// An optional map of strings to strings or secret references. Every bad entry is
    /// reported.
    pub(crate) fn text_map(&mut self, field: &str) -> BTreeMap<String, Text> {
        let mut out = BTreeMap::new();
        let Some(v) = self.get(field) else { return out };
        let Value::Object(m) = v else {
            self.error(
                field,
                format!(
                    "must be a map of names to strings or {{secret: NAME}}, not {}",
                    kind(v)
                ),
            );
            return out;
        };
        for (k, v) in m {
            if let Some(t) = self.text_value(field, &format!("value of {k:?} "), v) {
                out.insert(k.clone(), t);
            }
        }
        out
    }

    /// Ends reading: `value` if no problem was found, else every problem.
    pub(crate) fn finish<T>(self, value: Option<T>) -> Result<T, Vec<FieldError>> {
        match value {
            Some(v) if self.errs.is_empty() => Ok(v),
            None if self.errs.is_empty() => Err(vec![FieldError::new(
                format!("{}.args", self.job_path),
                "invalid arguments",
            )]),
            _ => Err(self.errs),
        }
    }
}

/// `Some(message)` when `s` contains a NUL byte, which no path, argument or variable may hold.
pub(crate) fn nul_check(what: &str, s: &str) -> Option<String> {
    s.contains('\0')
        .then(|| format!("{what} must not contain NUL bytes"))
}
