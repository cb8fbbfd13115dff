//! Readable config diffs for `POST /config/diff`: the changed fields by config path
//! (`routes[0].pool`), with the value before and after, computed over the JSON form of two
//! configs. Lists compare element by element, so an insertion shows as changes to every
//! later element; that matches how operators read indexes in validation errors.

use serde::Serialize;
use serde_json::Value;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FieldChange {
    pub path: String,
    /// `added`, `removed` or `changed`.
    pub op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

impl FieldChange {
    /// One line: `~ routes[0].pool: "a" -> "b"`, `+ pools[2]: {…}`, `- routes[1]: {…}`.
    pub fn line(&self) -> String {
        let show =
            |value: &Option<Value>| value.as_ref().map_or_else(String::new, Value::to_string);
        match self.op {
            "added" => format!("+ {}: {}", self.path, show(&self.after)),
            "removed" => format!("- {}: {}", self.path, show(&self.before)),
            _ => format!(
                "~ {}: {} -> {}",
                self.path,
                show(&self.before),
                show(&self.after)
            ),
        }
    }
}

/// The differences from `before` to `after`, table keys in the order `serde_json` keeps
/// them, list elements by index.
pub fn diff(before: &Value, after: &Value) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    walk("", before, after, &mut changes);
    changes
}

fn walk(path: &str, before: &Value, after: &Value, changes: &mut Vec<FieldChange>) {
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => {
            for (key, old_value) in old {
                let child = join(path, key);
                match new.get(key) {
                    Some(new_value) => walk(&child, old_value, new_value, changes),
                    None => changes.push(removed(child, old_value)),
                }
            }
            for (key, new_value) in new {
                if !old.contains_key(key) {
                    changes.push(added(join(path, key), new_value));
                }
            }
        }
        (Value::Array(old), Value::Array(new)) => {
            for index in 0..old.len().max(new.len()) {
                let child = format!("{path}[{index}]");
                match (old.get(index), new.get(index)) {
                    (Some(old_value), Some(new_value)) => {
                        walk(&child, old_value, new_value, changes)
                    }
                    (Some(old_value), None) => changes.push(removed(child, old_value)),
                    (None, Some(new_value)) => changes.push(added(child, new_value)),
                    (None, None) => {}
                }
            }
        }
        _ if before == after => {}
        // `null` is how an absent optional field serializes: show it as added / removed.
        (Value::Null, _) => changes.push(added(path.to_string(), after)),
        (_, Value::Null) => changes.push(removed(path.to_string(), before)),
        _ => changes.push(FieldChange {
            path: path.to_string(),
            op: "changed",
            before: Some(before.clone()),
            after: Some(after.clone()),
        }),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn added(path: String, value: &Value) -> FieldChange {
    FieldChange {
        path,
        op: "added",
        before: None,
        after: Some(value.clone()),
    }
}

fn removed(path: String, value: &Value) -> FieldChange {
    FieldChange {
        path,
        op: "removed",
        before: Some(value.clone()),
        after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_changed_added_and_removed_fields_by_path() {
        let before = json!({
            "workers": 2,
            "demo": null,
            "routes": [{"pool": "a", "name": "r"}, {"pool": "b"}],
        });
        let after = json!({
            "workers": 4,
            "demo": {"bind": "127.0.0.1:1"},
            "routes": [{"pool": "c", "name": "r"}],
        });
        let mut lines: Vec<String> = diff(&before, &after)
            .iter()
            .map(FieldChange::line)
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            vec![
                "+ demo: {\"bind\":\"127.0.0.1:1\"}".to_string(),
                "- routes[1]: {\"pool\":\"b\"}".to_string(),
                "~ routes[0].pool: \"a\" -> \"c\"".to_string(),
                "~ workers: 2 -> 4".to_string(),
            ]
        );
    }

    #[test]
    fn identical_values_have_no_changes() {
        let value = json!({"a": [1, {"b": null}]});
        assert!(diff(&value, &value).is_empty());
    }
}
