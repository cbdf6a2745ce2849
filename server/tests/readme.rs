//! The README's flag table must match the binary: every flag it lists exists with the default it
//! states, and every flag the binary has is listed.

use std::collections::BTreeMap;

use clap::CommandFactory;
use wsfleet_server::config::Cli;

fn readme_flags() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let table = readme.split("<!-- flags").nth(1).and_then(|s| s.split("<!-- /flags -->").next()).expect("flag table");
    table
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').trim_start_matches("--").to_owned(), cells[2].trim_matches('`').to_owned())
        })
        .collect()
}

#[test]
fn the_readme_flag_table_matches_the_binary() {
    let documented = readme_flags();
    let cmd = Cli::command();
    let mut actual = BTreeMap::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if ["help", "version"].contains(&long) {
            continue;
        }
        let default = arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
        actual.insert(long.to_owned(), default);
    }
    let doc_names: Vec<_> = documented.keys().collect();
    let actual_names: Vec<_> = actual.keys().collect();
    assert_eq!(doc_names, actual_names, "README flags vs --help");
    for (flag, default) in &actual {
        let doc = &documented[flag];
        match default {
            Some(d) => assert_eq!(doc, d, "default of --{flag}"),
            None => assert!(["none", "any"].contains(&doc.as_str()), "--{flag} has no default, README says {doc}"),
        }
    }
}
