//! `crds/` holds the generated CRD; this fails when the Rust types changed and `make generate`
//! was not run (or someone edited the file by hand).

#[test]
fn the_crd_in_crds_is_what_crdgen_prints() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/websocketcluster.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/websocketcluster.yaml is missing: run make generate");
    let generated = wsfleet_operator::crd_yaml().unwrap();
    assert!(committed == generated, "crds/websocketcluster.yaml is stale: run `make generate` and commit the result");
}
