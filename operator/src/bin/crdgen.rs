//! `crdgen`: prints the WebSocketCluster CustomResourceDefinition as YAML. `make generate`
//! writes it to `crds/`; a test fails when that file and this output differ.

fn main() -> anyhow::Result<()> {
    print!("{}", wsfleet_operator::crd_yaml()?);
    Ok(())
}
