//! The bounds a CRD's OpenAPI schema puts on `spec` (minimum, maximum, lengths, patterns,
//! enums, item counts, required fields), and for each, an object that breaks exactly it.
//!
//! `crds_apiserver.rs` takes a valid object that sets every bounded field, breaks one bound at
//! a time and checks that the real apiserver refuses it for that reason: a bound the CRD
//! declares but the apiserver does not enforce, or one the fixture does not reach, fails the
//! test.

use std::fmt;

use serde_json::Value;

/// One step of a path into an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A property of an object.
    Field(String),
    /// The elements of an array (the first one is the one broken).
    Item,
}

/// What a bound demands.
#[derive(Clone, Debug, PartialEq)]
pub enum Demand {
    /// `minimum`.
    Minimum(f64),
    /// `maximum`.
    Maximum(f64),
    /// `minLength`.
    MinLength(u64),
    /// `maxLength`.
    MaxLength(u64),
    /// `pattern`.
    Pattern(String),
    /// `enum`.
    Enum,
    /// `minItems`.
    MinItems(u64),
    /// `maxItems`.
    MaxItems(u64),
    /// `required` (the object at the path must have this property).
    Required(String),
}

/// A bound of the schema at a path.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    /// Where, from the object's root.
    pub path: Vec<Step>,
    /// What.
    pub demand: Demand,
}

/// Every bound under `spec` in a CRD version's `openAPIV3Schema`.
pub fn spec_bounds(open_api_v3_schema: &Value) -> Vec<Bound> {
    let mut out = Vec::new();
    if let Some(spec) = open_api_v3_schema.pointer("/properties/spec") {
        walk(spec, &mut vec![Step::Field("spec".to_owned())], &mut out);
    }
    out
}

fn walk(schema: &Value, path: &mut Vec<Step>, out: &mut Vec<Bound>) {
    let here = |demand| Bound {
        path: path.clone(),
        demand,
    };
    if let Some(n) = schema.get("minimum").and_then(Value::as_f64) {
        out.push(here(Demand::Minimum(n)));
    }
    if let Some(n) = schema.get("maximum").and_then(Value::as_f64) {
        out.push(here(Demand::Maximum(n)));
    }
    if let Some(n) = schema.get("minLength").and_then(Value::as_u64) {
        out.push(here(Demand::MinLength(n)));
    }
    if let Some(n) = schema.get("maxLength").and_then(Value::as_u64) {
        out.push(here(Demand::MaxLength(n)));
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
        out.push(here(Demand::Pattern(p.to_owned())));
    }
    if schema.get("enum").is_some() {
        out.push(here(Demand::Enum));
    }
    if let Some(n) = schema.get("minItems").and_then(Value::as_u64) {
        out.push(here(Demand::MinItems(n)));
    }
    if let Some(n) = schema.get("maxItems").and_then(Value::as_u64) {
        out.push(here(Demand::MaxItems(n)));
    }
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        out.push(here(Demand::Required(name.to_owned())));
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            path.push(Step::Field(name.clone()));
            walk(sub, path, out);
            path.pop();
        }
    }
    if let Some(items) = schema.get("items") {
        path.push(Step::Item);
        walk(items, path, out);
        path.pop();
    }
}

impl Bound {
    /// The field path as the apiserver reports it (`spec.rules[0].backends[0].port`).
    pub fn field_path(&self) -> String {
        let mut out = String::new();
        for step in &self.path {
            match step {
                Step::Field(name) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(name);
                }
                Step::Item => out.push_str("[0]"),
            }
        }
        if let Demand::Required(name) = &self.demand {
            out.push('.');
            out.push_str(name);
        }
        out
    }

    /// A copy of `object` that breaks this bound and no other on purpose, or why it cannot
    /// be made (the path is not in `object`).
    pub fn violate(&self, object: &Value) -> Result<Value, String> {
        let mut broken = object.clone();
        let target = locate(&mut broken, &self.path)
            .ok_or_else(|| format!("the object does not set {}", self.field_path()))?;
        match &self.demand {
            Demand::Minimum(n) => *target = number(n - 1.0),
            Demand::Maximum(n) => *target = number(n + 1.0),
            Demand::MinLength(n) => *target = Value::String("a".repeat(len(*n).saturating_sub(1))),
            Demand::MaxLength(n) => *target = Value::String("a".repeat(len(*n) + 1)),
            // A space and a `!`: outside every name, duration and header pattern we use.
            Demand::Pattern(_) => *target = Value::String("not valid!".to_owned()),
            Demand::Enum => *target = Value::String("NotInTheEnum".to_owned()),
            Demand::MinItems(n) => resize(target, n.saturating_sub(1))?,
            Demand::MaxItems(n) => resize(target, n + 1)?,
            Demand::Required(name) => {
                let removed = target.as_object_mut().and_then(|map| map.remove(name));
                if removed.is_none() {
                    return Err(format!("the object does not set {}", self.field_path()));
                }
            }
        }
        Ok(broken)
    }

    /// Words the apiserver's refusal must contain, besides the field path.
    pub fn expected_words(&self) -> String {
        match &self.demand {
            Demand::Minimum(n) => format!("should be greater than or equal to {n}"),
            Demand::Maximum(n) => format!("should be less than or equal to {n}"),
            Demand::MinLength(n) => format!("should be at least {n} chars long"),
            Demand::MaxLength(n) => format!("may not be more than {n} bytes"),
            Demand::Pattern(p) => format!("should match '{p}'"),
            Demand::Enum => "Unsupported value".to_owned(),
            Demand::MinItems(n) => format!("should have at least {n} items"),
            Demand::MaxItems(n) => format!("must have at most {n} items"),
            Demand::Required(_) => "Required value".to_owned(),
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.field_path(), self.demand)
    }
}

fn locate<'a>(mut value: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    for step in path {
        value = match step {
            Step::Field(name) => value.get_mut(name.as_str())?,
            Step::Item => value.get_mut(0)?,
        };
    }
    Some(value)
}

fn resize(target: &mut Value, count: u64) -> Result<(), String> {
    let items = target
        .as_array_mut()
        .ok_or_else(|| "an item bound on something that is not an array".to_owned())?;
    let first = items
        .first()
        .cloned()
        .ok_or_else(|| "an empty array cannot be grown".to_owned())?;
    items.resize(len(count), first);
    Ok(())
}

fn len(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Integral bounds as JSON integers (the schema's integers refuse `1.0`).
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        #[allow(clippy::cast_possible_truncation)] // integral and in range, checked above
        Value::from(n as i64)
    } else {
        Value::from(n)
    }
}

/// The `message` (or, without one, the `rule`) of every `x-kubernetes-validations` entry.
pub fn cel_messages(open_api_v3_schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_cel(open_api_v3_schema, &mut out);
    out
}

fn collect_cel(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(rules) = map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
            {
                for rule in rules {
                    let text = rule
                        .get("message")
                        .or_else(|| rule.get("rule"))
                        .and_then(Value::as_str);
                    if let Some(text) = text {
                        out.push(text.to_owned());
                    }
                }
            }
            for value in map.values() {
                collect_cel(value, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_cel(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "properties": {
                "spec": {
                    "required": ["target"],
                    "properties": {
                        "target": {"type": "string", "minLength": 1, "pattern": "^[a-z]+$"},
                        "rules": {
                            "maxItems": 2,
                            "items": {"properties": {"port": {"minimum": 1, "maximum": 65535}}},
                            "x-kubernetes-validations": [{"rule": "true", "message": "m1"}]
                        }
                    }
                },
                "status": {"properties": {"n": {"minimum": 0}}}
            }
        })
    }

    fn find<'a>(bounds: &'a [Bound], path: &str, demand: &Demand) -> &'a Bound {
        bounds
            .iter()
            .find(|b| b.field_path() == path && &b.demand == demand)
            .unwrap_or_else(|| panic!("no bound {path} {demand:?} in {bounds:?}"))
    }

    #[test]
    fn bounds_under_spec_are_found_and_status_is_ignored() {
        let mut found: Vec<String> = spec_bounds(&schema())
            .iter()
            .map(Bound::to_string)
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                "spec.rules MaxItems(2)",
                "spec.rules[0].port Maximum(65535.0)",
                "spec.rules[0].port Minimum(1.0)",
                "spec.target MinLength(1)",
                "spec.target Pattern(\"^[a-z]+$\")",
                "spec.target Required(\"target\")",
            ]
        );
    }

    #[test]
    fn each_violation_breaks_the_bound_it_names() {
        let object = json!({"spec": {"target": "web", "rules": [{"port": 80}]}});
        let bounds = spec_bounds(&schema());
        let broken =
            |path: &str, demand: Demand| find(&bounds, path, &demand).violate(&object).unwrap();
        assert_eq!(
            broken("spec.target", Demand::Required("target".into())),
            json!({"spec": {"rules": [{"port": 80}]}})
        );
        let grown = broken("spec.rules", Demand::MaxItems(2));
        assert_eq!(grown["spec"]["rules"].as_array().unwrap().len(), 3);
        let low = broken("spec.rules[0].port", Demand::Minimum(1.0));
        assert_eq!(low["spec"]["rules"][0]["port"], json!(0));
        let high = broken("spec.rules[0].port", Demand::Maximum(65535.0));
        assert_eq!(high["spec"]["rules"][0]["port"], json!(65536));
        let short = broken("spec.target", Demand::MinLength(1));
        assert_eq!(short["spec"]["target"], json!(""));
        let odd = broken("spec.target", Demand::Pattern("^[a-z]+$".into()));
        assert_eq!(odd["spec"]["target"], json!("not valid!"));
    }

    #[test]
    fn a_bound_the_object_does_not_reach_is_reported() {
        let object = json!({"spec": {"target": "web"}});
        let bounds = spec_bounds(&schema());
        let port = find(&bounds, "spec.rules[0].port", &Demand::Minimum(1.0));
        assert_eq!(
            port.violate(&object).unwrap_err(),
            "the object does not set spec.rules[0].port"
        );
    }

    #[test]
    fn cel_messages_are_collected_everywhere() {
        assert_eq!(cel_messages(&schema()), ["m1"]);
    }
}
