//! A CRD with an OpenAPI schema and a CEL rule is enforced by the real API server: a valid
//! object is accepted, and objects breaking the schema or the rule are refused with the field
//! named. This is what makes the operator's own CRD validation real.

use std::time::Duration;

use wsfleet_e2e::{TestNamespace, apply, fixture, kubectl, kubectl_run, wait_until};

const CRD: &str = "gadgets.e2e.wsfleet.dev";

/// Deletes the test CRD (and with it every Gadget) when the test ends, pass or fail.
struct CrdGuard;

impl Drop for CrdGuard {
    fn drop(&mut self) {
        let _ = kubectl_run(&["delete", "crd", CRD, "--wait=false", "--ignore-not-found"], None);
    }
}

fn gadget(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: e2e.wsfleet.dev/v1\nkind: Gadget\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n"
    )
}

#[test]
fn crd_schema_and_cel_rule_are_enforced() {
    // Start clean: a CRD left terminating by an earlier run would refuse new objects.
    kubectl(&["delete", "crd", CRD, "--ignore-not-found", "--wait=true", "--timeout=60s"]);
    let _crd = CrdGuard;
    apply(&fixture("crd-validation.yaml")).ok();
    kubectl(&["wait", "--for=condition=Established", &format!("crd/{CRD}"), "--timeout=60s"]);
    let ns = TestNamespace::new("crd");

    // A valid object is accepted (retrying while the new kind reaches discovery).
    let good = gadget(&ns.name, "good", "  size: 3\n  minReplicas: 1\n  maxReplicas: 2");
    wait_until("the valid Gadget to be accepted", Duration::from_secs(30), || {
        let run = apply(&good);
        if run.success { Ok(()) } else { Err(run.stderr) }
    });

    // The OpenAPI schema: size has a maximum of 10.
    let err = apply(&gadget(&ns.name, "too-big", "  size: 11")).refused();
    assert!(err.contains("spec.size"), "schema refusal names spec.size: {err}");
    assert!(err.contains("less than or equal to 10"), "schema refusal says why: {err}");

    // The CEL rule: minReplicas <= maxReplicas, reported on spec.minReplicas.
    let err = apply(&gadget(&ns.name, "inverted", "  size: 3\n  minReplicas: 5\n  maxReplicas: 2")).refused();
    assert!(err.contains("spec.minReplicas"), "CEL refusal names spec.minReplicas: {err}");
    assert!(
        err.contains("minReplicas must not be greater than maxReplicas"),
        "CEL refusal carries the rule's message: {err}"
    );

    // Only the valid object was stored.
    let names = kubectl(&["-n", &ns.name, "get", "gadgets", "-o", "jsonpath={.items[*].metadata.name}"]);
    assert_eq!(names.trim(), "good");
}
