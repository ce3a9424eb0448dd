//! Checking manifests without a cluster: YAML documents as JSON, CRD
//! OpenAPI schemas from `tests/schemas/`, and validation of a custom
//! resource against its schema with the fields it does not declare reported
//! as errors (an API server would silently prune them, hiding typos).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize as _;
use serde_json::Value;

use crate::workspace_root;

/// Every YAML document of a file, as JSON values.
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// (group, version, kind) -> openAPIV3Schema, from the CRD files.
pub fn crd_schemas(files: &[&str]) -> BTreeMap<(String, String, String), Value> {
    let mut schemas = BTreeMap::new();
    for file in files {
        for crd in yaml_docs(&workspace_root().join("tests/schemas").join(file)) {
            if crd["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let group = crd["spec"]["group"].as_str().unwrap().to_owned();
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_owned();
            for version in crd["spec"]["versions"].as_array().unwrap() {
                let name = version["name"].as_str().unwrap().to_owned();
                let schema = version["schema"]["openAPIV3Schema"].clone();
                schemas.insert((group.clone(), name, kind.clone()), schema);
            }
        }
    }
    schemas
}

/// [`unknown_fields`] for a whole object: `apiVersion`, `kind` and `metadata`
/// are the API server's own, and CRD schemas (Istio's) often leave them out.
pub fn unknown_object_fields(schema: &Value, object: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = object.clone();
    if let Some(map) = rest.as_object_mut() {
        for key in ["apiVersion", "kind", "metadata"] {
            if schema["properties"].get(key).is_none() {
                map.remove(key);
            }
        }
    }
    unknown_fields(schema, &rest, "", &mut out);
    out
}

/// Fields of `value` that `schema` does not declare: the API server would
/// silently prune them, which hides typos; here they are errors.
fn unknown_fields(schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = &schema["additionalProperties"];
            for (key, child) in map {
                let path = format!("{at}.{key}");
                match properties.and_then(|p| p.get(key)) {
                    Some(child_schema) => unknown_fields(child_schema, child, &path, out),
                    None if additional.is_object() => unknown_fields(additional, child, &path, out),
                    None if *additional == true => {}
                    // `metadata` is declared as a bare object in CRD schemas.
                    None if properties.is_none()
                        && schema["type"] == "object"
                        && at == ".metadata" => {}
                    None => out.push(path),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                unknown_fields(&schema["items"], item, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// `object` against the CRD schema for its apiVersion and kind (which
/// `schemas` must hold): schema errors and undeclared fields fail.
pub fn validate_custom(
    schemas: &BTreeMap<(String, String, String), Value>,
    file: &Path,
    object: &Value,
) {
    let api_version = object["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap();
    let kind = object["kind"].as_str().unwrap();
    let schema = schemas
        .get(&(group.to_owned(), version.to_owned(), kind.to_owned()))
        .unwrap_or_else(|| panic!("{}: no CRD for {api_version} {kind}", file.display()));
    let validator = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{}: {kind}: {errors:#?}", file.display());
    let unknown = unknown_object_fields(schema, object);
    assert!(
        unknown.is_empty(),
        "{}: {kind}: unknown fields {unknown:?}",
        file.display()
    );
}

/// What a `ValidatingAdmissionPolicy` (as JSON) decides for one request, as
/// the API server would once `matchConstraints` matched: `Ok` when a
/// `matchCondition` is false (the policy does not apply) or every validation
/// holds, else the first failing validation's `message`. The CEL is
/// evaluated by the `cel` crate, which has CEL's core (`has`, `in`,
/// `exists`, the conditional operator), all the shipped policy uses; it does
/// not have Kubernetes' extension libraries, so a policy using them panics
/// here instead of passing unchecked.
pub fn admit(
    policy: &Value,
    request: &Value,
    object: &Value,
    params: &Value,
) -> Result<(), String> {
    let mut context = cel::Context::default();
    for (name, value) in [("request", request), ("object", object), ("params", params)] {
        context
            .add_variable(name, value.clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let holds = |expression: &str| -> bool {
        let program =
            cel::Program::compile(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
        match program.execute(&context) {
            Ok(cel::Value::Bool(b)) => b,
            // The API server applies failurePolicy; a test wants to know.
            other => panic!("{expression}: {other:?}"),
        }
    };
    let spec = &policy["spec"];
    let conditions = spec["matchConditions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if !conditions
        .iter()
        .all(|c| holds(c["expression"].as_str().expect("expression")))
    {
        return Ok(());
    }
    for validation in spec["validations"].as_array().expect("validations") {
        if !holds(validation["expression"].as_str().expect("expression")) {
            return Err(validation["message"]
                .as_str()
                .unwrap_or("denied")
                .to_owned());
        }
    }
    Ok(())
}
